"""Lightning callbacks used by `main.py`: run directory set-up, image grids, checkpoint on interrupt.

Every file written here is written by global rank 0 only, so multi-process runs do not race.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from ldm.checkpoint import inference_state_dict, is_disk_full, save_safetensors
from ldm.divergence import TrainingDiverged, non_finite_tensors
from ldm.image_logs import log_images, shows_images
from ldm.visualization import make_grid, save_png, to_uint8

log = logging.getLogger(__name__)


class SetupCallback(Callback):
    """Creates ``logdir/{checkpoints,configs,images}`` and saves the merged configs there (rank 0)."""

    def __init__(self, now: str, logdir: str, ckptdir: str, cfgdir: str,
                 config: DictConfig, lightning_config: DictConfig) -> None:
        super().__init__()
        self.now = now
        self.logdir = Path(logdir)
        self.ckptdir = Path(ckptdir)
        self.cfgdir = Path(cfgdir)
        self.config = config
        self.lightning_config = lightning_config
        self.written: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir, self.logdir / "images"):
            d.mkdir(parents=True, exist_ok=True)
        self.written = [self.cfgdir / f"{self.now}-project.yaml", self.cfgdir / f"{self.now}-lightning.yaml"]
        OmegaConf.save(self.config, self.written[0])
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}), self.written[1])
        log.info("Run directory: %s", self.logdir)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.written = []  # a step was trained under these configs: they are the run's now

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A resume that failed before training a step (a changed architecture, a bad override) leaves the run's
        # configs as they were: the next plain `-r` would otherwise restore the configs that failed.
        if trainer.is_global_zero and trainer.ckpt_path is not None:
            for path in self.written:
                path.unlink(missing_ok=True)


class LastCheckpoint(Callback):
    """Makes ``last.ckpt`` the state training stopped in: at the end of training, and on Ctrl-C, SIGTERM or
    an exception.

    ModelCheckpoint's ``save_last`` only writes when it saves a monitored checkpoint (at validation), so
    the steps after the last validation would otherwise be lost. Lightning routes KeyboardInterrupt and its
    SIGTERM handling (``SIGTERMException``) through ``on_exception``; there the checkpoint is written by
    rank 0 without a collective barrier, because other ranks may already be gone.
    """

    def __init__(self, ckptdir: str) -> None:
        super().__init__()
        self.path = Path(ckptdir) / "last.ckpt"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and not trainer.interrupted:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state -r needs, said explicitly

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        kept = f"kept {self.path}" if self.path.is_file() else "no checkpoint was written"
        if isinstance(exception, TrainingDiverged) or non_finite_tensors(pl_module.state_dict()):
            # The weights may already hold the divergence: the checkpoint there is the last good one.
            if trainer.is_global_zero:
                log.warning(f"training diverged at global step {trainer.global_step}; {kept} (the diverged "
                            "weights are not saved)")
            return
        if is_disk_full(exception):
            # Another write would fail the same way, and could only leave less room for the user to recover.
            if trainer.is_global_zero:
                log.warning(f"no space left on the disk at global step {trainer.global_step}; {kept}")
            return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.path)
            log.warning(f"training interrupted ({exception.__class__.__name__}) at global step "
                        f"{trainer.global_step}; saved {self.path}. "
                        f"Resume with: python main.py -r {self.path.parent.parent}")


class ImageLogger(Callback):
    """Writes PNG grids of whatever ``ldm.image_logs.log_images(pl_module, batch, split=...)`` returns: a diffusion
    model's grids, or what a module's own ``log_images`` returns (the first stages', a module written for the
    reference's logger).

    Grids go to ``<trainer.default_root_dir>/images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png`` and to TensorBoard
    when it is among the loggers. With ``increase_log_steps`` the first grids come at steps 1, 2, 4, ...
    (as the reference does) so a new run shows something early. ``log_images_kwargs`` go to ``log_images``:
    for diffusion models e.g. ``{sampler: ddim, steps: 50}`` (default DPM-Solver++(2M), 20 steps).

    A run that received SIGTERM logs nothing more: no new grids, and a diffusion model's sampling stops at
    its next step, so stopping never waits for pictures (Ctrl-C interrupts sampling directly).
    """

    def __init__(self, batch_frequency: int = 1000, max_images: int = 8, clamp: bool = True,
                 increase_log_steps: bool = True, rescale: bool = True, disabled: bool = False,
                 log_on_batch_idx: bool = False, log_first_step: bool = False,
                 log_images_kwargs: Optional[dict] = None, nrow: int = 4) -> None:
        super().__init__()
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        # As the reference: `rescale` means the module returns images in [-1, 1]; without it, in [0, 1].
        self.value_range = (-1.0, 1.0) if rescale else (0.0, 1.0)
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.nrow = nrow
        self.log_steps = [2 ** n for n in range(int(math.log2(batch_frequency)) + 1)]
        if not increase_log_steps:
            self.log_steps = [self.batch_freq]

    def _due(self, step: int) -> bool:
        if (step % self.batch_freq == 0 or step in self.log_steps) and (step > 0 or self.log_first_step):
            if step in self.log_steps:
                self.log_steps.remove(step)
            return True
        return False

    @torch.no_grad()
    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str = "train") -> list[Path]:
        """Ask the module for images and write one grid per key; returns the files written."""
        if self.disabled or not shows_images(pl_module) or self.max_images <= 0:
            return []
        if not trainer.is_global_zero:  # sampling is for the pictures only: one rank makes them
            return []
        if trainer.received_sigterm:
            return []
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = log_images(pl_module, batch, split=split, **self.log_images_kwargs)
        finally:
            pl_module.train(was_training)
        if trainer.received_sigterm:  # arrived while sampling: the grids are incomplete and the run is stopping
            return []
        root = Path(trainer.default_root_dir)  # main.py sets it to the run's log directory
        written = []
        for key, value in images.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 4:
                continue
            value = value[: self.max_images].detach().float().cpu()
            if self.clamp:
                value = value.clamp(*self.value_range)
            name = f"{key}_gs-{trainer.global_step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}.png"
            grid = to_uint8(make_grid(value, nrow=self.nrow), self.value_range)
            written.append(save_png(grid, root / "images" / split / name))
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):
                    experiment.add_image(f"{split}/{key}", grid, trainer.global_step, dataformats="HWC")
        return written

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = batch_idx if self.log_on_batch_idx else trainer.global_step
        if self._due(step):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and trainer.global_step > 0:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class ExportSafetensors(Callback):
    """Writes ``checkpoints/last.safetensors`` (weights only, no pickle) when training ends (rank 0); for a LoRA run,
    the adapter alone in the key format of its `lora_config.file_format` (diffusers' unless it says kohya: what
    `ldm-export --lora` writes, ready for ``--lora``)."""

    def __init__(self, ckptdir: str) -> None:
        super().__init__()
        self.path = Path(ckptdir) / "last.safetensors"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and getattr(pl_module, "lora_settings", None) is not None:
            from ldm.lora import export_trained_lora

            try:
                export_trained_lora(pl_module, self.path, metadata={"global_step": trainer.global_step})
                log.info(f"wrote the LoRA adapter {self.path}")
            except ValueError as e:  # a U-Net with no diffusers layout: the adapter stays in last.ckpt
                log.warning(f"no {self.path.name}: {e}")
        elif trainer.is_global_zero:
            save_safetensors(inference_state_dict(pl_module.state_dict()), self.path, metadata={
                "class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                "global_step": trainer.global_step})
            log.info(f"wrote weights-only {self.path}")


class ResumedLearningRate(Callback):
    """Applies a learning rate changed on resume (`-r <run> model.base_learning_rate=...`).

    Lightning restores each optimizer's and scheduler's state after `configure_optimizers`, so without this the
    checkpoint's rate silently wins over the one the config now asks for. The schedule keeps its place: a
    scheduler's base rate becomes the new one and the current rate is scaled by new / old (the schedule's factor
    at this step is unchanged).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wanted = getattr(pl_module, "learning_rate", None)
        if trainer.ckpt_path is None or wanted is None:
            return
        changed = set()
        schedulers = {id(config.scheduler.optimizer): config.scheduler for config in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                old = group.get("initial_lr", group["lr"])
                if old <= 0 or math.isclose(old, wanted, rel_tol=1e-9):
                    continue
                changed.add(old)
                group["lr"] *= wanted / old
                if "initial_lr" in group:
                    group["initial_lr"] = wanted
            scheduler = schedulers.get(id(optimizer))
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [wanted for _ in scheduler.base_lrs]
        if changed:
            olds = ", ".join(f"{v:.2e}" for v in sorted(changed))
            log.warning(f"learning rate changed on resume: {olds} (checkpoint) -> {wanted:.2e} (config), applied from "
                        f"step {trainer.global_step}; the schedule keeps its place")


# The losses worth a curve: the objective itself, not each of its terms (metrics.csv keeps those).
MAIN_LOSSES = re.compile(r"(^|/)(loss|loss_simple|loss_simple_ema|loss_ema|rec_loss|aeloss|discloss)(_step)?$")


class LossCurve(Callback):
    """Draws `loss_curve.png` in the run directory from `csv/metrics.csv` when training ends (also after Ctrl-C):
    every logged training loss per step, smoothed by a moving average, and every validation loss."""

    def __init__(self, logdir: str, smoothing: int = 25) -> None:
        super().__init__()
        self.logdir, self.smoothing = Path(logdir), smoothing

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()  # metrics still in the CSV writer's buffer
            self.draw()

    def draw(self) -> Optional[Path]:
        import csv

        from ldm.visualization import plot_curves

        metrics = self.logdir / "csv" / "metrics.csv"
        if not metrics.is_file():
            return None
        with metrics.open(newline="") as f:
            rows = list(csv.DictReader(f))
        columns = [c for c in (rows[0] if rows else {}) if MAIN_LOSSES.search(c)]
        series = {}
        for column in columns:
            points = sorted((int(r["step"]), float(r[column])) for r in rows if r.get(column) and r.get("step"))
            if not points:
                continue
            x, y = (np.array(v, dtype=float) for v in zip(*points))
            if column.startswith("train") or column.endswith("_step"):
                window = max(1, min(self.smoothing, len(y) // 10))
                y = np.convolve(y, np.ones(window) / window, mode="valid")
                x = x[window - 1:]
            series[column] = (x, y)
        return plot_curves(series, self.logdir / "loss_curve.png", title=f"{self.logdir.name}: losses per step")


class SkippedImages(Callback):
    """At the end of each training epoch, says how many images of the training data could not be read and were
    skipped (datasets with `skipped_files()`, as `ldm.data.folder.ImageFolderDataset`), naming the first few; for
    a shard stream (`skipped_count()`, `ldm.data.shards.ShardDataset`) how many samples it skipped that epoch."""

    def __init__(self, show: int = 3) -> None:
        super().__init__()
        self.show = show
        self._streamed_skips = 0  # a stream's count at the last report

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datasets = getattr(trainer.datamodule, "datasets", {}) if trainer.datamodule is not None else {}
        dataset = getattr(datasets.get("train"), "data", datasets.get("train"))  # unwrap WrappedDataset
        if trainer.is_global_zero and hasattr(dataset, "skipped_count"):
            # A stream (`ldm.data.shards`) skips anew every epoch, naming each sample as it goes: the count here.
            count, self._streamed_skips = dataset.skipped_count() - self._streamed_skips, dataset.skipped_count()
            if count:
                log.warning(f"epoch {trainer.current_epoch}: {count} training samples of this rank's part of the "
                            "shards could not be read and were skipped (named in the warnings above)")
        if not trainer.is_global_zero or not hasattr(dataset, "skipped_files"):
            return
        skipped = dataset.skipped_files()
        if skipped:
            names = ", ".join(str(p) for p in skipped[:self.show]) + (", ..." if len(skipped) > self.show else "")
            log.warning(f"epoch {trainer.current_epoch}: {len(skipped)} of {len(dataset)} training images could not "
                        f"be read and were skipped ({names})")
