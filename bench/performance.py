"""Benchmark: our U-Net, training step and DDIM sampling loop against diffusers' on identical weights.

    python bench/performance.py --stage final                 # CPU: txt2img.yaml size and the larger size (~15 min)
    python bench/performance.py --stage final --sweep         # ... plus the time-vs-batch/resolution plot
    python bench/performance.py --quick                       # smoke run (~1 min): txt2img size, few repeats
    python bench/performance.py --device cuda --precision bf16 --workloads 1p4b --stage gpu

Both models are the same network with the same weights: diffusers' `UNet2DConditionModel` is made from
ours by `ldm.diffusers_bridge.unet.to_diffusers` (the bench checks that the outputs
agree). In one process, interleaved (the order alternates every repeat, so drift hits both alike), after
warm-up, the median of the repeats is taken of:
- forward: one U-Net forward pass without gradients (ours `unet(x, t, context)`, diffusers
  `unet(x, t, encoder_hidden_states=context, return_dict=False)`);
- train: one training step, ε-prediction MSE at random t, backward and AdamW. Each side builds its
  optimizer as its own training code does: ours with `ldm.optim.adamw` (what `configure_optimizers`
  uses), diffusers with plain `torch.optim.AdamW` (its examples/text_to_image/train_text_to_image.py).
  "train_same_optimizer" gives diffusers our optimizer too, so the model's share can be read apart;
- sample: a full 50-step DDIM text-to-image loop with classifier-free guidance (scale 7.5): ours
  `DDIMSampler(model).sample(...)`, diffusers the StableDiffusionPipeline loop around `DDIMScheduler`
  (scaled_linear betas 0.00085..0.012, steps_offset 1, set_alpha_to_one False: the same schedule and
  timesteps as the reference's DDIM). Both start from the same x_T; the bench checks the two final
  latents agree. "overhead" is the share of the loop's time spent outside U-Net calls (timed by hooks).

Peak memory: each (implementation, task) runs once more in a fresh child process. On the CPU it is the
growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs after the model is built), on
CUDA `torch.cuda.max_memory_allocated` above the built model. The training figure thus holds gradients,
optimizer state and activations; the sampling figure is taken over 2 steps (every step is alike).

FLOPs: counted with `torch.utils.flop_counter.FlopCounterMode`, which counts matrix products,
convolutions and attention (2 per multiply-add) at the dispatcher; element-wise work is not counted.
The machine's ceiling is measured in the same run: a large matrix product and a large 3x3 convolution in
the benchmark's dtype. "of ceiling" is achieved FLOP/s over the faster of the two.

Ours runs as the toolkit builds it (DDPM's `speed_options`, channels-last by default); `--ours-options`
changes them (`none`, `channels_last,compile`, ...), and `--diffusers-channels-last` gives diffusers
the same memory format. What each change gains is recorded as its own --stage. Writes bench/results/performance.{csv,md,json} (rows of other stages and
devices are kept) and, with --sweep, performance.png.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.ddpm import DDPM  # noqa: E402
from ldm.diffusers_bridge.unet import to_diffusers  # noqa: E402
from ldm.modules.diffusionmodules.speed import DEFAULT_SPEED_OPTIONS, SPEED_OPTIONS  # noqa: E402
from ldm.optim import adamw  # noqa: E402

GUIDANCE = 7.5
DDIM_STEPS = 50
LINEAR_START, LINEAR_END = 0.00085, 0.012
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _unet_params(config: str) -> dict:
    node = OmegaConf.load(REPO / config).model.params.unet_config.params
    return OmegaConf.to_container(node, resolve=True)


@dataclass(frozen=True)
class Workload:
    """A U-Net, its latent size and context, and the batch sizes each task runs at."""

    name: str
    unet: dict
    latent: int
    context: tuple[int, int]  # (tokens, width)
    batches: Sequence[int]
    sample_batches: Sequence[int]
    note: str


def workloads() -> dict[str, Workload]:
    txt2img = _unet_params("configs/latent-diffusion/txt2img.yaml")
    large = dict(txt2img, image_size=32, model_channels=320, channel_mult=[1, 2, 2], attention_resolutions=[2, 4],
                 num_head_channels=64, context_dim=768)
    big = _unet_params("configs/latent-diffusion/txt2img-1p4B-eval.yaml")
    big.pop("use_checkpoint", None)
    return {
        "txt2img": Workload("txt2img", txt2img, 8, (32, txt2img["context_dim"]), (32,), (4,),
                            "configs/latent-diffusion/txt2img.yaml's U-Net, 8x8x4 latents, training batch 32, "
                            "4 samples (txt2img.py's --n_samples)"),
        "large": Workload("large", large, 32, (77, 768), (1, 4), (1,),
                          "320 base channels, channel_mult [1,2,2], attention at 16x16 and 8x8 (64-channel heads), "
                          "context 77x768 (CLIP-sized), 32x32x4 latents (256x256 images at f=8)"),
        "1p4b": Workload("1p4b", big, 32, (77, big["context_dim"]), (1, 4), (1, 4),
                         "the U-Net of configs/latent-diffusion/txt2img-1p4B-eval.yaml (the reference's 1.4B "
                         "text-to-image model), 32x32x4 latents (256x256 images at f=8)"),
    }


# ------------------------------------------------------------------------------------------- the models


@dataclass
class Pair:
    """Ours (a DDPM holding the U-Net, as DDIMSampler needs) and diffusers' U-Net, same weights."""

    ours: DDPM
    diffusers: torch.nn.Module

    @property
    def unet(self) -> torch.nn.Module:
        return self.ours.model.diffusion_model


def build_ddpm(workload: Workload, speed_options: Sequence[str]) -> DDPM:
    config = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": workload.unet}
    torch.manual_seed(0)
    model = DDPM(config, conditioning_key="crossattn", linear_start=LINEAR_START, linear_end=LINEAR_END,
                 use_ema=False, image_size=workload.latent, channels=workload.unet["in_channels"],
                 speed_options=speed_options)
    # Random weights everywhere: the zero-initialised output layers would make every block the identity.
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0.0, 0.02)
    return model


def build_pair(workload: Workload, device: torch.device, options: Sequence[str],
               diffusers_channels_last: bool = False) -> Pair:
    """Ours as the toolkit builds it (with `options` as its speed_options), diffusers from its weights."""
    ours = build_ddpm(workload, options).to(device)
    theirs = to_diffusers(ours.model.diffusion_model)
    if diffusers_channels_last:  # diffusers' documented CPU/GPU speed-up, for a like-for-like row
        theirs.to(memory_format=torch.channels_last)
    return Pair(ours, theirs)


def diffusers_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=LINEAR_START, beta_end=LINEAR_END,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclass
class Inputs:
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor


def make_inputs(workload: Workload, batch: int, device: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(batch)
    shape = (batch, workload.unet["in_channels"], workload.latent, workload.latent)
    tokens, width = workload.context

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(device)

    return Inputs(randn(*shape), torch.randint(0, 1000, (batch,), generator=g).to(device), randn(batch, tokens, width),
                  randn(batch, tokens, width), randn(*shape))


# --------------------------------------------------------------------------------------------- the tasks


def forward_fns(pair: Pair, inp: Inputs) -> dict[str, Callable[[], Any]]:
    unet, theirs = pair.unet, pair.diffusers

    @torch.no_grad()
    def ours() -> torch.Tensor:
        return unet(inp.x, inp.t, inp.context)

    @torch.no_grad()
    def diffusers() -> torch.Tensor:
        return theirs(inp.x, inp.t, encoder_hidden_states=inp.context, return_dict=False)[0]

    return {"ours": ours, "diffusers": diffusers}


def train_fns(pair: Pair, inp: Inputs, same_optimizer: bool = False) -> dict[str, Callable[[], Any]]:
    """One step of ε-prediction training: x_t = √ᾱ x_0 + √(1−ᾱ) ε (DDPM eq. 4), MSE on ε, AdamW."""
    schedule = pair.ours.schedule
    x_t = schedule.q_sample(inp.x, inp.t, inp.noise)
    unet, theirs = pair.unet, pair.diffusers
    opt_ours = adamw(unet.parameters(), lr=1e-5)
    opt_theirs = adamw(theirs.parameters(), lr=1e-5) if same_optimizer else torch.optim.AdamW(
        theirs.parameters(), lr=1e-5)

    def ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        F.mse_loss(unet(x_t, inp.t, inp.context), inp.noise).backward()
        opt_ours.step()

    def diffusers() -> None:
        opt_theirs.zero_grad(set_to_none=True)
        out = theirs(x_t, inp.t, encoder_hidden_states=inp.context, return_dict=False)[0]
        F.mse_loss(out, inp.noise).backward()
        opt_theirs.step()

    return {"ours": ours, "diffusers": diffusers}


def sample_fns(pair: Pair, inp: Inputs, steps: int = DDIM_STEPS) -> dict[str, Callable[[], torch.Tensor]]:
    model, theirs = pair.ours, pair.diffusers
    batch = inp.x.shape[0]

    @torch.no_grad()
    def ours() -> torch.Tensor:
        samples, _ = DDIMSampler(model).sample(
            S=steps, batch_size=batch, shape=inp.x.shape[1:], conditioning=inp.context, x_T=inp.x, eta=0.0,
            unconditional_guidance_scale=GUIDANCE, unconditional_conditioning=inp.uncond, verbose=False)
        return samples

    @torch.no_grad()
    def diffusers() -> torch.Tensor:
        # StableDiffusionPipeline.__call__'s denoising loop (guidance as one doubled batch, uncond first).
        scheduler = diffusers_scheduler()
        scheduler.set_timesteps(steps, device=inp.x.device)
        latents = inp.x * scheduler.init_noise_sigma
        embeddings = torch.cat([inp.uncond, inp.context])
        for t in scheduler.timesteps:
            latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps = theirs(latent_in, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + GUIDANCE * (eps_text - eps_uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        return latents

    return {"ours": ours, "diffusers": diffusers}


TASKS: dict[str, Callable[..., dict[str, Callable[[], Any]]]] = {
    "forward": forward_fns,
    "train": train_fns,
    "train_same_optimizer": lambda pair, inp: train_fns(pair, inp, same_optimizer=True),
    "sample": sample_fns,
}


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UNetTimer:
    """Wall time spent inside a module's forward calls (pre/post hooks), to split a loop's time."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.total = 0.0
        self.device = device
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        synchronize(self.device)
        self.total += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
                     modules: Optional[dict[str, torch.nn.Module]] = None,
                     warmup_fns: Optional[dict[str, Callable[[], Any]]] = None,
                     min_seconds: float = 0.0) -> dict[str, dict[str, Any]]:
    """Median and min seconds per call of each fn, run alternately, the last call's output ("output") and
    the first warm-up call's time ("first_s": with torch.compile, the compile time).

    With `modules`, also the median share of each call's time spent outside those modules' forwards.
    `warmup_fns` (default `fns`) run `warmup` times first; with `min_seconds`, calls are repeated (beyond
    `repeats`) until each fn has run about that long in all.
    """
    names = list(fns)
    first = {}
    for w in range(warmup):
        for name in names:
            synchronize(device)
            start = time.perf_counter()
            (warmup_fns or fns)[name]()
            synchronize(device)
            if w == 0:
                first[name] = time.perf_counter() - start
    if min_seconds:
        # Short calls are noisy on a shared machine: repeat until each side has run about `min_seconds`.
        synchronize(device)
        start = time.perf_counter()
        fns[names[0]]()
        synchronize(device)
        repeats = max(repeats, min(200, round(min_seconds / (time.perf_counter() - start))))
    outputs = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    inside: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            timer = UNetTimer(modules[name], device) if modules else None
            synchronize(device)
            start = time.perf_counter()
            outputs[name] = fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if timer:
                inside[name].append(timer.total)
                timer.remove()
    out = {}
    for name in names:
        out[name] = {"median_s": statistics.median(times[name]), "min_s": min(times[name]), "output": outputs[name],
                     "repeats": repeats, "first_s": first.get(name, float("nan"))}
        if modules:
            shares = [1.0 - u / t for u, t in zip(inside[name], times[name])]
            out[name]["overhead"] = statistics.median(shares)
    return out


# ---------------------------------------------------------------------------------------- FLOPs, ceiling


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def machine_ceiling(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a large matrix product and a large 3x3 convolution (2 FLOPs per multiply-add)."""
    n = 4096 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    batch = 4 if device.type == "cpu" else 32
    x = torch.randn(batch, 320, 64, 64, device=device, dtype=dtype)
    w = torch.randn(320, 320, 3, 3, device=device, dtype=dtype)
    work = {
        "matmul": (lambda: a @ b, 2 * n ** 3),
        "conv3x3": (lambda: F.conv2d(x, w, padding=1), 2 * 9 * 320 * 320 * 64 * 64 * batch),
    }
    result = {}
    with torch.no_grad():
        for name, (fn, flops) in work.items():
            timing = time_interleaved({name: fn}, repeats, warmup=2, device=device)[name]
            del timing["output"], timing["repeats"], timing["first_s"]
            result[name] = flops / timing["min_s"]
    return result


# ---------------------------------------------------------------------------------------- peak memory


def _rss_peak_reset() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux clear_refs 5); returns the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def measure_memory_child(args: argparse.Namespace) -> None:
    """Child-process entry: run one task of one implementation once and print its peak memory (MiB)."""
    device = torch.device(args.device)
    workload = workloads()[args.memory_workload]
    pair = build_pair(workload, device, args.ours_options, args.diffusers_channels_last)
    impl, task, batch = args.memory_impl, args.memory_task, args.memory_batch
    # The other implementation stays built: it is part of the baseline, and only growth is measured.
    inp = make_inputs(workload, batch, device)
    fns = sample_fns(pair, inp, steps=2) if task == "sample" else TASKS[task](pair, inp)
    gc.collect()
    with precision_context(args, device):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fns[impl]()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_peak_reset() * 1024
            fns[impl]()
            peak = _status_kib("VmHWM") * 1024 - base
    print(json.dumps({"peak_mib": peak / 2 ** 20}))


def measure_memory(args: argparse.Namespace, workload: str, task: str, batch: int, impl: str) -> float:
    cmd = [sys.executable, __file__, "--device", args.device, "--precision", args.precision,
           "--ours-options", ",".join(args.ours_options) or "none", "--memory-workload", workload, "--memory-task", task,
           "--memory-batch", str(batch), "--memory-impl", impl]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


# --------------------------------------------------------------------------------------------- the run


def precision_context(args: argparse.Namespace, device: torch.device):
    if args.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[args.precision])


def precision_errors(pair: Pair, inp: Inputs) -> dict[str, float]:
    """Largest |output under autocast − float32 output| of one forward, relative to the output's scale."""
    fns = forward_fns(pair, inp)
    with torch.autocast(inp.x.device.type, enabled=False):
        exact = {impl: fn().float() for impl, fn in fns.items()}
    return {impl: ((fn().float() - exact[impl]).abs().max() / exact[impl].abs().max()).item()
            for impl, fn in fns.items()}


def run_workload(args: argparse.Namespace, workload: Workload, device: torch.device,
                 ceiling: float) -> list[dict]:
    pair = build_pair(workload, device, args.ours_options, args.diffusers_channels_last)
    rows = []
    for task in args.tasks:
        batches = workload.sample_batches if task == "sample" else workload.batches
        for batch in batches:
            inp = make_inputs(workload, batch, device)
            with precision_context(args, device):
                fns = TASKS[task](pair, inp)
                modules = {"ours": pair.unet, "diffusers": pair.diffusers} if task == "sample" else None
                repeats = args.repeats if task != "sample" else max(3, args.repeats // 3)
                # Sampling warms up on 2-step loops: the same kernels and shapes as the 50-step loop.
                warmup_fns = sample_fns(pair, inp, steps=2) if task == "sample" else None
                timings = time_interleaved(fns, repeats, 2, device, modules, warmup_fns, args.min_seconds)
                repeats = timings["ours"].pop("repeats")
                if task in ("forward", "sample"):
                    # Same work: the two outputs (a U-Net output, or the final latents) must agree.
                    a, b = (timings[impl]["output"].float() for impl in ("ours", "diffusers"))
                    diff = ((a - b).abs().max() / b.abs().max()).item()
                    print(f"  {workload.name} {task} b{batch}: ours and diffusers differ by {diff:.1e} (relative)")
                if task == "forward" and args.precision != "fp32":
                    errors = precision_errors(pair, inp)
                flops = {}
                if task in ("forward", "train"):
                    flops = {impl: count_flops(fn) for impl, fn in fns.items()}
            for impl in ("ours", "diffusers"):
                timings[impl].pop("output", None)
                timings[impl].pop("repeats", None)
                if task == "forward" and args.precision != "fp32":
                    timings[impl]["error_vs_fp32"] = errors[impl]
                row = {
                    "stage": args.stage, "device": device.type, "precision": args.precision,
                    "ours_options": "+".join(args.ours_options) or "-", "workload": workload.name, "task": task,
                    "batch": batch, "impl": impl, "repeats": repeats, **timings[impl],
                    "ratio": timings["ours"]["median_s"] / timings["diffusers"]["median_s"],
                }
                if flops:
                    row["gflop"] = flops[impl] / 1e9
                    row["ceiling_fraction"] = flops[impl] / timings[impl]["median_s"] / ceiling
                if args.memory:
                    row["peak_mib"] = measure_memory(args, workload.name, task, batch, impl)
                rows.append(row)
                print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("stage", "device")))
    return rows


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Forward time against batch size (latents 32x32) and against latent size (batch 1), large workload."""
    base = workloads()["large"]
    rows = []
    points = [("batch", b, base.latent) for b in (1, 2, 4, 8)]
    points += [("resolution", 1, r) for r in (16, 32, 48, 64)]
    pair = build_pair(base, device, args.ours_options, args.diffusers_channels_last)
    for axis, batch, latent in points:
        workload = Workload(base.name, base.unet, latent, base.context, (batch,), (), base.note)
        inp = make_inputs(workload, batch, device)
        with precision_context(args, device):
            timings = time_interleaved(forward_fns(pair, inp), max(3, args.repeats // 2), 1, device)
        for impl, t in timings.items():
            for key in ("output", "repeats", "first_s"):
                t.pop(key)
            rows.append({"axis": axis, "batch": batch, "latent": latent, "impl": impl, **t})
        print(f"  sweep {axis}: batch {batch}, {latent}x{latent}: ours {timings['ours']['median_s']:.3f} s, "
              f"diffusers {timings['diffusers']['median_s']:.3f} s")
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def machine_info(device: torch.device) -> dict:
    import diffusers
    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------ output


CSV_FIELDS = ["stage", "device", "precision", "ours_options", "workload", "task", "batch", "impl", "repeats",
              "median_s", "min_s", "first_s", "ratio", "overhead", "gflop", "ceiling_fraction", "peak_mib",
              "error_vs_fp32"]


def merge_rows(path: Path, rows: list[dict], stage: str, device: str) -> list[dict]:
    """The CSV's rows of other (stage, device) runs, then this run's."""
    kept = []
    if path.exists():
        with open(path) as f:
            kept = [r for r in csv.DictReader(f) if (r["stage"], r["device"]) != (stage, device)]
    merged = kept + [{k: _fmt(r[k]) if k in r else "" for k in CSV_FIELDS} for r in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(merged)
    return merged


ANALYSIS_MARKER = "<!-- analysis: written by hand, kept when the bench rewrites the tables above -->"


def write_markdown(path: Path, rows: list[dict], meta: dict) -> None:
    analysis = ""
    if path.exists() and ANALYSIS_MARKER in path.read_text():
        analysis = path.read_text().split(ANALYSIS_MARKER, 1)[1]
    lines = ["# Performance: ours against diffusers on identical weights", "",
             "Written by `bench/performance.py` (its docstring says what each task times). Times are medians "
             "of interleaved repeats in one process; ratio = ours / diffusers (below 1: ours is faster). "
             "overhead = share of the sampling loop outside U-Net calls. of ceiling = achieved FLOP/s over "
             "the faster of a large matmul and a large conv measured in the same run.", ""]
    runs = sorted({(r["stage"], r["device"]) for r in rows}, key=lambda sd: meta.get(f"{sd[0]}/{sd[1]}", {}).get(
        "when", ""))
    for stage, device in runs:
        info = meta.get(f"{stage}/{device}", {})
        lines += [f"## {stage} ({device})", ""]
        if info:
            m = info["machine"]
            ceiling = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in info["ceiling"].items())
            lines += [f"{info['when']}; {m.get('gpu', m['cpu'])}, {m['threads']} threads; torch {m['torch']}, "
                      f"diffusers {m['diffusers']}; precision {info['precision']}; ours' options: "
                      f"{info['ours_options'] or 'none'}; diffusers "
                      f"{'channels-last' if info.get('diffusers_channels_last') else 'as it comes'}. "
                      f"Ceiling: {ceiling}.", ""]
            if info.get("note"):
                lines += [info["note"], ""]
        mine = [r for r in rows if (r["stage"], r["device"]) == (stage, device)]
        # Compile time (the first call) where ours is compiled; the error against float32 under autocast.
        extra = [("first_s", "first call s")] if "compile" in mine[0]["ours_options"] else []
        extra += [("error_vs_fp32", "error vs fp32")] if mine[0]["precision"] != "fp32" else []
        extra_head = "".join(f" ours {name} | diffusers {name} |" for _, name in extra)
        lines += ["| workload | task | batch | ours s | diffusers s | ratio | ours overhead | diffusers overhead "
                  "| ours of ceiling | diffusers of ceiling | ours peak MiB | diffusers peak MiB |" + extra_head,
                  "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(extra))]
        keys = []
        for r in mine:
            key = (r["workload"], r["task"], r["batch"])
            if key not in keys:
                keys.append(key)
        for key in keys:
            pair = {r["impl"]: r for r in mine if (r["workload"], r["task"], r["batch"]) == key}
            o, d = pair["ours"], pair["diffusers"]

            def cell(r: dict, k: str, pct: bool = False) -> str:
                if r.get(k) in ("", None):
                    return ""
                v = float(r[k])
                return f"{100 * v:.1f} %" if pct else f"{v:.4g}"

            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {cell(o, 'median_s')} | {cell(d, 'median_s')} | "
                         f"**{float(o['ratio']):.2f}** | {cell(o, 'overhead', True)} | {cell(d, 'overhead', True)} | "
                         f"{cell(o, 'ceiling_fraction', True)} | {cell(d, 'ceiling_fraction', True)} | "
                         f"{cell(o, 'peak_mib')} | {cell(d, 'peak_mib')} |"
                         + "".join(f" {cell(o, k)} | {cell(d, k)} |" for k, _ in extra))
        lines.append("")
    lines += ["## Workloads", ""] + [f"- {w.name}: {w.note}" for w in workloads().values()] + [""]
    path.write_text("\n".join(lines) + "\n" + ANALYSIS_MARKER + (analysis or "\n"))


def plot_sweep(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, xkey, xlabel in ((axes[0], "batch", "batch", "batch size (32x32x4 latents)"),
                                   (axes[1], "resolution", "latent", "latent side (batch 1)")):
        for impl, style in (("ours", "o-"), ("diffusers", "s--")):
            pts = [(r[xkey], r["median_s"]) for r in rows if r["axis"] == axis and r["impl"] == impl]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("U-Net forward, s")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", default="adhoc", help="label of this run's rows (e.g. baseline, final)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                        help="autocast dtype for both implementations (weights stay float32)")
    parser.add_argument("--workloads", default=None, help="comma list of " + ", ".join(workloads()))
    parser.add_argument("--tasks", default="forward,train,train_same_optimizer,sample",
                        help="comma list of " + ", ".join(TASKS))
    parser.add_argument("--ours-options", default=",".join(DEFAULT_SPEED_OPTIONS),
                        help="ours' speed_options, a comma list of " + ", ".join(SPEED_OPTIONS) +
                        " or 'none' (default: the toolkit's default, %(default)s)")
    parser.add_argument("--diffusers-channels-last", action="store_true",
                        help="put diffusers' U-Net in channels-last memory format too")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats (sampling: a third, at least 3)")
    parser.add_argument("--min-seconds", type=float, default=10.0,
                        help="repeat short calls until each side has run this long (more repeats, less noise)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--sweep", action="store_true", help="also time forward against batch and resolution")
    parser.add_argument("--quick", action="store_true", help="smoke run: txt2img size, 3 repeats, no memory")
    parser.add_argument("--note", default="", help="a sentence recorded with this run (what changed)")
    parser.add_argument("--outdir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite performance.md from the CSV and JSON in --outdir")
    for name in ("workload", "task", "batch", "impl"):
        parser.add_argument(f"--memory-{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.ours_options = tuple(o for o in args.ours_options.split(",") if o and o != "none")
    if args.memory_impl:
        args.memory_batch = int(args.memory_batch)
        return measure_memory_child(args)
    if args.report_only:
        meta = json.loads((args.outdir / "performance.json").read_text())
        with open(args.outdir / "performance.csv") as f:
            write_markdown(args.outdir / "performance.md", list(csv.DictReader(f)), meta)
        return None
    if args.quick:
        args.workloads, args.repeats, args.min_seconds, args.memory = args.workloads or "txt2img", 3, 1.0, False
    device = torch.device(args.device)
    names = (args.workloads or ("1p4b" if device.type == "cuda" else "txt2img,large")).split(",")
    args.tasks = args.tasks.split(",")
    unknown = [t for t in args.tasks if t not in TASKS] + [w for w in names if w not in workloads()]
    if unknown:
        parser.error(f"unknown task or workload: {', '.join(unknown)}")

    dtype = DTYPES[args.precision]
    print(f"ceiling ({device}, {args.precision}) ...")
    ceiling = machine_ceiling(device, dtype)
    print("  " + ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in ceiling.items()))
    rows = []
    for name in names:
        print(f"{name} ...")
        rows += run_workload(args, workloads()[name], device, max(ceiling.values()))

    args.outdir.mkdir(parents=True, exist_ok=True)
    meta_path = args.outdir / "performance.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta[f"{args.stage}/{device.type}"] = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(device), "precision": args.precision,
        "ours_options": "+".join(args.ours_options), "ceiling": ceiling, "note": args.note,
        "diffusers_channels_last": args.diffusers_channels_last,
    }
    if args.sweep:
        sweep_rows = sweep(args, device)
        meta[f"{args.stage}/{device.type}"]["sweep"] = sweep_rows
        plot_sweep(args.outdir / f"performance{'' if device.type == 'cpu' else '_' + device.type}.png", sweep_rows,
                   f"U-Net forward, {args.precision}, {device.type} ({args.stage})")
    merged = merge_rows(args.outdir / "performance.csv", rows, args.stage, device.type)
    meta_path.write_text(json.dumps(meta, indent=1))
    write_markdown(args.outdir / "performance.md", merged, meta)
    print(f"wrote {args.outdir}/performance.{{csv,md,json}}")


if __name__ == "__main__":
    main()
