"""Benchmark: does the built-in training data keep up with training? (items/s, real loader settings)

    python bench/data_pipeline.py                 # txt2img.yaml (~2 min on 2 CPU cores)
    python bench/data_pipeline.py --config configs/latent-diffusion/inpainting.yaml

Two measurements with the config's own DataModule (its batch size and worker count, as `main.py` builds it):
1. generation alone: items/s of iterating the train loader (after one warm-up batch);
2. a real Lightning fit of the config's model for --steps optimizer steps with Lightning's SimpleProfiler,
   which times `train_dataloader_next` (waiting for the next batch) apart from `run_training_batch`
   (forward, backward, optimizer). The model consumes items at batch / run_training_batch; the share of
   the fit's time spent waiting for data says whether the pipeline ever starves it.

Writes bench/results/data_pipeline.json, which bench/performance.py's report quotes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.profilers import SimpleProfiler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.util import instantiate_from_config  # noqa: E402

DATA_NEXT = "[_TrainingEpochLoop].train_dataloader_next"
TRAIN_BATCH = "run_training_batch"


def generation_rate(data: pl.LightningDataModule, batches: int) -> float:
    """Items per second of the train loader alone."""
    loader = iter(data.train_dataloader())
    first = next(loader)
    batch_size = len(next(iter(first.values())))
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def fit_profile(config_path: Path, steps: int) -> dict:
    """A short real fit; mean seconds per step waiting for data and training, from SimpleProfiler."""
    config = OmegaConf.load(config_path)
    model = instantiate_from_config(config.model)
    model.learning_rate = float(config.model.get("base_learning_rate", 1e-4))
    data = instantiate_from_config(config.data)
    profiler = SimpleProfiler()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", profiler=profiler, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[])
    start = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    # The first step pays one-off costs (first-stage scale estimate, allocator warm-up): leave it out.
    waits = profiler.recorded_durations[DATA_NEXT][1:]
    steps_s = profiler.recorded_durations[TRAIN_BATCH][1:]
    return {"batch_size": data.batch_size, "num_workers": data.num_workers, "steps": steps,
            "data_wait_s": statistics.mean(waits), "train_batch_s": statistics.mean(steps_s),
            "data_wait_share": sum(waits) / (sum(waits) + sum(steps_s)), "fit_wall_s": wall}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/latent-diffusion/txt2img.yaml")
    parser.add_argument("--batches", type=int, default=30, help="loader batches timed for the generation rate")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the profiled fit")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_pipeline.json")
    args = parser.parse_args(argv)
    config = OmegaConf.load(args.config)
    data = instantiate_from_config(config.data)
    data.setup("fit")
    rate = generation_rate(data, args.batches)
    print(f"generation alone: {rate:.0f} items/s (batch {data.batch_size}, {data.num_workers} workers)")
    fit = fit_profile(args.config, args.steps)
    consumption = fit["batch_size"] / fit["train_batch_s"]
    result = {"config": str(args.config.relative_to(REPO) if args.config.is_absolute() else args.config),
              "torch_threads": torch.get_num_threads(), "generation_items_per_s": rate,
              "training_items_per_s": consumption, "generation_over_training": rate / consumption, **fit}
    print(f"training consumes {consumption:.0f} items/s; generation is {rate / consumption:.1f}x that; "
          f"{100 * fit['data_wait_share']:.1f} % of the fit's step time waits for data "
          f"({1000 * fit['data_wait_s']:.1f} ms per step against {1000 * fit['train_batch_s']:.0f} ms training)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
