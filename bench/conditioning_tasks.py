"""Benchmark: the LDM paper's spatial conditioning tasks on held-out built-in images.

    python bench/conditioning_tasks.py                  # the built-in superres, semantic2img, layout2img models
    python bench/conditioning_tasks.py --n 64 --tasks superres   # fewer images, one task
    python bench/conditioning_tasks.py --superres logs/<run>/... # any model directory or config

Every task is measured on the first --n validation images (never trained on: the training pool is drawn from
the train split's own random stream; validation holds the same colour-shape pairs, so every class the
conditions name was trained), sampled with --sampler in --steps steps:

- super-resolution x4 (bicubic 8x8 inputs): PSNR and SSIM against the 32x32 original, and the Fréchet
  distance in the attribute classifier's feature space (FID), against bicubic upsampling of the same inputs;
- semantic synthesis: per object of the map, whether the classifier reads its shape and colour in the
  generated image (position is fixed by the map and read too), and FID;
- layout-to-image: per box, whether the right shape and colour appear at the right place (the classifier's
  shape, colour and position of that object), with guidance --scale, and FID.

The "real images" rows are the same figures for the originals: the ceiling of the agreement (the classifier's
own error) and the FID floor at this sample count (FID from few samples is biased upwards). Results go to
bench/results/conditioning_tasks.{json,md}. With `--record STEPS` (the training steps of the models measured)
the model rows are also added to conditioning_tasks_history.csv, and conditioning_tasks_history.png plots each
task's figure against training steps: the recipes' curves.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.data.layout import ShapesLayout, scene_layout  # noqa: E402
from ldm.data.semantic import ShapesSemantic  # noqa: E402
from ldm.data.superres import SuperResolutionPairs, bicubic_upsample  # noqa: E402
from ldm.data.shapes import ShapesValidation  # noqa: E402
from ldm.evaluation.attribute_classifier import load_attribute_classifier  # noqa: E402
from ldm.evaluation.conditioning import image_quality, object_agreement  # noqa: E402
from ldm.evaluation.frechet import feature_statistics, frechet_distance_from_statistics  # noqa: E402
from ldm.inference import layout_to_image, load_model, semantic_to_image, super_resolve  # noqa: E402

TASKS = ("superres", "semantic2img", "layout2img")
RESULTS = REPO / "bench" / "results"


def batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class Judge:
    """The attribute classifier, and the feature statistics of real validation images it compares FID against
    (images n..n+n_real, disjoint from the n that are conditioned on)."""

    def __init__(self, n: int, n_real: int) -> None:
        self.classifier = load_attribute_classifier()
        data = ShapesValidation(size=32, num_samples=n + n_real)
        real = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(n, n + n_real)]).permute(0, 3, 1, 2)
        self.real_stats = feature_statistics(self.classifier.features(real))

    @torch.no_grad()
    def fid(self, images: torch.Tensor) -> float:
        return frechet_distance_from_statistics(*feature_statistics(self.classifier.features(images)), *self.real_stats)


def as_images(items: list[dict], key: str = "image") -> torch.Tensor:
    return torch.stack([torch.as_tensor(item[key]) for item in items]).permute(0, 3, 1, 2).float()


def superres(model_name: str, judge: Judge, opt: argparse.Namespace) -> list[dict]:
    data = SuperResolutionPairs({"target": "ldm.data.shapes.ShapesValidation", "params": {"size": 32,
                                                                                          "num_samples": opt.n}})
    items = [data[i] for i in range(opt.n)]
    high, low = as_images(items), as_images(items, "LR_image")
    model = load_model(model_name)
    start = time.perf_counter()
    samples = torch.cat([super_resolve(model, low[b], sampler=opt.sampler, steps=opt.steps, seed=list(range(b.start, b.stop)),
                                       progress=False) for b in batches(opt.n, opt.batch_size)])
    seconds = time.perf_counter() - start
    bicubic = bicubic_upsample(low, 4)
    return [
        {"task": "superres", "method": "real images", **image_quality(high, high), "fid": judge.fid(high)},
        {"task": "superres", "method": "bicubic", **image_quality(bicubic, high), "fid": judge.fid(bicubic)},
        {"task": "superres", "method": f"LDM-SR ({opt.sampler}, {opt.steps} steps)", **image_quality(samples, high),
         "fid": judge.fid(samples), "seconds": seconds},
    ]


def semantic2img(model_name: str, judge: Judge, opt: argparse.Namespace) -> list[dict]:
    data = ShapesSemantic(split="validation", size=32, num_samples=opt.n)
    items = [data[i] for i in range(opt.n)]
    scenes = [data.scene(i) for i in range(opt.n)]
    real = as_images(items)
    labels = torch.stack([torch.as_tensor(item["label_map"]) for item in items])
    model = load_model(model_name)
    start = time.perf_counter()
    samples = torch.cat([semantic_to_image(model, labels[b], sampler=opt.sampler, steps=opt.steps,
                                           seed=list(range(b.start, b.stop)), progress=False)
                         for b in batches(opt.n, opt.batch_size)])
    seconds = time.perf_counter() - start
    return [
        {"task": "semantic2img", "method": "real images", **object_agreement(judge.classifier, real, scenes),
         "fid": judge.fid(real)},
        {"task": "semantic2img", "method": f"LDM ({opt.sampler}, {opt.steps} steps)",
         **object_agreement(judge.classifier, samples, scenes), "fid": judge.fid(samples), "seconds": seconds},
    ]


def layout2img(model_name: str, judge: Judge, opt: argparse.Namespace) -> list[dict]:
    data = ShapesLayout(split="validation", size=32, num_samples=opt.n)
    scenes = [data.scene(i) for i in range(opt.n)]
    real = as_images([data[i] for i in range(opt.n)])
    layouts = [scene_layout(scene) for scene in scenes]
    model = load_model(model_name)
    start = time.perf_counter()
    samples = torch.cat([layout_to_image(model, layouts[b], scale=opt.scale, sampler=opt.sampler, steps=opt.steps,
                                         seed=list(range(b.start, b.stop)), progress=False)
                         for b in batches(opt.n, opt.batch_size)])
    seconds = time.perf_counter() - start
    return [
        {"task": "layout2img", "method": "real images", **object_agreement(judge.classifier, real, scenes),
         "fid": judge.fid(real)},
        {"task": "layout2img", "method": f"LDM ({opt.sampler}, {opt.steps} steps, guidance {opt.scale:g})",
         **object_agreement(judge.classifier, samples, scenes), "fid": judge.fid(samples), "seconds": seconds},
    ]


def percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def write_report(rows: list[dict], opt: argparse.Namespace, minutes: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "conditioning_tasks.json").write_text(json.dumps(
        {"rows": rows, "n": opt.n, "sampler": opt.sampler, "steps": opt.steps, "scale": opt.scale,
         "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}}, indent=2) + "\n")
    lines = ["# Spatial conditioning tasks: super-resolution, semantic synthesis, layout-to-image", "",
             f"Made by `python bench/conditioning_tasks.py` in {minutes:.1f} min on {torch.get_num_threads()} CPU "
             f"threads: {opt.n} validation images per task (never trained on), {opt.sampler} {opt.steps} steps, "
             "the built-in models (configs/latent-diffusion/{sr,semantic2img,layout2img}_shapes.yaml). FID: "
             "Fréchet distance in the attribute classifier's feature space against 1,024 other validation images "
             f"(biased upwards at n = {opt.n}: compare with the real-images row).", ""]
    for task, header, columns in (
            ("superres", "## Super-resolution x4 (8x8 bicubic-downsampled inputs -> 32x32)",
             (("PSNR (dB)", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.3f}"), ("FID", "fid", "{:.1f}"))),
            ("semantic2img", "## Semantic synthesis (label map -> image)",
             (("objects right (shape and colour and position)", "objects", None), ("shape", "shape", None),
              ("colour", "colour", None), ("position", "position", None), ("FID", "fid", "{:.1f}"))),
            ("layout2img", "## Layout-to-image (boxes with classes -> image)",
             (("boxes right (shape and colour at the place)", "objects", None), ("shape", "shape", None),
              ("colour", "colour", None), ("position", "position", None), ("FID", "fid", "{:.1f}")))):
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        lines += [header, "", "| method | " + " | ".join(c[0] for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for row in task_rows:
            cells = [percent(row[key]) if fmt is None else fmt.format(row[key]) for _, key, fmt in columns]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    (RESULTS / "conditioning_tasks.md").write_text("\n".join(lines))
    print("\n".join(lines))


HISTORY_COLUMNS = ("task", "steps", "model", "psnr", "ssim", "objects", "shape", "colour", "position", "fid")
CURVE = {"superres": ("psnr", "super-resolution: PSNR (dB)"), "semantic2img": ("objects", "semantic synthesis: objects right"),
         "layout2img": ("objects", "layout-to-image: boxes right")}


def record_history(rows: list[dict], steps: int, models: dict[str, str]) -> None:
    """Add the model rows to the history CSV (one row per task and training length) and redraw its plot."""
    path = RESULTS / "conditioning_tasks_history.csv"
    history = list(csv.DictReader(path.open())) if path.exists() else []
    for row in rows:
        if row["method"] in ("real images", "bicubic"):
            continue
        history = [h for h in history if not (h["task"] == row["task"] and int(h["steps"]) == steps)]
        history.append({"task": row["task"], "steps": steps, "model": models[row["task"]],
                        **{k: row.get(k, "") for k in HISTORY_COLUMNS[3:]}})
    history.sort(key=lambda h: (h["task"], int(h["steps"])))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE), figsize=(12, 3.5))
    for ax, (task, (column, title)) in zip(axes, CURVE.items()):
        points = [(int(h["steps"]), float(h[column])) for h in history if h["task"] == task and h[column] != ""]
        if points:
            ax.plot(*zip(*points), "o-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training steps")
    fig.tight_layout()
    fig.savefig(RESULTS / "conditioning_tasks_history.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--superres", default="superres", help="super-resolution model (built-in name or directory)")
    parser.add_argument("--semantic2img", default="semantic2img", help="semantic synthesis model")
    parser.add_argument("--layout2img", default="layout2img", help="layout-to-image model")
    parser.add_argument("--n", type=int, default=256, help="validation images per task")
    parser.add_argument("--n-real", type=int, default=1024, help="real images for the FID statistics")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=3.0, help="guidance of the layout model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--record", type=int, metavar="STEPS", default=None,
                        help="add the figures to conditioning_tasks_history.{csv,png} as those of models trained STEPS steps")
    opt = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    start = time.perf_counter()
    judge = Judge(opt.n, opt.n_real)
    runners = {"superres": superres, "semantic2img": semantic2img, "layout2img": layout2img}
    rows = [row for task in opt.tasks for row in runners[task](getattr(opt, task), judge, opt)]
    write_report(rows, opt, (time.perf_counter() - start) / 60)
    if opt.record is not None:
        record_history(rows, opt.record, {task: getattr(opt, task) for task in TASKS})


if __name__ == "__main__":
    main()
