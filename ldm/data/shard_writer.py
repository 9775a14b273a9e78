"""Writing a dataset as WebDataset shards (`ldm.data.shard_format`): what ``ldm-prepare-data`` runs.

Sources (`FolderSource`, `BuiltinSource`) give item ``i`` as the files of one sample. Shard ``k`` holds items
``k * shard_size`` to ``(k + 1) * shard_size - 1`` (less the unreadable ones), so every shard can be written on its
own: in parallel by a pool of processes, and again after an interruption. Each is written under a temporary name and
renamed when complete; ``index.json`` is written first with the source and options and no shards (``complete:
false``), and last with every shard's count. A run over an output folder whose index names the same source and
options keeps the finished shards and writes the rest; one with other settings is refused, not mixed.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from ldm.data.folder import ImageFolderDataset
from ldm.data.image_transform import UNREADABLE_IMAGE_ERRORS, load_rgb
from ldm.data.shapes import ShapesDataset
from ldm.data.shard_format import (FORMAT, INDEX_FILE, SHARD_META, add_member, dump_json, item_key, read_index,
                                   read_shard_meta, shard_name, write_json_atomic)

BUILTIN_TASKS = ("txt2img", "class2img", "unconditional")
# The built-in item's fields kept in its .json beside index and human_label (`BuiltinSource`).
BUILTIN_EXTRA_FIELDS = ("typed_caption", "attributes", "num_objects")


def png_bytes(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) float image in [-1, 1] as PNG bytes (8 bits, as the folder datasets read images)."""
    array = np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class FolderSource:
    """A folder in any layout `ImageFolderDataset` reads (captions in ``.txt`` / metadata.jsonl / metadata.csv, class
    sub-folders): each image's bytes as stored, its caption, class label and file. An image PIL cannot read is left
    out (`item` returns its error instead)."""

    def __init__(self, root: str, caption_source: str = "auto", class_from_subfolders: bool = False,
                 caption_column: str = "text") -> None:
        self.settings = {"kind": "folder", "root": str(Path(root).expanduser().resolve()),
                         "caption_source": caption_source, "class_from_subfolders": class_from_subfolders,
                         "caption_column": caption_column}
        # size=None: only the index of files, captions and labels is used, never its transform.
        self.dataset = ImageFolderDataset(root, size=None, caption_source=caption_source,
                                          class_from_subfolders=class_from_subfolders, caption_column=caption_column,
                                          flip_p=0.0)
        self.settings["caption_source"] = self.dataset.caption_source  # what `auto` chose
        self.classes = self.dataset.classes if class_from_subfolders else []

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int) -> dict[str, bytes] | str:
        path = self.dataset.paths[index]
        try:
            load_rgb(path)  # decoded once here, so the stream never meets an unreadable image
        except UNREADABLE_IMAGE_ERRORS as e:
            return f"{path.relative_to(self.dataset.root)}: {e.__class__.__name__}: {e}"
        label = self.dataset.labels[index]
        meta = {"index": index, "source": str(path.relative_to(self.dataset.root)),
                "human_label": self.dataset.classes[label]}
        return {path.suffix.lower().lstrip("."): path.read_bytes(), "txt": self.dataset.captions[index].encode("utf-8"),
                "cls": str(label).encode(), "json": dump_json(meta)}


class BuiltinSource:
    """Items ``0 .. n-1`` of a split of the built-in shapes (`ShapesDataset`) at `size`, as PNGs with their caption,
    class label and the other fields of the item."""

    def __init__(self, task: str, split: str, n: int, size: int = 32, seed: int = 0) -> None:
        if task not in BUILTIN_TASKS:
            raise ValueError(f"unknown built-in task {task!r}: use one of {BUILTIN_TASKS}")
        self.settings = {"kind": "builtin", "task": task, "split": split, "n": n, "size": size, "seed": seed}
        self.dataset = ShapesDataset(split, size=size, num_samples=n, seed=seed)
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int) -> dict[str, bytes] | str:
        item = self.dataset[index]
        meta = {"index": index, "human_label": item["human_label"],
                **{name: np.asarray(item[name]).tolist() for name in BUILTIN_EXTRA_FIELDS}}
        return {"png": png_bytes(item["image"]), "txt": item["caption"].encode("utf-8"),
                "cls": str(item["class_label"]).encode(), "json": dump_json(meta)}


Source = FolderSource | BuiltinSource


def make_source(settings: dict[str, Any]) -> Source:
    """The source `settings` (a source's ``settings``, as the index stores it) describe."""
    options = {k: v for k, v in settings.items() if k != "kind"}
    return FolderSource(**options) if settings["kind"] == "folder" else BuiltinSource(**options)


def write_shard(source: Source, path: Path, start: int, stop: int) -> dict[str, Any]:
    """Items ``start .. stop-1`` of `source` as the shard `path`, through a temporary name; returns its
    ``__shard__.json`` (count, first and last key, the items left out)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    keys, skipped = [], []
    with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(start, stop):
            files = source.item(index)
            if isinstance(files, str):
                skipped.append({"key": item_key(index), "error": files})
                continue
            for extension, data in files.items():
                add_member(tar, f"{item_key(index)}.{extension}", data)
            keys.append(item_key(index))
        meta = {"count": len(keys), "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None,
                "skipped": skipped}
        add_member(tar, SHARD_META, dump_json(meta))
    temporary.replace(path)
    return meta


_WORKER_SOURCE: Optional[Source] = None


def _init_worker(settings: dict[str, Any]) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = make_source(settings)


def _write_in_worker(path: Path, start: int, stop: int) -> tuple[str, dict[str, Any]]:
    assert _WORKER_SOURCE is not None
    return path.name, write_shard(_WORKER_SOURCE, path, start, stop)


def _finished_meta(path: Path) -> Optional[dict[str, Any]]:
    """The metadata of a finished shard at `path`, None when it is missing or unfinished."""
    if not path.is_file():
        return None
    try:
        return read_shard_meta(path)
    except (tarfile.TarError, OSError, ValueError):
        return None  # a damaged file: written again


def prepare_shards(source: Source, output: Path, shard_size: int, prefix: str, workers: int = 1,
                   progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Write `source` into `output` as shards of `shard_size` items named ``<prefix>-NNNNNN.tar`` with
    ``index.json``, using `workers` processes, resuming a run with the same settings (module docstring). `progress`
    is called with the number of items of each shard done (also those found done). Returns the index."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1 item, got {shard_size}")
    output.mkdir(parents=True, exist_ok=True)
    options = {"shard_size": shard_size, "prefix": prefix}
    index_path = output / INDEX_FILE
    if index_path.is_file():
        previous = read_index(str(index_path))
        if previous.get("source") != source.settings or previous.get("options") != options:
            raise ValueError(f"{output} holds shards of another source or options ({previous.get('source')}, "
                             f"{previous.get('options')}); give a new --output, or the same options to resume")
    index = {"format": FORMAT, "complete": False, "source": source.settings, "options": options,
             "classes": source.classes, "total": 0, "shards": []}
    write_json_atomic(index_path, index)
    for stale in output.glob(".*.tar.tmp-*"):  # what an interrupted run was writing: written again below
        stale.unlink()

    spans = [(output / shard_name(prefix, k), start, min(start + shard_size, len(source)))
             for k, start in enumerate(range(0, len(source), shard_size))]
    metas: dict[str, dict[str, Any]] = {}
    pending = []
    for path, start, stop in spans:
        meta = _finished_meta(path)
        if meta is None:
            pending.append((path, start, stop))
        else:
            metas[path.name] = meta
            if progress:
                progress(stop - start)
    for name, meta in _write_pending(source, pending, workers):
        metas[name] = meta
        if progress:
            progress(meta["count"] + len(meta["skipped"]))

    shards = [{"name": path.name, "bytes": path.stat().st_size,
               **{k: metas[path.name][k] for k in ("count", "first_key", "last_key")}} for path, _, _ in spans]
    index.update(complete=True, total=sum(s["count"] for s in shards), shards=shards,
                 skipped=[s for path, _, _ in spans for s in metas[path.name]["skipped"]])
    write_json_atomic(index_path, index)
    return index


def _write_pending(source: Source, pending: list[tuple[Path, int, int]],
                   workers: int) -> Iterator[tuple[str, dict[str, Any]]]:
    if workers <= 1 or len(pending) <= 1:
        for path, start, stop in pending:
            yield path.name, write_shard(source, path, start, stop)
        return
    # Each process builds its own source from the settings (a folder's file list, the built-in generator) rather
    # than receiving it pickled with every task.
    with ProcessPoolExecutor(min(workers, len(pending)), initializer=_init_worker,
                             initargs=(source.settings,)) as pool:
        futures = [pool.submit(_write_in_worker, path, start, stop) for path, start, stop in pending]
        for future in as_completed(futures):
            yield future.result()
