"""Benchmark: the samplers against the number of model evaluations, on the built-in shapes models.

    python bench/sampling.py                   # the built-in txt2img and inpainting models (~15 min, 2 CPU cores)
    python bench/sampling.py --quick           # smoke run (~1 min): few samples, 5 and 10 steps, no ddpm
    python bench/sampling.py --config logs/<run>/configs/<time>-project.yaml --ckpt logs/<run>/checkpoints/last.ckpt
    python bench/sampling.py --device cuda     # on a GPU --n defaults to 1000 (16 on the CPU): far tighter figures

Text-to-image: each sampler (ddim, plms, euler_a, heun, dpmpp_2m at each of --steps, and ancestral DDPM at
all T steps as the reference) at each classifier-free guidance scale draws one image per caption of two
prompt sets, with the same seeds in every configuration:
- "seen": captions of validation items (every colour-shape pair occurred in training);
- "heldout": captions of test items (each names a colour-shape pair that never occurred in training).
Each set is scored by the built-in attribute classifier (ldm.evaluation.attribute_classifier):
- match: the share of images whose every stated attribute matches the caption (and per attribute);
- FID: the Fréchet distance between the classifier's penultimate features of the samples and of --n-real
  real images of the same split (torchmetrics' FrechetInceptionDistance with the classifier as its feature
  network). FID is biased upwards when few samples are drawn (roughly by the feature width over n), so
  compare rows with each other and with the "real images" row, which is the figure for n real images.

Inpainting: test images with their built-in masks (1 = fill) are completed by the inpainting model (its
condition is the masked image; guidance 1) and, for comparison, by the txt2img model keeping the known
latents at every step with the caption as its prompt (guidance 1). Scored: the caption match and FID of
the completed images, the mean absolute error and PSNR inside the mask against the original (pixel scale
[0, 1]; the original is one of many plausible completions, so these measure closeness, not quality), and
the largest change outside the mask, which must be 0.

Model evaluations: "U-Net calls" counts the network's forward passes in one sampling run, measured with a
forward hook (the sequential cost, what "NFE" means in sampler papers): ddim, euler_a and dpmpp_2m make
one per step, plms one more (its first step is a pseudo improved-Euler step), heun two per step but one on
the last (Euler to σ = 0), ddpm T. A guided call carries the conditional and unconditional halves as one
doubled batch, so "U-Net evaluations per sample" is twice the calls when guidance > 1.

Writes to --outdir (default bench/results): sampling.csv (one row per configuration and prompt set),
sampling.md (tables), sampling.png (quality against U-Net calls) and sampling.json (settings, machine).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.data.shapes import ShapesTest, ShapesValidation  # noqa: E402
from ldm.evaluation.attribute_classifier import AttributeClassifier, load_attribute_classifier  # noqa: E402
from ldm.evaluation.prompt_following import prompt_match  # noqa: E402
from ldm.evaluation.reconstruction import dataset_images  # noqa: E402
from ldm.inference import inpaint, load_model, reads_prompts, resolve_device, text_to_image  # noqa: E402
from ldm.models.diffusion.samplers import SAMPLERS as REGISTRY  # noqa: E402
from ldm.script_args import PRECISION_ALIASES, add_model_args  # noqa: E402

RESULTS = REPO / "bench" / "results"
REFERENCE_SAMPLER = "ddpm"  # ancestral sampling through all T steps (DDPM Algorithm 2)
SAMPLERS = list(REGISTRY)
STEPPED_SAMPLERS = tuple(s for s in SAMPLERS if s != REFERENCE_SAMPLER)
SPLITS = {"seen": ShapesValidation, "heldout": ShapesTest}
SPLIT_TITLES = {"seen": "seen pairs", "heldout": "held-out pairs"}
TASKS = ("txt2img", "inpainting")
# Task names of the rows: the two ways of inpainting, and the real images scored like samples.
INPAINTING_MODEL, TXT2IMG_KEEP_KNOWN, REAL = "inpainting", "txt2img-keep-known", "real"
MEAN_FILL = "mean-colour-fill"
# What the other text-to-image rows are (a model named by --txt2img-task), for the tables' titles.
TEXT_TASK_NOTES = {"txt2img-flow": "flow matching, configs/latent-diffusion/txt2img_flow.yaml; see convergence.md"}  # the trivial inpainting baseline: each hole filled with its image's mean known colour
METRIC_ATTRIBUTES = ("shape", "colour", "size", "position", "num_objects")

# --n by device: about 15 minutes for the whole grid on 2 CPU cores; on a GPU the cost is per call, not per
# sample, so many more samples cost little more time.
DEFAULT_N = {"cpu": 16, "cuda": 1000}
DEFAULTS = {"n_real": 2000, "steps": [5, 10, 20, 50, 200], "samplers": list(SAMPLERS)}
QUICK = {"n": 4, "n_real": 256, "steps": [5, 10], "samplers": list(STEPPED_SAMPLERS)}
# A U-Net call costs about this many batch rows of work besides its rows (per-call overhead, measured on
# CPU with the built-in model); only the ETA uses it.
CALL_OVERHEAD_ROWS = 8


# ------------------------------------------------------------------------------------------- FID


class ClassifierFeatures(nn.Module):
    """The attribute classifier's penultimate features, as the feature network of torchmetrics' FID.

    torchmetrics reads the feature width from `num_features`; without it, it would probe the module with a
    dummy uint8 image of 3x299x299. Both image conventions are accepted: float in [-1, 1] (this repository's)
    and uint8 in [0, 255] (torchmetrics'), at any size (the classifier resizes to its 32x32).
    """

    def __init__(self, classifier: AttributeClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.config["hidden"])

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        # The classifier's BatchNorm must keep its running statistics: features in training mode would
        # depend on the batch.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        return self.classifier.features(images)


def classifier_fid(classifier: AttributeClassifier, real_images: torch.Tensor,
                   batch_size: int = 500) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance in the classifier's feature space holding `real_images`' statistics.

    The real statistics survive `reset()` (reset_real_features=False), so one metric scores many sets of
    samples against the same real images: `fid_against_real(metric, samples)`.
    """
    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), reset_real_features=False)
    metric = metric.to(classifier.head.weight.device)
    for images in real_images.split(batch_size):
        metric.update(images.to(metric.device), real=True)
    return metric


def fid_against_real(metric: FrechetInceptionDistance, images: torch.Tensor, batch_size: int = 500) -> float:
    """FID of `images` (NCHW in [-1, 1]) against the real images `metric` was made with."""
    metric.reset()
    for chunk in images.split(batch_size):
        metric.update(chunk.to(metric.device), real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------------------ evaluations


def expected_unet_calls(sampler: str, steps: int, num_timesteps: int) -> int:
    """U-Net calls of one sampling run (see the module docstring for why each sampler costs what it does).

    ddim and plms visit the reference's uniform subsequence of the T timesteps, every T // steps: that is
    `steps` timesteps when steps divides T, and can be more otherwise (see `make_ddim_timesteps`)."""
    if sampler not in REGISTRY:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    return REGISTRY[sampler].evals(steps, num_timesteps)


class UNetCallCounter:
    """Counts a diffusion model's U-Net forward passes and the batch rows they carry, while in a `with`."""

    def __init__(self, model: nn.Module) -> None:
        self.unet = model.model.diffusion_model
        self.calls = 0
        self.rows = 0
        self._handle = None

    def _count(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.calls += 1
        self.rows += inputs[0].shape[0]

    def __enter__(self) -> "UNetCallCounter":
        self._handle = self.unet.register_forward_hook(self._count)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------------------ data


@dataclass
class PromptSet:
    """Real items of one split: the captions to sample from, their images and (test split) masks."""

    split: str
    captions: list[str]
    images: torch.Tensor  # NCHW in [-1, 1]
    masks: Optional[torch.Tensor] = None  # N1HW, 1 = fill


def prompt_set(split: str, start: int, stop: int, with_mask: bool = False) -> PromptSet:
    """Items start..stop of a split at the models' 32x32 (dataset seed 0)."""
    data = SPLITS[split](size=32, num_samples=stop, with_mask=with_mask)
    items = [data[i] for i in range(start, stop)]
    masks = torch.stack([torch.as_tensor(item["mask"]) for item in items]).permute(0, 3, 1, 2) if with_mask else None
    return PromptSet(split, [item["caption"] for item in items], dataset_images(data, start, stop), masks)


# --------------------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of sampling.csv: a configuration run on one prompt set. Shares (match_*) are in [0, 1];
    the masked-region columns are filled for the inpainting tasks only."""

    task: str  # "txt2img" (or --txt2img-task), "inpainting", "txt2img-keep-known" or "real"
    split: str
    sampler: str
    steps: int
    scale: float
    unet_calls: int
    unet_evaluations_per_sample: float
    n: int
    wall_s: float
    match_all: float
    match_shape: float
    match_colour: float
    match_size: float
    match_position: float
    match_num_objects: float
    fid: float
    mae_masked: float = math.nan
    psnr_masked: float = math.nan
    known_max_abs_error: float = math.nan


def masked_region_errors(completed: torch.Tensor, original: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """MAE and PSNR inside the masks (pixel scale [0, 1], per image then averaged), and the largest
    absolute change outside them (pixel scale [-1, 1], as the images)."""
    fill = masks.expand_as(original).bool()
    difference = (completed - original) / 2.0  # [-1, 1] -> [0, 1] scale
    per_image_pixels = fill.flatten(1).sum(1).clamp(min=1)
    mae = (difference.abs() * fill).flatten(1).sum(1) / per_image_pixels
    mse = (difference ** 2 * fill).flatten(1).sum(1) / per_image_pixels
    psnr = 10.0 * torch.log10(1.0 / mse.clamp(min=1e-10))
    outside = (completed - original).abs()[~fill]
    return {"mae_masked": float(mae.mean()), "psnr_masked": float(psnr.mean()),
            "known_max_abs_error": float(outside.max()) if outside.numel() else 0.0}


def score(classifier: AttributeClassifier, fid_metric: FrechetInceptionDistance, images: torch.Tensor,
          captions: Sequence[str]) -> dict[str, float]:
    """Caption match (all attributes and each) and FID of `images` against the metric's real images."""
    match = prompt_match(classifier, images.to(classifier.head.weight.device), captions)
    return {"match_all": match["all"], **{f"match_{name}": match[name] for name in METRIC_ATTRIBUTES},
            "fid": fid_against_real(fid_metric, images)}


def mean_colour_fill(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`images` (NCHW) with each hole (masks N1HW, 1 = fill) filled with the mean colour of its image's known pixels."""
    keep = 1.0 - masks
    mean = (images * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp(min=1.0)
    return images * keep + mean * masks


def mean_fill_row(classifier: AttributeClassifier, fid_metric: FrechetInceptionDistance, prompts: PromptSet) -> Row:
    """The mean-colour fill scored as the inpainting models are: the bar an inpainting model must clear."""
    images = mean_colour_fill(prompts.images, prompts.masks)
    return Row(task=MEAN_FILL, split=prompts.split, sampler="", steps=0, scale=math.nan, unet_calls=0,
               unet_evaluations_per_sample=0.0, n=len(prompts.captions), wall_s=0.0,
               **score(classifier, fid_metric, images, prompts.captions),
               **masked_region_errors(images, prompts.images, prompts.masks))


def real_row(classifier: AttributeClassifier, fid_metric: FrechetInceptionDistance, prompts: PromptSet) -> Row:
    """The real images of a prompt set scored as if they were samples: the ceiling of match and floor of FID."""
    return Row(task=REAL, split=prompts.split, sampler="", steps=0, scale=math.nan, unet_calls=0,
               unet_evaluations_per_sample=0.0, n=len(prompts.captions), wall_s=0.0,
               **score(classifier, fid_metric, prompts.images, prompts.captions))


# -------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Configuration:
    task: str
    sampler: str
    steps: int  # T for ddpm
    scale: float

    def label(self) -> str:
        return f"{self.task:<18} {self.sampler:<8} {self.steps:>4} steps  scale {self.scale:g}"


def _chunks(n: int, batch_size: int) -> Iterator[tuple[int, slice]]:
    """(chunk index, slice) over n items; the index seeds the chunk, so every configuration sees the same noise."""
    for index, start in enumerate(range(0, n, batch_size)):
        yield index, slice(start, min(n, start + batch_size))


@torch.no_grad()
def run_configuration(model: nn.Module, config: Configuration, prompts: PromptSet, *, seed: int,
                      batch_size: int) -> tuple[torch.Tensor, int, float, float]:
    """(images, U-Net calls per sampling run, U-Net evaluations per sample, wall seconds) of one configuration."""
    common = {"sampler": config.sampler, "steps": config.steps, "scale": config.scale, "progress": False}
    outputs = []
    start = time.perf_counter()
    with UNetCallCounter(model) as counter:
        for index, part in _chunks(len(prompts.captions), batch_size):
            if is_text_task(config.task):
                images = text_to_image(model, prompts.captions[part], seed=seed + index, **common)
            else:
                captions = prompts.captions[part] if reads_prompts(model) else None
                images = inpaint(model, prompts.images[part], prompts.masks[part], captions, seed=seed + index,
                                 **common)
            outputs.append(images.float().cpu())
    wall = time.perf_counter() - start
    runs = math.ceil(len(prompts.captions) / batch_size)
    return torch.cat(outputs), counter.calls // runs, counter.rows / len(prompts.captions), wall


@torch.no_grad()
def warm_up(model: nn.Module, prompts: PromptSet, sampler: str) -> None:
    """A short run on two items, so that one-time costs (allocator, kernel selection) stay out of the first row's time."""
    if prompts.masks is not None:
        inpaint(model, prompts.images[:2], prompts.masks[:2], sampler=sampler, steps=2, progress=False)
    else:
        text_to_image(model, prompts.captions[:2], sampler=sampler, scale=3.0, steps=2, progress=False)


class Progress:
    """Prints one line per configuration with the elapsed time and an ETA weighted by U-Net work."""

    def __init__(self, total_work: float, total: int) -> None:
        self.total_work, self.total, self.done_work, self.done = total_work, total, 0.0, 0
        self.start = time.perf_counter()

    def step(self, work: float, message: str) -> None:
        self.done_work += work
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done_work * (self.total_work - self.done_work) if self.done_work else math.nan
        print(f"[{self.done:>4}/{self.total}] {message}  | elapsed {_clock(elapsed)}, ETA {_clock(eta)}", flush=True)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _work(config: Configuration, n: int, num_timesteps: int, guided: bool) -> float:
    calls = expected_unet_calls(config.sampler, config.steps, num_timesteps)
    return calls * ((2 if guided else 1) * n + CALL_OVERHEAD_ROWS)


def configurations(opt: argparse.Namespace, num_timesteps: int) -> list[Configuration]:
    """Every configuration to run, txt2img first; ddpm once per scale (at its T steps)."""
    def grid(task: str, scales: Sequence[float]) -> list[Configuration]:
        out = []
        for scale in scales:
            for sampler in opt.samplers:
                steps_list = [num_timesteps] if sampler == REFERENCE_SAMPLER else opt.steps
                out += [Configuration(task, sampler, steps, float(scale)) for steps in steps_list]
        return out

    configs = grid(opt.txt2img_task, opt.scales) if "txt2img" in opt.tasks else []
    if "inpainting" in opt.tasks:
        configs += grid(INPAINTING_MODEL, [1.0]) + grid(TXT2IMG_KEEP_KNOWN, [1.0])
    return configs


# --------------------------------------------------------------------------------------- outputs


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        fields = [field.name for field in dataclasses.fields(Row)]
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_csv_value(getattr(row, name)) for name in fields])


def read_csv(path: Path) -> list[Row]:
    """The rows of an earlier sampling.csv (empty cells are NaN, as `write_csv` writes NaN)."""
    casts = {"str": str, "int": int, "float": lambda v: math.nan if v == "" else float(v)}
    types = {field.name: casts[field.type] for field in dataclasses.fields(Row)}
    with open(path, newline="") as f:
        return [Row(**{k: types[k](v) for k, v in record.items()}) for record in csv.DictReader(f)]


def is_text_task(task: str) -> bool:
    """Rows of a text-to-image model sampled from captions ("txt2img", or the name --txt2img-task gave it)."""
    return task.startswith("txt2img") and task != TXT2IMG_KEEP_KNOWN


def task_group(row: Row) -> str:
    """The --tasks entry that produces a row (real-image rows belong to every run); a text-to-image model's
    rows go by their own task name, so several models' rows live side by side."""
    return "inpainting" if row.task in (INPAINTING_MODEL, TXT2IMG_KEEP_KNOWN, MEAN_FILL) else row.task


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _find(rows: Sequence[Row], **keys: object) -> Optional[Row]:
    for row in rows:
        if all(getattr(row, k) == v for k, v in keys.items()):
            return row
    return None


def _cell(row: Optional[Row]) -> str:
    return "" if row is None else f"{100 * row.match_all:.0f}% / {row.fid:.3g}"


def _sampler_steps(rows: Sequence[Row], task: str) -> list[tuple[str, int, int]]:
    """(sampler, steps, U-Net calls) of a task's rows in sampler order, then steps."""
    seen = {(r.sampler, r.steps): r.unet_calls for r in rows if r.task == task}
    order = {s: i for i, s in enumerate(SAMPLERS)}
    return sorted(((s, k, c) for (s, k), c in seen.items()), key=lambda x: (order[x[0]], x[1]))


def markdown(rows: Sequence[Row], settings: dict) -> str:
    lines = ["# Samplers: prompt following and Fréchet distance against model evaluations", "",
             f"Generated by `python bench/sampling.py` on {settings['machine']['description']} "
             f"in {settings['wall_seconds'] / 60:.1f} min. Models: txt2img `{settings['txt2img_model']}`, "
             f"inpainting `{settings['inpainting_model']}`.", "",
             "Each cell: **all-attribute match** (share of samples whose every stated attribute the classifier reads "
             "as the caption says) / **FID** in the attribute classifier's feature space against "
             f"{settings['n_real']} real images of the same split. Prompt sets: {settings['n']} captions per split "
             "(seen: validation, every colour-shape pair seen in training; held-out: test, each names a held-out "
             "pair); the same captions and seeds in every row. FID with few samples is biased upwards: the "
             "'real images' row is the figure for the same number of real images.", "",
             "**U-Net calls** = network forward passes per sampling run (NFE). With guidance > 1 each call carries "
             "a doubled batch (conditional + unconditional), so the evaluations per sample are twice the calls.", ""]
    text_tasks = sorted({r.task for r in rows if is_text_task(r.task)}, key=lambda t: (t != "txt2img", t))
    for task in text_tasks:
        scales = sorted({r.scale for r in rows if r.task == task})
        header = ["sampler", "steps", "U-Net calls"] + [f"g={s:g} {SPLIT_TITLES[split]}" for s in scales
                                                       for split in SPLITS]
        title = "## Text to image" if task == "txt2img" else f"## Text to image: `{task}` ({TEXT_TASK_NOTES.get(task, '')})"
        lines += [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        reals = [_cell(_find(rows, task=REAL, split=split)) for split in SPLITS]
        lines.append("| real images | | | " + " | ".join(reals * len(scales)) + " |")
        for sampler, steps, calls in _sampler_steps(rows, task):
            cells = [_cell(_find(rows, task=task, sampler=sampler, steps=steps, scale=s, split=split))
                     for s in scales for split in SPLITS]
            lines.append(f"| {sampler} | {steps} | {calls} | " + " | ".join(cells) + " |")
        lines.append("")
    inpainting_rows = [r for r in rows if r.task in (INPAINTING_MODEL, TXT2IMG_KEEP_KNOWN)]
    if inpainting_rows:
        lines += ["## Inpainting (held-out test images, built-in masks, guidance 1)", "",
                  "Per model: all-attribute match of the completed image against the original caption / FID of the "
                  "completed images / MAE and PSNR (dB) inside the mask against the original, on the [0, 1] scale. "
                  "`txt2img-keep-known`: the text-to-image model given the caption, keeping the known latents at "
                  "every step.", ""]
        header = ["sampler", "steps", "U-Net calls"] + [f"{task}: {m}" for task in (INPAINTING_MODEL, TXT2IMG_KEEP_KNOWN)
                                                       for m in ("match / FID", "MAE", "PSNR")]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        real = _find(rows, task=REAL, split="heldout")
        if real is not None:
            lines.append(f"| real images | | | {_cell(real)} | 0 | ∞ | {_cell(real)} | 0 | ∞ |")
        fill = _find(rows, task=MEAN_FILL)
        if fill is not None:
            lines.append(f"| mean-colour fill | | | {_cell(fill)} | {fill.mae_masked:.3f} | {fill.psnr_masked:.1f} | | | |")
        keys = sorted(set(_sampler_steps(rows, INPAINTING_MODEL)) | set(_sampler_steps(rows, TXT2IMG_KEEP_KNOWN)),
                      key=lambda x: (SAMPLERS.index(x[0]), x[1]))
        for sampler, steps, calls in keys:
            cells = []
            for task in (INPAINTING_MODEL, TXT2IMG_KEEP_KNOWN):
                row = _find(rows, task=task, sampler=sampler, steps=steps)
                cells += ["", "", ""] if row is None else [_cell(row), f"{row.mae_masked:.3f}", f"{row.psnr_masked:.1f}"]
            lines.append(f"| {sampler} | {steps} | {calls} | " + " | ".join(cells) + " |")
        worst = max(r.known_max_abs_error for r in inpainting_rows)
        lines += ["", f"Known region: the largest change outside the mask over all inpainting runs is {worst:.3g} "
                  f"({'exact' if worst == 0 else 'NOT exact'})."]
    lines += ["", "Per-attribute match, wall seconds and the exact call counts are in `sampling.csv`; the plot is "
              "`sampling.png`.", ""]
    return "\n".join(lines)


def write_plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    scales = sorted({r.scale for r in rows if r.task == "txt2img"})
    inpainting = any(r.task == INPAINTING_MODEL or r.task == TXT2IMG_KEEP_KNOWN for r in rows)
    columns = len(scales) + int(inpainting)
    fig, axes = plt.subplots(2, columns, figsize=(3.8 * columns, 7), squeeze=False)
    for col in range(1, len(scales)):  # one y scale across the guidance panels (inpainting has its own)
        for row in range(2):
            axes[row, col].sharey(axes[row, 0])
    colours = {sampler: f"C{i}" for i, sampler in enumerate(SAMPLERS)}

    def draw(col: int, task: str, scale: Optional[float], split: str, style: str) -> None:
        for sampler in SAMPLERS:
            points = sorted((r.unet_calls, 100 * r.match_all, r.fid) for r in rows
                            if r.task == task and r.sampler == sampler and r.split == split
                            and (scale is None or r.scale == scale))
            if not points:
                continue
            calls, match, fid = zip(*points)
            marker = "*" if sampler == REFERENCE_SAMPLER else "o"
            size = 12 if sampler == REFERENCE_SAMPLER else 4
            for row, values in ((0, match), (1, fid)):
                axes[row, col].plot(calls, values, style, color=colours[sampler], marker=marker, markersize=size)

    real_styles = {"seen": ":", "heldout": "-."}

    def real_lines(col: int, splits: Sequence[str]) -> None:
        for split in splits:
            real, style = _find(rows, task=REAL, split=split), real_styles[split]
            if real is not None:
                axes[0, col].axhline(100 * real.match_all, color="0.5", ls=style, lw=1)
                axes[1, col].axhline(real.fid, color="0.5", ls=style, lw=1)

    for col, scale in enumerate(scales):
        for split, style in zip(SPLITS, ("-", "--")):
            draw(col, "txt2img", scale, split, style)
        real_lines(col, list(SPLITS))
        axes[0, col].set_title(f"text to image, guidance {scale:g}")
    if inpainting:
        col = columns - 1
        for task, style in ((INPAINTING_MODEL, "-"), (TXT2IMG_KEEP_KNOWN, ":")):
            draw(col, task, None, "heldout", style)
        real_lines(col, ["heldout"])
        axes[0, col].set_title("inpainting, held-out images")
        axes[0, col].legend(handles=[Line2D([], [], color="k", ls="-", label="inpainting model"),
                                     Line2D([], [], color="k", ls=":", label="txt2img keeping known latents")],
                            fontsize=7, loc="best")
    for col in range(columns):
        axes[0, col].set_ylabel("all attributes match (%)")
        axes[1, col].set_ylabel("FID (classifier features)")
        for row in range(2):
            axes[row, col].set_xscale("log")
            axes[row, col].xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axes[row, col].xaxis.set_major_formatter(ScalarFormatter())
            axes[row, col].xaxis.set_minor_formatter(NullFormatter())
            axes[row, col].set_xlabel("U-Net calls per sampling run")
            axes[row, col].grid(alpha=0.3, which="both")
    present = [s for s in SAMPLERS if any(r.sampler == s for r in rows)]
    handles = [Line2D([], [], color=colours[s], marker="*" if s == REFERENCE_SAMPLER else "o", ls="-", label=s)
               for s in present]
    handles += [Line2D([], [], color="k", ls="-", label="seen pairs"),
                Line2D([], [], color="k", ls="--", label="held-out pairs"),
                *[Line2D([], [], color="0.5", ls=style, label=f"real images ({SPLIT_TITLES[split]})")
                  for split, style in real_styles.items()]]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Samplers on the built-in shapes models: quality against model evaluations")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["description"] = info["gpu"]
    else:
        info["description"] = f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads)"
    return info


def versions() -> dict:
    import matplotlib
    import numpy
    import torchmetrics

    return {"python": platform.python_version(), "torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
            "numpy": numpy.__version__, "matplotlib": matplotlib.__version__}


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, default_model="txt2img")
    parser.add_argument("--inpaint-config", default="inpainting",
                        help="inpainting model: built-in name, directory or config .yaml (default: built-in 'inpainting')")
    parser.add_argument("--inpaint-ckpt", default=None, help="weights for --inpaint-config when it is a .yaml")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--txt2img-task", default="txt2img",
                        help="name of the text-to-image rows (e.g. txt2img-flow for another model: with --update its "
                             "rows join the csv beside the built-in model's, in their own table)")
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=None,
                        help=f"default: all ({' '.join(SAMPLERS)}); --quick: {' '.join(QUICK['samplers'])}")
    parser.add_argument("--steps", nargs="+", type=int, default=None,
                        help=f"steps of the stepped samplers (default {DEFAULTS['steps']}; --quick {QUICK['steps']})")
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 3.0, 5.0], help="text-to-image guidance scales")
    parser.add_argument("--n", type=int, default=None,
                        help=f"captions per prompt set (default {DEFAULT_N['cpu']} on the CPU, {DEFAULT_N['cuda']} "
                             f"on CUDA; --quick {QUICK['n']})")
    parser.add_argument("--n-inpaint", type=int, default=None, help="images to inpaint (default: --n)")
    parser.add_argument("--n-real", type=int, default=None,
                        help=f"real images per split for FID (default {DEFAULTS['n_real']}; --quick {QUICK['n_real']})")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="samples per sampling run: --n is drawn in chunks of this size (memory)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the sampling noise (same in every row)")
    parser.add_argument("--outdir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples, 5 and 10 steps, no ddpm")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of the tasks not run this time from --outdir's sampling.csv (re-measure "
                             "one task, e.g. after retraining one model, without rerunning the others)")
    opt = parser.parse_args(argv)
    opt.precision = PRECISION_ALIASES.get(opt.precision, opt.precision)
    opt.device = resolve_device(opt.device)
    if opt.n is None and not opt.quick:
        opt.n = DEFAULT_N["cuda" if opt.device.type == "cuda" else "cpu"]
    for key, value in (QUICK if opt.quick else DEFAULTS).items():
        if getattr(opt, key) is None:
            setattr(opt, key, value)
    if opt.n_inpaint is None:
        opt.n_inpaint = opt.n
    for name in ("n", "n_inpaint", "n_real", "batch_size"):
        if getattr(opt, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be at least 2 (FID needs two samples), got {getattr(opt, name)}")
    if any(s < 1 for s in opt.steps):
        parser.error(f"--steps must be positive, got {opt.steps}")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
    opt = parse_args(argv)
    device = opt.device
    started = time.perf_counter()
    txt2img_model = load_model(opt.config, opt.ckpt, device=device, precision=opt.precision)
    inpainting_model = (load_model(opt.inpaint_config, opt.inpaint_ckpt, device=device, precision=opt.precision)
                        if "inpainting" in opt.tasks else None)
    classifier = load_attribute_classifier(device=device)
    num_timesteps = txt2img_model.num_timesteps
    if inpainting_model is not None and inpainting_model.num_timesteps != num_timesteps:
        raise ValueError(f"the txt2img model has {num_timesteps} timesteps, the inpainting model "
                         f"{inpainting_model.num_timesteps}; this bench compares them on one schedule")

    # Real statistics first (FID references), then the prompt sets: items after the reference images.
    print(f"rendering {opt.n_real} real images per split for the FID references ...", flush=True)
    fid_metrics = {split: classifier_fid(classifier, prompt_set(split, 0, opt.n_real).images) for split in SPLITS}
    prompts = {split: prompt_set(split, opt.n_real, opt.n_real + opt.n) for split in SPLITS}
    inpaint_prompts = prompt_set("heldout", opt.n_real, opt.n_real + opt.n_inpaint, with_mask=True)
    rows = [real_row(classifier, fid_metrics[split], prompts[split]) for split in SPLITS]
    print("real images: " + ", ".join(f"{r.split} match {100 * r.match_all:.1f}% FID {r.fid:.3g}" for r in rows))
    if inpainting_model is not None:
        rows.append(mean_fill_row(classifier, fid_metrics["heldout"], inpaint_prompts))

    configs = configurations(opt, num_timesteps)
    warm_up(txt2img_model, prompts["seen"], configs[0].sampler)  # the first row's sampler: any process has one
    if inpainting_model is not None:
        warm_up(inpainting_model, inpaint_prompts, configs[0].sampler)
    guided = {c: is_text_task(c.task) and c.scale != 1.0 for c in configs}
    sets = {c: [prompts[s] for s in SPLITS] if is_text_task(c.task) else [inpaint_prompts] for c in configs}
    progress = Progress(sum(_work(c, len(p.captions), num_timesteps, guided[c]) for c in configs for p in sets[c]),
                        sum(len(sets[c]) for c in configs))
    for config in configs:
        model = inpainting_model if config.task == INPAINTING_MODEL else txt2img_model
        for prompt_set_ in sets[config]:
            images, calls, per_sample, wall = run_configuration(model, config, prompt_set_, seed=opt.sample_seed,
                                                                batch_size=opt.batch_size)
            metrics = score(classifier, fid_metrics[prompt_set_.split], images, prompt_set_.captions)
            if not is_text_task(config.task):
                metrics.update(masked_region_errors(images, prompt_set_.images, prompt_set_.masks))
            row = Row(task=config.task, split=prompt_set_.split, sampler=config.sampler, steps=config.steps,
                      scale=config.scale, unet_calls=calls, unet_evaluations_per_sample=per_sample,
                      n=len(prompt_set_.captions), wall_s=round(wall, 3), **metrics)
            rows.append(row)
            progress.step(_work(config, row.n, num_timesteps, guided[config]),
                          f"{config.label()}  {row.split:<7}: {calls:>4} calls, match {100 * row.match_all:5.1f}%, "
                          f"FID {row.fid:8.3g}, {wall:6.1f} s")

    opt.outdir.mkdir(parents=True, exist_ok=True)
    if opt.update and (opt.outdir / "sampling.csv").is_file():
        groups = {opt.txt2img_task if task == "txt2img" else task for task in opt.tasks}
        kept = [row for row in read_csv(opt.outdir / "sampling.csv")
                if row.task != REAL and task_group(row) not in groups]
        rows = rows[:len(SPLITS)] + kept + rows[len(SPLITS):]  # real rows, then the rest in task order
        rows = [r for r in rows if r.task != MEAN_FILL] + [r for r in rows if r.task == MEAN_FILL][-1:]
    settings = {
        "command": "python bench/sampling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "txt2img_model": str(opt.config) + (f" + {opt.ckpt}" if opt.ckpt else ""), "txt2img_task": opt.txt2img_task,
        "inpainting_model": (str(opt.inpaint_config) + (f" + {opt.inpaint_ckpt}" if opt.inpaint_ckpt else "")
                             if inpainting_model is not None else None),
        "num_timesteps": num_timesteps, "precision": opt.precision, "samplers": opt.samplers, "steps": opt.steps,
        "scales": opt.scales if "txt2img" in opt.tasks else [], "n": opt.n, "n_inpaint": opt.n_inpaint,
        "n_real": opt.n_real, "batch_size": opt.batch_size, "sample_seed": opt.sample_seed,
        "prompt_sets": {split: f"{SPLITS[split].__name__} items {opt.n_real}..{opt.n_real + opt.n - 1} (dataset seed 0); "
                        f"FID reference: items 0..{opt.n_real - 1}" for split in SPLITS},
        "nfe": "unet_calls = U-Net forward passes per sampling run; unet_evaluations_per_sample counts batch rows "
               "(twice the calls under guidance > 1, which runs conditional and unconditional as one doubled batch)",
        "machine": machine_description(device), "versions": versions(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_csv(rows, opt.outdir / "sampling.csv")
    (opt.outdir / "sampling.md").write_text(markdown(rows, settings))
    write_plot(rows, opt.outdir / "sampling.png")
    (opt.outdir / "sampling.json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"wrote {', '.join(str(opt.outdir / f'sampling.{ext}') for ext in ('csv', 'md', 'png', 'json'))} "
          f"in {settings['wall_seconds'] / 60:.1f} min")
    return rows


if __name__ == "__main__":
    main()
