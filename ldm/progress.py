"""The training console: one progress bar over the run's optimizer steps, not one per epoch.

Runs here are step-based (`max_steps`, validation every N steps across epochs) on datasets whose epochs mean
little (the built-in data is generated), so Lightning's per-epoch bar showed "Epoch 4/-2" (no `max_epochs`)
and restarted every few hundred batches. This bar counts `global_step` up to `max_steps` and names the epoch
in its description; the logger's version (`v_num`) is left out of its figures.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Union

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """TQDM bar from the resumed step to `max_steps` (open-ended when there is none). Redrawn every step on a
    terminal; into a file or pipe (`nohup ... > train.log`) every `log_refresh_rate` steps, so a log of a long run
    stays readable."""

    def __init__(self, refresh_rate: Optional[int] = None, log_refresh_rate: int = 100, **kwargs: Any) -> None:
        if refresh_rate is None:
            refresh_rate = 1 if sys.stdout.isatty() else log_refresh_rate
        super().__init__(refresh_rate=refresh_rate, **kwargs)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        bar.n = bar.initial = trainer.global_step  # a resumed run continues where it stopped
        bar.unit = "step"

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"train (epoch {trainer.current_epoch})")

    def _show_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Counted in steps since the step the bar shows (`_show_step` sets it), not in the epoch's batch index:
        # an epoch shorter than the refresh interval (a small image folder) would otherwise never redraw the bar.
        bar = self.train_progress_bar
        if bar is not None and trainer.global_step - bar.n >= self.refresh_rate:
            self._show_step(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show_step(trainer, pl_module)  # the last step is shown whatever the refresh rate
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Union[int, str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
