"""Training data streamed from WebDataset tar shards (written by ``ldm-prepare-data``; layout in
`ldm.data.shard_format`): the streaming counterpart of `ldm.data.folder.ImageFolderDataset`.

    data:
      target: ldm.data.datamodule.DataModuleFromConfig
      params:
        batch_size: 16
        train:
          target: ldm.data.shards.ShardDataset
          params: {urls: "shards/train/train-{000000..000019}.tar", size: 256, crop: random, flip_p: 0.0}

``urls`` is a brace pattern, a list, or anything WebDataset opens (``pipe:aws s3 cp s3://bucket/train-000000.tar -``,
``https://host/train-{000000..000019}.tar``); ``index`` is the ``index.json`` beside the shards (default: in the
first shard's folder). Items are decoded and transformed by the folder datasets' code (`ImageTransform`) and have
their keys: ``image``, ``caption``, ``class_label``, ``human_label``, ``index`` (the item's index in its source),
``file_path_`` (``<shard url>#<key>``), and for built-in data ``typed_caption``, ``attributes``, ``num_objects``.

An epoch, and how it is split (why: exactly once, and no DDP hang). The shards are put in an order drawn from
(``seed``, epoch), the same in every process, and read as one sequence of T items (T from the index's counts). The
R ranks x W DataLoader workers are S = R x W slots; slot s reads positions ``s*n .. s*n + n - 1`` of the sequence,
n = ceil(T / S), wrapping around to its start. So every item is read exactly once per epoch when S divides T, and
otherwise the first ``S*n - T`` items (fewer than S) a second time, as `DistributedSampler` pads. Every slot yields
the same n items, so every rank runs the same number of batches: no rank waits at the end of an epoch for another
that has run out (which is what a split by whole shards of unequal length does). A slot's first shard may be shared
with the slot before it: it reads past that slot's part without decoding it. Within a slot the items pass a shuffle
buffer of ``shuffle_buffer`` raw (still encoded) samples, seeded by (seed, epoch, slot).

A damaged shard (a truncated member, a broken header, a shard that cannot be opened) or an image that cannot be
decoded is skipped with one warning naming the shard and member; the slot then reads on past its part, so it still
yields n items and the ranks stay in step. `skipped_count` counts them (for the end-of-epoch report).

Memory: the index's per-shard counts, the shuffle buffer and one tar stream per worker; nothing grows with the
number of items. The epoch advances each time the dataset is iterated (one copy per DataLoader worker, kept by the
data module's persistent workers), or is set with `set_epoch`.
"""
from __future__ import annotations

import bisect
import io
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.image_transform import UNREADABLE_IMAGE_ERRORS, ImageTransform, load_rgb
from ldm.data.shard_format import (IMAGE_EXTENSIONS, INDEX_FILE, ShardReadError, expand_urls, open_url, read_index,
                                   require_webdataset, shard_counts, tar_samples)

log = logging.getLogger(__name__)
# Fields of an item's .json that are not passed on as they are.
META_FIELDS = ("index", "source", "human_label")
MAX_WORKERS = 256  # per-worker skip counters (`skipped_count`); more DataLoader workers share counters


def default_index_url(url: str) -> str:
    """``index.json`` in the folder of shard `url` (a path or a URL with a path; for a ``pipe:`` command, give
    ``index`` yourself)."""
    if url.startswith("pipe:"):
        raise ValueError(f"cannot tell where the index of {url} is: set 'index' to its index.json (a path or URL)")
    return f"{url.rsplit('/', 1)[0]}/{INDEX_FILE}" if "/" in url else INDEX_FILE


def shuffled(samples: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """`samples` through a shuffle buffer of `size` (WebDataset's ``shuffle``): each sample leaves at random
    once the buffer is full; the rest in random order at the end."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


def segments(counts: Sequence[int], start: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(shard position, items to skip in it, items to take) covering positions ``start .. start + length - 1`` of
    the sequence of shards holding `counts` items, wrapping around its end."""
    total = sum(counts)
    bounds = np.cumsum([0, *counts]).tolist()
    position, left = start % total, length
    while left > 0:
        shard = bisect.bisect_right(bounds, position) - 1  # shards of 0 items are passed over
        offset = position - bounds[shard]
        take = min(left, counts[shard] - offset)
        yield shard, offset, take
        left -= take
        position = (position + take) % total


class ShardDataset(IterableDataset):
    """Items streamed from shards, split across DDP ranks and DataLoader workers (module docstring).

    `urls`: shard URLs (brace patterns, lists, ``::``-separated); `index`: their index.json (default beside the
    first); `size`, `crop`, `interpolation`, `flip_p`: as `ImageFolderDataset`; `shuffle`: shard order and buffer
    (off for validation); `seed`: of the shard order and buffer (default: Lightning's global seed, else 0).
    """

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        index: Optional[str] = None,
        size: Optional[int] = 256,
        crop: str = "center",
        interpolation: str = "bicubic",
        flip_p: float = 0.0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: Optional[int] = None,
    ) -> None:
        require_webdataset()  # fail now, by name, not in a DataLoader worker
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 (1 = no buffer), got {shuffle_buffer}")
        self.urls = expand_urls(urls)
        self.index_url = index or default_index_url(self.urls[0])
        index_data = read_index(self.index_url)
        self.counts = shard_counts(index_data, self.urls, self.index_url)
        self.num_items = sum(self.counts)
        if self.num_items == 0:
            raise ValueError(f"the shards {self.urls[0]}, ... hold no items (index {self.index_url}); "
                             "write them again with ldm-prepare-data")
        self.classes: list[str] = list(index_data.get("classes") or [])
        self.transform = ImageTransform(size, crop, interpolation, flip_p)
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.epoch = 0
        self._rank: Optional[tuple[int, int]] = None
        # Shared memory, one cell per worker: workers count what they skip where the training process reads it.
        self._skipped = torch.zeros(MAX_WORKERS, dtype=torch.int64).share_memory_()

    # ------------------------------------------------------------------ where this copy reads

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Read as rank `rank` of `world_size` (the data module sets the trainer's; tests simulate ranks with it)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
        self._rank = (rank, world_size)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch` next (its shard order and buffer seeds)."""
        self.epoch = epoch

    def distributed(self) -> tuple[int, int]:
        """(rank, world size): as set, else torch.distributed's, else the RANK / WORLD_SIZE environment, else (0, 1)."""
        if self._rank is not None:
            return self._rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    @property
    def random_augmentation(self) -> bool:
        return self.transform.random_augmentation

    def items_per_slot(self, slots: int) -> int:
        """Items each of `slots` readers (ranks x workers) yields per epoch."""
        return math.ceil(self.num_items / slots)

    def skipped_count(self) -> int:
        """Samples skipped as unreadable so far, by this process and its DataLoader workers."""
        return int(self._skipped.sum())

    # ------------------------------------------------------------------ reading

    def _report(self, error: Exception) -> bool:
        """WebDataset's ``handler=`` hook: one line naming the shard and member, counted; True: go on."""
        info = get_worker_info()
        self._skipped[(info.id if info else 0) % MAX_WORKERS] += 1
        log.warning(f"skipping unreadable data: {error}")
        return True

    def _read(self, url: str, skip: int, take: float) -> Iterator[dict[str, Any]]:
        """Samples ``skip .. skip + take - 1`` of shard `url` (``take=math.inf``: to its end), still encoded."""
        try:
            stream = open_url(url)
        except (OSError, ValueError) as e:
            self._report(ShardReadError(f"shard {url}: cannot open it ({e.__class__.__name__}: {e})"))
            return
        reported = []

        def report(error: Exception) -> bool:
            reported.append(error)
            return self._report(error)

        read, last = 0, None
        with stream:
            for sample in tar_samples(stream, url, report):
                if read >= skip + take:
                    return
                if read >= skip:
                    yield sample
                read, last = read + 1, sample["__key__"]
        if take != math.inf and read < skip + take and not reported:
            # tarfile takes a stream cut at a member's header for the archive's end: only the count shows it.
            self._report(ShardReadError(f"shard {url}, member after {last}: the shard ends after {read} of the "
                                        f"{skip + take} items its index promises (truncated?)"))

    def _raw(self, order: Sequence[int], start: int, length: int) -> Iterator[dict[str, Any]]:
        counts = [self.counts[i] for i in order]
        for shard, skip, take in segments(counts, start, length):
            yield from self._read(self.urls[order[shard]], skip, take)

    def decode(self, sample: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The item of a raw sample, as `ImageFolderDataset` gives it; None (reported) when it cannot be decoded."""
        where = f"shard {sample['__url__']}, member {sample['__key__']}"
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if extension is None:
            self._report(ShardReadError(f"{where}: no image (.png, .jpg, ...) in the sample"))
            return None
        try:
            image = load_rgb(io.BytesIO(sample[extension]))
            meta = json.loads(sample["json"]) if "json" in sample else {}
            caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
            label = int(sample["cls"]) if "cls" in sample else 0
        except UNREADABLE_IMAGE_ERRORS as e:  # also a .json / .txt / .cls that does not parse (ValueError)
            self._report(ShardReadError(f"{where}.{extension}: {e.__class__.__name__}: {e}"))
            return None
        key = sample["__key__"]
        item = {
            "image": self.transform(image),
            "caption": caption,
            "class_label": label,
            "human_label": meta.get("human_label", ""),
            "file_path_": f"{sample['__url__']}#{key}",
            "index": int(meta.get("index", key if key.isdigit() else -1)),
        }
        for name, value in meta.items():
            if name not in META_FIELDS:
                item[name] = np.asarray(value) if isinstance(value, list) else value
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = self.distributed()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots, slot = world_size * workers, rank * workers + worker
        epoch = self.epoch
        self.epoch += 1  # this copy's next iteration reads the next epoch
        order = list(range(len(self.urls)))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)  # the same order in every slot
        n = self.items_per_slot(slots)
        samples = self._raw(order, slot * n, n)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, slot]))
        # Items lost to damage are made up by reading on past this slot's part (at most once around), so every slot
        # still yields n; chained lazily, that part is never opened when nothing was lost.
        samples = itertools.chain(samples, self._raw(order, slot * n + n, self.num_items))
        yielded = 0
        for sample in samples:
            item = self.decode(sample)
            if item is not None:
                yield item
                yielded += 1
                if yielded == n:
                    return
        raise RuntimeError(f"only {yielded} of the {self.num_items} items of the shards {self.urls[0]}, ... could "
                           "be read (see the warnings); write the shards again with ldm-prepare-data")

    def iter_captions(self) -> Iterator[str]:
        """Every item's caption, shard by shard, without decoding images (for the run's caption vocabulary)."""
        for url in self.urls:
            for sample in self._read(url, 0, math.inf):
                if "txt" in sample:
                    yield sample["txt"].decode("utf-8").strip()
