"""The layout of the WebDataset shards `ldm-prepare-data` writes and `ldm.data.shards` streams.

A shard is a tar archive of samples, each sample the files of one key (WebDataset's convention): ``<key>.png`` (or
the source image's own extension: ``.jpg``, ``.webp``, ...; the bytes as they were), ``<key>.txt`` (the caption),
``<key>.cls`` (the class label, decimal) and ``<key>.json`` (``index``: the item's place in its source, ``source``:
its file, ``human_label``, and for the built-in data its other fields: ``typed_caption``, ``attributes``, ...).
Keys are the item's index in the source, zero-padded, so they sort in source order and name the item. The last
member, ``__shard__.json`` (which WebDataset readers skip as metadata), holds the shard's count and the items left
out as unreadable, so a finished shard describes itself (what a resumed `ldm-prepare-data` reads back).

Shards are named ``<prefix>-<index, 6 digits>.tar``; ``index.json`` beside them (`INDEX_FILE`) holds the source,
the options, and per shard its name, item count, size in bytes and first and last key (the keys between are that
shard's items in order). The streaming datasets read only the counts: what they hold in memory grows with the
number of shards, not of items.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Optional

from ldm.config import ConfigError

INDEX_FILE = "index.json"
SHARD_META = "__shard__.json"
FORMAT = "ldm-shards-1"
KEY_DIGITS = 9
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
INSTALL_HINT = 'pip install "ldm[shards]"'
_SHARD_NAME = re.compile(r"([^/\s'\"]+\.tar)\b")


def require_webdataset() -> Any:
    """The webdataset module, or a one-line ConfigError naming the extra that installs it (main.py and the
    command-line programs print it without a traceback)."""
    try:
        import webdataset
    except ImportError:
        raise ConfigError(f"sharded data needs the webdataset package: {INSTALL_HINT}") from None
    return webdataset


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def item_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def shard_name_in(url: str) -> Optional[str]:
    """The ``*.tar`` file name a shard URL names (a path, ``http://.../x.tar``, ``pipe:cat x.tar``), for its
    index entry; None when it names none."""
    found = _SHARD_NAME.findall(url)
    return Path(found[-1]).name if found else None


def expand_urls(urls: Any) -> list[str]:
    """A URL pattern (``shards/train-{000000..000006}.tar``, brace-expanded), a list of them, or several separated by
    ``::`` (WebDataset's notation), as a list of shard URLs."""
    import braceexpand  # installed with webdataset

    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            expanded.extend(braceexpand.braceexpand(part.strip()))
    if not expanded:
        raise ValueError("no shard URLs given: set urls to e.g. shards/train-{000000..000009}.tar")
    return expanded


def open_url(url: str) -> IO[bytes]:
    """A binary stream of a shard or index URL: a local path opened directly, anything else through WebDataset's
    openers (``file:``, ``pipe:`` commands, ``http(s)://`` by curl, ...)."""
    if ":" not in url.split("/", 1)[0]:  # no scheme: a local path (what ldm-prepare-data reads back needs no more)
        return open(url, "rb")
    return require_webdataset().gopen(url, "rb")


def read_index(url: str) -> dict[str, Any]:
    """The ``index.json`` at `url` (a path or any URL `open_url` opens); FileNotFoundError / ValueError naming it."""
    try:
        with open_url(url) as stream:
            index = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read the shard index {url} ({e}); write the shards with ldm-prepare-data, "
                                "which puts index.json beside them, or give its location as 'index'") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT or "shards" not in index:
        raise ValueError(f"{url} is not a shard index of ldm-prepare-data (format {FORMAT}); write the shards again")
    return index


def write_json_atomic(path: Path, value: Any) -> None:
    """`value` as JSON in `path`, through a temporary name: an interrupted write leaves the old file or none."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    temporary.replace(path)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The ``__shard__.json`` of a finished shard file (ValueError when it has none: an unfinished shard)."""
    with tarfile.open(path, "r:") as tar:
        try:
            member = tar.getmember(SHARD_META)
        except KeyError:
            raise ValueError(f"{path} has no {SHARD_META}: not a finished shard") from None
        stream = tar.extractfile(member)
        assert stream is not None
        return json.loads(stream.read().decode("utf-8"))


class ShardReadError(Exception):
    """A shard, or a member of it, that could not be read: the message names both."""


def tar_samples(stream: IO[bytes], url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """The samples of one tar stream, in order: ``{"__key__": ..., "__url__": url, <ext>: bytes, ...}``.

    Read as a stream (no seeking: pipes and http work), grouping consecutive members by key as WebDataset does; the
    metadata members (``__*__``) are left out. A damaged member (truncated, a broken header) ends the shard: the
    stream cannot be read past it. `on_error` (WebDataset's ``handler=`` convention: return True to go on) gets a
    `ShardReadError` naming the shard and the member; the sample that member belonged to is dropped. A stream cut
    at a member's header ends like a short shard (tarfile reads it as the end): its reader compares the count with
    the index's.
    """
    sample: Optional[dict[str, Any]] = None
    member = "(the tar header)"
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                member = info.name
                if not info.isreg() or Path(member).name.startswith("__"):
                    continue
                key, _, extension = member.partition(".")
                extracted = tar.extractfile(info)
                data = extracted.read() if extracted is not None else b""
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                sample[extension.lower()] = data
                tar.members = []  # a stream of millions of members: keep none of their headers
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if not on_error(ShardReadError(f"shard {url}, member {member}: {e.__class__.__name__}: {e}")):
            raise
        if sample is not None and sample["__key__"] != member.partition(".")[0]:
            yield sample  # complete: the damage is in the next sample's member, which is dropped
        return
    if sample is not None:
        yield sample


def dump_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def shard_counts(index: dict[str, Any], urls: Iterable[str], index_url: str) -> list[int]:
    """Items per URL of `urls`, from `index` (matched by the shard's file name); ValueError for a URL it lacks."""
    counts = {entry["name"]: int(entry["count"]) for entry in index["shards"]}
    found = []
    for url in urls:
        name = shard_name_in(url)
        if name not in counts:
            raise ValueError(f"shard {url} is not listed in the index {index_url}; give the URLs of shards "
                             f"ldm-prepare-data wrote there ({index['shards'][0]['name'] if index['shards'] else 'none'}, ...)")
        found.append(counts[name])
    return found
