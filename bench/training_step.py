"""Benchmark: the real txt2img training step against the bare U-Net training step, in one process.

    python bench/training_step.py                     # ~70 s on 2 CPU cores
    python bench/training_step.py --steps 4 --warmup 3 --pool 32 --batch-size 8 --out-dir /tmp/ts   # smoke

Times, in seconds per step:
(a) bare: the configs/latent-diffusion/txt2img.yaml U-Net (built as the model builds it) trained alone on
    random latents with a precomputed random context: forward, ε-MSE, backward, AdamW (`ldm.optim.adamw`);
(b) real, cache on: Lightning `Trainer.fit` of txt2img.yaml with `cache_latents: true`, set up as main.py
    sets it up (CSV and TensorBoard loggers, learning-rate monitor, progress bar, the config's
    log_every_n_steps; EMA, the jointly trained BERT, caption dropout, the built-in data made in the training
    process); validation and image logging are off, as between two of their runs. The train split is a pool
    of --pool items; timing starts after --warmup steps, at least one pass over the pool, so every item is
    cached (a real run pays one encoder pass per pool item in its first epoch);
(c) real, cache off: the same fit without the cache;
(e) with --compile: (b) with the U-Net compiled (`speed_options: [channels_last, compile]`, full batches only:
    `data.params.drop_last`), its first step (the compiling) reported apart; the warm-up steps must outlast it.
A callback notes the time at every `on_train_batch_start`; a fit's figure is the time from the start of step
`warmup` to the start of step `warmup + steps`, over `steps`. The bare step is timed before and after the
fits, and their mean is the reference: other work on the machine changes absolute speed over minutes, and
the ratio real / bare within one process is what this measures.

Writes bench/results/training_step.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.optim import adamw  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

CONFIG = "configs/latent-diffusion/txt2img.yaml"
TARGET_RATIO = 1.3


class StepClock(pl.Callback):
    """Wall-clock and process CPU time at every on_train_batch_start."""

    def __init__(self) -> None:
        self.starts: list[float] = []  # wall clock
        self.cpu: list[float] = []  # this process's CPU time

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())


def load_config(pool: int, batch_size: Optional[int], cache: bool, compiled: bool = False) -> Any:
    config = OmegaConf.load(REPO / CONFIG)
    config.data.params.train.params.num_samples = pool
    if batch_size is not None:
        config.data.params.batch_size = batch_size
    config.model.params.cache_latents = cache
    if compiled:
        config.model.params.speed_options = ["channels_last", "compile"]
        config.data.params.drop_last = True
    return config


def bare_step_seconds(config: Any, steps: int, warmup: int) -> dict:
    """Mean wall and CPU seconds of a U-Net training step alone (the model's own U-Net: its speed options
    applied)."""
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    net = model.model.train()
    optimizer = adamw(list(net.parameters()), lr=1e-4)
    unet = config.model.params.unet_config.params
    cond = config.model.params.cond_stage_config.params
    n = config.data.params.batch_size
    x = torch.randn(n, unet.in_channels, unet.image_size, unet.image_size)
    context = torch.randn(n, cond.max_seq_len, unet.context_dim)
    noise = torch.randn_like(x)

    def step() -> None:
        t = torch.randint(0, model.num_timesteps, (n,))
        loss = F.mse_loss(model.apply_model(x, t, context), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, steps, warmup)


def _timed(step: Callable[[], None], steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return {"s_per_step": (time.perf_counter() - start) / steps,
            "cpu_s_per_step": (time.process_time() - cpu_start) / steps}


def text_encoder_step_seconds(config: Any, steps: int, warmup: int) -> dict:
    """Mean wall and CPU seconds of the condition encoder's forward and backward on a batch of built-in
    captions: the part of a real step that the bare U-Net step leaves out when the encoder trains jointly."""
    model = instantiate_from_config(config.model)
    data = instantiate_from_config(config.data)
    data.setup("fit")
    captions = next(iter(data.train_dataloader()))["caption"]

    def step() -> None:
        model.get_learned_conditioning(captions).square().mean().backward()

    return _timed(step, steps, warmup)


def real_step_seconds(config: Any, steps: int, warmup: int, logdir: Path) -> dict:
    """Mean seconds per step of a Lightning fit of `config`, and the latent cache's hit rate over the window."""
    pl.seed_everything(0, workers=True)
    model = instantiate_from_config(config.model)
    model.learning_rate = float(config.model.base_learning_rate)
    data = instantiate_from_config(config.data)
    clock = StepClock()
    counts = {}

    class CacheCounter(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if pl_module.latent_cache is not None and trainer.global_step in (warmup, warmup + steps):
                counts[trainer.global_step] = (pl_module.latent_cache.hits, pl_module.latent_cache.misses)

    trainer = pl.Trainer(max_steps=warmup + steps + 1, accelerator="cpu", devices=1, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                         log_every_n_steps=int(config.lightning.trainer.log_every_n_steps),
                         logger=[CSVLogger(str(logdir), name="", version="csv"),
                                 TensorBoardLogger(str(logdir), name="", version="tensorboard")],
                         callbacks=[LearningRateMonitor(logging_interval="step"), clock, CacheCounter()],
                         default_root_dir=str(logdir))
    trainer.fit(model, data)
    result = {"s_per_step": (clock.starts[warmup + steps] - clock.starts[warmup]) / steps,
              "cpu_s_per_step": (clock.cpu[warmup + steps] - clock.cpu[warmup]) / steps,
              "first_step_s": clock.starts[1] - clock.starts[0]}
    if counts:
        (h0, m0), (h1, m1) = counts[warmup], counts[warmup + steps]
        result["cache_hit_rate"] = (h1 - h0) / max(1, (h1 - h0) + (m1 - m0))
        result["cached_items"] = len(model.latent_cache)
    return result


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "lightning": pl.__version__, "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg())}


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training_step.json").write_text(json.dumps(result, indent=1))
    a, m, bare = result["args"], result["machine"], result["bare"]
    rows = [("(a) bare U-Net step", bare, ""),
            ("(b) real loop, cache_latents on", result["cached"],
             f"cache hits {100 * result['cached']['cache_hit_rate']:.0f} % of items"),
            ("(c) real loop, cache off", result["uncached"], ""),
            (f"(d) text encoder alone (forward + backward, {a['batch_size']} captions)", result["text_encoder"],
             "part of every real step: BERT is trained jointly")]
    if result.get("compiled"):
        compiled = result["compiled"]
        rows.append(("(e) real loop, cache on, U-Net compiled", compiled,
                     f"{result['cached']['s_per_step'] / compiled['s_per_step']:.2f}x faster than (b); its first step "
                     f"(compiling) {compiled['first_step_s']:.0f} s, against {result['cached']['first_step_s']:.1f} s"))
    floor = 1.0 + result["text_encoder"]["cpu_ratio"]
    lines = ["# txt2img training step: real Lightning loop against the bare U-Net step", "",
             f"`python bench/training_step.py`: {CONFIG}, batch {a['batch_size']}, {a['steps']} timed steps after "
             f"{a['warmup']} warm-up steps, train pool of {a['pool']} built-in items. Target: real / bare ≤ "
             f"{TARGET_RATIO}. Seconds per step, as wall-clock time and as this process's CPU time.", "",
             "| run | wall s | wall / bare | CPU s | CPU / bare | |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {run['s_per_step']:.4f} | {run['s_per_step'] / bare['s_per_step']:.2f} | "
              f"{run['cpu_s_per_step']:.4f} | {run['cpu_s_per_step'] / bare['cpu_s_per_step']:.2f} | {note} |"
              for name, run, note in rows]
    lines += ["", f"A real step also trains the text encoder, so it cannot take less than (a) + (d): {floor:.2f}× the "
              "bare step in CPU time, before the data, the EMA update and Lightning's own work.", "",
              f"The bare step was timed before and after the fits: {bare['before']['s_per_step']:.4f} and "
              f"{bare['after']['s_per_step']:.4f} s wall, {bare['before']['cpu_s_per_step']:.4f} and "
              f"{bare['after']['cpu_s_per_step']:.4f} s CPU; the reference is their mean.", "",
              f"Machine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s), "
              f"Lightning {m['lightning']}, Python {m['python']}.", "",
              f"Other work on the machine shows as a load average above the {m['torch_threads']} thread(s) used "
              f"here (1, 5, 15 min, when this run started: {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}"
              "). It inflates absolute times and makes them drift over minutes. What this benchmark measures is the "
              "ratio of the real loop to the bare U-Net step, both timed in this one process; the CPU-time ratio is "
              "the steadier of the two under such load (the loop is single-threaded and never waits, so on an idle "
              "machine wall and CPU time agree).", ""]
    (out_dir / "training_step.md").write_text("\n".join(lines))


def mean_of(runs: Sequence[dict]) -> dict:
    return {key: statistics.mean(run[key] for run in runs) for key in ("s_per_step", "cpu_s_per_step")}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each run")
    parser.add_argument("--warmup", type=int, default=25, help="steps before timing (at least one pass over the pool)")
    parser.add_argument("--pool", type=int, default=640, help="train items (the built-in data's num_samples)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (32)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--compile", action="store_true", help="also time (e): the real loop with the U-Net compiled")
    args = parser.parse_args(argv)
    batch = args.batch_size or int(OmegaConf.load(REPO / CONFIG).data.params.batch_size)
    if args.warmup * batch < args.pool:
        parser.error(f"--warmup {args.warmup} steps of {batch} do not cover the pool of {args.pool} items; "
                     "raise --warmup or lower --pool")
    info = machine()
    cached_config = load_config(args.pool, args.batch_size, cache=True)
    uncached_config = load_config(args.pool, args.batch_size, cache=False)
    with tempfile.TemporaryDirectory() as tmp:
        bare_before = bare_step_seconds(uncached_config, args.steps, args.warmup)
        text_encoder = text_encoder_step_seconds(uncached_config, args.steps, args.warmup)
        cached = real_step_seconds(cached_config, args.steps, args.warmup, Path(tmp) / "cached")
        uncached = real_step_seconds(uncached_config, args.steps, args.warmup, Path(tmp) / "uncached")
        compiled = (real_step_seconds(load_config(args.pool, args.batch_size, cache=True, compiled=True), args.steps,
                                      args.warmup, Path(tmp) / "compiled") if args.compile else None)
        bare_after = bare_step_seconds(uncached_config, args.steps, args.warmup)
    bare = {**mean_of([bare_before, bare_after]), "before": bare_before, "after": bare_after}
    for run in (cached, uncached, text_encoder, *([compiled] if compiled else [])):
        run["ratio"] = run["s_per_step"] / bare["s_per_step"]
        run["cpu_ratio"] = run["cpu_s_per_step"] / bare["cpu_s_per_step"]
    result = {"args": {"steps": args.steps, "warmup": args.warmup, "pool": args.pool, "batch_size": batch},
              "machine": info, "bare": bare, "cached": cached, "uncached": uncached, "text_encoder": text_encoder,
              "compiled": compiled, "target_ratio": TARGET_RATIO}
    write_report(result, args.out_dir)
    print(f"bare U-Net step {bare['s_per_step']:.4f} s ({bare['cpu_s_per_step']:.4f} s CPU); real loop / bare: "
          f"cached {cached['ratio']:.2f} ({cached['cpu_ratio']:.2f} CPU), uncached {uncached['ratio']:.2f} "
          f"({uncached['cpu_ratio']:.2f} CPU); text encoder alone {text_encoder['cpu_ratio']:.2f} CPU; "
          f"target <= {TARGET_RATIO}")
    print(f"wrote {args.out_dir / 'training_step.md'} and training_step.json")
    return result


if __name__ == "__main__":
    main()
