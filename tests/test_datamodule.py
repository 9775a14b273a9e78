import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.utilities.data import _update_dataloader
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset, default_num_workers, worker_init_fn
from ldm.data.shapes import ShapesDataset
from ldm.util import instantiate_from_config

CONFIG = """
target: ldm.data.datamodule.DataModuleFromConfig
params:
  batch_size: 8
  num_workers: 0
  train:
    target: ldm.data.shapes.ShapesTrain
    params: {size: 32, num_samples: 32}
  validation:
    target: ldm.data.shapes.ShapesValidation
    params: {size: 32, num_samples: 16}
"""


def test_builds_loaders_from_config():
    data = instantiate_from_config(OmegaConf.create(CONFIG))
    assert set(data.dataset_configs) == {"train", "validation"}
    assert is_overridden("train_dataloader", data) and is_overridden("val_dataloader", data)
    assert not is_overridden("test_dataloader", data)  # Lightning skips testing
    data.setup("fit")
    train = data.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.batch_size == 8
    batch = next(iter(train))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["attributes"].shape == (8, 2, 4)
    validation = data.val_dataloader()
    assert isinstance(validation.sampler, SequentialSampler)
    first = next(iter(validation))
    np.testing.assert_array_equal(first["image"][0].numpy(), data.datasets["validation"][0]["image"])


def test_drop_last_keeps_every_training_batch_full_and_refuses_a_train_split_under_one_batch():
    config = OmegaConf.create(CONFIG)
    config.params.batch_size = 12  # 32 train items: two full batches and a short one of 8
    data = instantiate_from_config(config)
    data.setup("fit")
    assert [len(b["caption"]) for b in data.train_dataloader()] == [12, 12, 8]
    config.params.drop_last = True
    data = instantiate_from_config(config)
    data.setup("fit")
    assert [len(b["caption"]) for b in data.train_dataloader()] == [12, 12]
    assert [len(b["caption"]) for b in data.val_dataloader()] == [12, 4]  # validation keeps every item
    config.params.batch_size = 64
    data = instantiate_from_config(config)
    data.setup("fit")
    with pytest.raises(ValueError, match="drop_last is on and the train split has 32 items, fewer than one batch"):
        data.train_dataloader()


def test_num_workers_default_and_persistent_workers(monkeypatch):
    for cores, batch_size, expected in ((2, 64, 1), (1, 64, 0), (32, 64, 8), (16, 2, 2), (None, 8, 0)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert default_num_workers(batch_size) == expected, (cores, batch_size)
    monkeypatch.undo()
    data = DataModuleFromConfig(batch_size=4, num_workers=1, wrap=True,
                                test={"target": "ldm.data.shapes.ShapesTest", "params": {"num_samples": 8}})
    data.setup("test")
    assert isinstance(data.datasets["test"], WrappedDataset) and len(data.datasets["test"]) == 8
    loader = data.test_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers
    assert isinstance(loader.sampler, SequentialSampler)
    assert DataModuleFromConfig(batch_size=4, num_workers=0, predict={"target": "ldm.data.shapes.ShapesTest"}) \
        .num_workers == 0


class _GlobalRandom(Dataset):
    """Items drawn from numpy's global RNG: equal across workers unless each worker is seeded."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> np.ndarray:
        return np.random.randint(0, 2**31, size=4)


def _draws(worker_init, rank: int, monkeypatch) -> list[tuple[int, ...]]:
    monkeypatch.setattr(rank_zero_only, "rank", rank)  # forked workers inherit it
    torch.manual_seed(0)  # as seed_everything does, identically on every DDP rank
    loader = DataLoader(_GlobalRandom(), batch_size=1, num_workers=2, worker_init_fn=worker_init)
    return [tuple(b[0].tolist()) for b in loader]


def test_worker_init_fn_seeds_numpy_per_worker_and_rank(monkeypatch):
    rank0 = _draws(worker_init_fn, 0, monkeypatch)
    # Worker 0 makes items 0, 2, 4, ...; worker 1 items 1, 3, ...: their draws must differ.
    assert len(set(rank0)) == len(rank0)
    assert rank0 == _draws(worker_init_fn, 0, monkeypatch)  # reproducible from the seed
    # Without it, two DDP ranks would draw identical augmentations; with it they differ.
    assert _draws(None, 0, monkeypatch) == _draws(None, 1, monkeypatch)
    assert not set(rank0) & set(_draws(worker_init_fn, 1, monkeypatch))


def test_distributed_sampler_can_be_swapped_in():
    data = DataModuleFromConfig(batch_size=4, num_workers=0, use_worker_init_fn=True,
                                train={"target": "ldm.data.shapes.ShapesTrain", "params": {"num_samples": 20}})
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.worker_init_fn is worker_init_fn
    # What Lightning does under DDP: rebuild the loader around a DistributedSampler.
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True)
    rebuilt = _update_dataloader(loader, sampler)
    assert rebuilt.sampler is sampler and rebuilt.batch_size == 4
    assert sum(len(b["caption"]) for b in rebuilt) == 10  # this rank's half


class _TinyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"].mean(dim=(1, 2))).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch["image"].mean(dim=(1, 2))).pow(2).mean(), batch_size=len(batch["image"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_on_the_datamodule(tmp_path):
    data = instantiate_from_config(OmegaConf.create(CONFIG))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         accelerator="cpu")
    trainer.fit(_TinyModel(), data)
    assert trainer.global_step == 3
    assert "val/loss" in trainer.callback_metrics
    assert isinstance(data.datasets["train"], ShapesDataset)
