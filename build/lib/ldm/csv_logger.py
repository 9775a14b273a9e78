"""The CSV logger main.py uses: Lightning's, except that a resumed run appends to its metrics.csv.

Lightning's writer deletes an existing metrics.csv when it starts, so `main.py -r` used to leave only the
resumed steps. Here the writer starts from the file's header and appends; a new metric column rewrites the
file with the wider header, old rows kept (Lightning's own rewrite).
"""
from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv continues across `-r` resumes instead of starting over."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
