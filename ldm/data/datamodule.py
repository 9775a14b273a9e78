"""The `data:` block of a config as a LightningDataModule (the reference main.py's DataModuleFromConfig).

    data:
      target: main.DataModuleFromConfig        # or ldm.data.datamodule.DataModuleFromConfig
      params:
        batch_size: 64
        num_workers: 2
        train:
          target: ldm.data.shapes.ShapesTrain
          params: {size: 32}
        validation:
          target: ldm.data.shapes.ShapesValidation
          params: {size: 32}

Each split config is built with ``instantiate_from_config`` in ``setup``. Only the splits given get a
``*_dataloader`` hook, so Lightning skips validation / test when there is no dataset for it. The loaders
use plain shuffling or sequential order and no custom sampler, so under DDP Lightning swaps in its
DistributedSampler itself; an iterable dataset with ``set_distributed`` (the shard streams, `ldm.data.shards`) is
told the trainer's rank and world size and splits itself.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.util import instantiate_from_config

SPLITS = ("train", "validation", "test", "predict")


class WrappedDataset(Dataset):
    """Wraps an arbitrary object with __len__ and __getitem__ into a pytorch dataset."""

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def default_num_workers(batch_size: int) -> int:
    """Loader processes when the config sets none.

    The reference uses ``batch_size * 2`` (24 processes for a batch of 12), which on a 2-core machine
    only adds contention and memory: the training process needs a core of its own for the model, and
    one worker generates thousands of built-in images per second. So: one worker per remaining core,
    at most 8 and at most one per item of the batch; 0 (load in the training process) on one core.
    """
    return max(0, min(batch_size, (os.cpu_count() or 1) - 1, 8))


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy and torch in a DataLoader worker, distinct per worker, per epoch and per DDP rank.

    ``torch.initial_seed()`` in a worker is the loader's base seed (drawn anew each epoch) plus the
    worker id. Mixing in the global rank keeps random augmentations from repeating across processes,
    whose base seeds are equal after ``seed_everything``.
    """
    del worker_id  # already part of torch.initial_seed()
    seeds = np.random.SeedSequence([torch.initial_seed(), rank_zero_only.rank]).generate_state(2, np.uint64)
    np.random.seed(int(seeds[0]) % 2**32)
    torch.manual_seed(int(seeds[1]))


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(
        self,
        batch_size: int,
        train: Optional[dict] = None,
        validation: Optional[dict] = None,
        test: Optional[dict] = None,
        predict: Optional[dict] = None,
        wrap: bool = False,
        num_workers: Optional[int] = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 loads in the training process), got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = default_num_workers(batch_size) if num_workers is None else num_workers
        self.use_worker_init_fn = use_worker_init_fn
        # Training batches only: every step then has the same shape, so a compiled U-Net (speed_options: [compile])
        # does not compile again for an epoch's short last batch.
        self.drop_last = drop_last
        self.wrap = wrap
        self.shuffle = {"train": True, "validation": shuffle_val_dataloader, "test": shuffle_test_loader, "predict": False}
        self.dataset_configs = {
            split: config
            for split, config in zip(SPLITS, (train, validation, test, predict))
            if config is not None
        }
        if not self.dataset_configs:
            raise ValueError("DataModuleFromConfig needs at least one of train / validation / test / predict")
        # As the reference: only configured splits get a hook, as bound methods (picklable for
        # spawned DDP processes); Lightning runs a loop only when its hook is overridden.
        hooks = {
            "train": ("train_dataloader", self._train_dataloader),
            "validation": ("val_dataloader", self._val_dataloader),
            "test": ("test_dataloader", self._test_dataloader),
            "predict": ("predict_dataloader", self._predict_dataloader),
        }
        for split in self.dataset_configs:
            setattr(self, *hooks[split])
        self.datasets: dict[str, Any] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        for split, config in self.dataset_configs.items():
            if split not in self.datasets:
                dataset = instantiate_from_config(config)
                self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset

    def _train_dataloader(self) -> DataLoader:
        return self._dataloader("train")

    def _val_dataloader(self) -> DataLoader:
        return self._dataloader("validation")

    def _test_dataloader(self) -> DataLoader:
        return self._dataloader("test")

    def _predict_dataloader(self) -> DataLoader:
        return self._dataloader("predict")

    def _dataloader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        iterable = isinstance(dataset, IterableDataset)
        if iterable and hasattr(dataset, "set_distributed") and self.trainer is not None:
            # A stream splits itself across ranks (`ldm.data.shards`); DataLoader workers cannot ask the process
            # group, which is not set up in them.
            dataset.set_distributed(self.trainer.global_rank, self.trainer.world_size)
            # A resumed run reads its epoch's shard order, not the first epoch's again (the loader is made after the
            # checkpoint's loop state is restored).
            dataset.set_epoch(self.trainer.current_epoch)
        drop_last = self.drop_last and split == "train"
        if drop_last and not iterable and len(dataset) < self.batch_size:
            raise ValueError(f"drop_last is on and the train split has {len(dataset)} items, fewer than one batch of "
                             f"{self.batch_size}: no step would run; lower data.params.batch_size or set "
                             "data.params.drop_last=false")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            # An iterable dataset orders its own stream; DataLoader refuses shuffle for it.
            shuffle=self.shuffle[split] and not iterable,
            worker_init_fn=worker_init_fn if self.use_worker_init_fn else None,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
        )
