"""The CSV logger main.py uses: Lightning's, except that a resumed run appends to its metrics.csv.

Lightning's writer deletes an existing metrics.csv when it starts, so `main.py -r` used to leave only the
resumed steps. Here the writer starts from the file's header and appends; a new metric column rewrites the
file with the wider header, old rows kept (Lightning's own rewrite). A run killed after its last checkpoint had
logged steps that the resumed run trains and logs again: `ResumedMetrics` drops those rows first, so every step
is in the file once.
"""
from __future__ import annotations

import csv
import os
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))

    def forget_from(self, step: int) -> int:
        """Drop the rows logged at `step` or later (rows without a step are kept); returns how many went."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fieldnames, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not (row.get("step") or "").isdigit() or int(row["step"]) < step]
        if len(kept) < len(rows):
            temporary = f"{self.metrics_file_path}.tmp"
            with self._fs.open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(temporary, self.metrics_file_path)  # a kill now leaves the old file or the new one
        return len(rows) - len(kept)


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv continues across `-r` resumes instead of starting over."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class ResumedMetrics(pl.Callback):
    """On a resumed fit, drops the metrics.csv rows of the steps the checkpoint does not hold (logged before a
    kill, trained and logged again now)."""

    def __init__(self) -> None:
        self.pending = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pending = trainer.ckpt_path is not None and trainer.is_global_zero

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.pending:
            return
        self.pending = False
        # The step the loggers will write for this first resumed batch (batches that stepped: the GAN autoencoders
        # step twice per batch); only known once the loop has restored its counters, hence here.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.experiment.forget_from(step)
