"""Benchmark: train `configs/latent-diffusion/txt2img.yaml` on this CPU, then plot its curve and score samples.

    python bench/txt2img_training.py                  # the config as shipped (its max_steps)
    python bench/txt2img_training.py --minutes 5      # a time budget instead
    python bench/txt2img_training.py --run logs/<run> # only evaluate an existing run

Training runs through `main.py` exactly as a user would. Afterwards:
- the training curve (train/loss_simple per logged step, its running mean, val/loss_simple_ema) goes to
  bench/results/txt2img_training.{csv,png};
- the last image grids the run logged (samples, guided samples, conditioning) are copied to
  bench/results/txt2img_samples/;
- `--eval-samples` images are generated from held-out captions with the EMA weights (ancestral sampling,
  classifier-free guidance) and read by the built-in attribute classifier: the share of samples whose every
  stated attribute matches the caption, and per attribute. Figures go to bench/results/txt2img_training.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.model_loading import build_model  # noqa: E402
from ldm.data.shapes import ShapesValidation  # noqa: E402
from ldm.evaluation.attribute_classifier import load_attribute_classifier  # noqa: E402
from ldm.evaluation.prompt_following import prompt_match  # noqa: E402
from ldm.visualization import save_image_grid  # noqa: E402

CONFIG = "configs/latent-diffusion/txt2img.yaml"
RESULTS = REPO / "bench" / "results"


def train(minutes: float | None, logroot: Path) -> tuple[Path, float]:
    name = "bench_txt2img"
    cmd = [sys.executable, "main.py", "--base", CONFIG, "-t", "--no-test", "-n", name, "-l", str(logroot)]
    if minutes:
        seconds = int(round(minutes * 60))
        cmd += ["--max_time", f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}",
                "--max_steps", "-1"]
    env = {k: v for k, v in os.environ.items() if k != "LDM_RUN_NOW"}
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    run = sorted(p for p in logroot.iterdir() if p.name.endswith(name))[-1]
    return run, time.time() - t0


def read_curve(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train/loss_simple_step) and (step, val/loss_simple_ema) from the run's CSV log."""
    train, val = [], []
    with open(run / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss_simple_step"):
                train.append((int(row["step"]), float(row["train/loss_simple_step"])))
            if row.get("val/loss_simple_ema"):
                val.append((int(row["step"]), float(row["val/loss_simple_ema"])))
    return train, val


def running_mean(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_curve(train: list[tuple[int, float]], val: list[tuple[int, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth = running_mean([v for _, v in train])
    val_at = dict(val)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss_simple", "train_loss_simple_mean20", "val_loss_simple_ema"])
        for (step, v), s in zip(train, smooth):
            writer.writerow([step, f"{v:.5f}", f"{s:.5f}", f"{val_at[step]:.5f}" if step in val_at else ""])
        for step, v in val:
            if step not in {s for s, _ in train}:
                writer.writerow([step, "", "", f"{v:.5f}"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in train], [v for _, v in train], color="0.8", lw=0.8, label="train loss_simple")
    ax.plot([s for s, _ in train], smooth, color="C0", label="train (running mean of 20 logs)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="C1", label="val loss_simple (EMA)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("L_simple (MSE on ε)")
    ax.set_yscale("log")
    ax.set_title("txt2img.yaml on the built-in shapes, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def copy_logged_images(run: Path, out: Path) -> list[str]:
    """The last logged grid of each kind (samples, guided samples, conditioning, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    latest: dict[str, Path] = {}
    for path in sorted((run / "images" / "train").glob("*.png")):
        kind = path.name.split("_gs-")[0]
        latest[kind] = path
    for kind, path in latest.items():
        shutil.copy(path, out / f"{kind}.png")
    return sorted(latest)


@torch.no_grad()
def score_samples(run: Path, n: int, scale: float, batch: int = 64, seed: int = 0) -> dict:
    """Generate from held-out captions and read the images with the attribute classifier."""
    config = sorted((run / "configs").glob("*-project.yaml"))[-1]
    model = build_model(config, run / "checkpoints" / "last.ckpt").eval()
    classifier = load_attribute_classifier()
    data = ShapesValidation(size=32, num_samples=n, seed=seed)
    captions = [data[i]["caption"] for i in range(n)]
    torch.manual_seed(seed)
    images = []
    with model.ema_scope():
        for start in range(0, n, batch):
            prompts = captions[start:start + batch]
            cond = model.get_learned_conditioning(prompts)
            uncond = model.get_learned_conditioning([""] * len(prompts))
            z = model.sample(cond, batch_size=len(prompts), uncond=uncond, guidance_scale=scale, progress=True)
            images.append(model.decode_first_stage(z).clamp(-1, 1))
    images = torch.cat(images)
    accuracy = prompt_match(classifier, images, captions)
    save_image_grid(images[:64], RESULTS / "txt2img_samples" / f"heldout_captions_scale{scale:g}.png", nrow=8)
    (RESULTS / "txt2img_samples" / f"heldout_captions_scale{scale:g}.txt").write_text("\n".join(captions[:64]) + "\n")
    return {"samples": n, "guidance_scale": scale, "sampler": "ancestral DDPM, 1000 steps, EMA weights",
            "accuracy": {k: round(v, 4) for k, v in accuracy.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None, help="train for this long instead of max_steps")
    parser.add_argument("--run", type=Path, default=None, help="evaluate this run directory; no training")
    parser.add_argument("--logdir", type=Path, default=REPO / "logs" / "bench")
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    opt = parser.parse_args()
    opt.logdir.mkdir(parents=True, exist_ok=True)
    seconds = None
    run = opt.run
    if run is None:
        run, seconds = train(opt.minutes, opt.logdir)
    train_curve, val_curve = read_curve(run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_curve(train_curve, val_curve, RESULTS / "txt2img_training")
    logged = copy_logged_images(run, RESULTS / "txt2img_samples")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    first = [v for _, v in train_curve[:20]]
    last = [v for _, v in train_curve[-20:]]
    result = {
        "config": CONFIG, "run_dir": str(run), "wall_seconds": None if seconds is None else round(seconds, 1),
        "global_step": int(ckpt["global_step"]),
        "scale_factor": float(ckpt["state_dict"]["scale_factor"]) if "scale_factor" in ckpt["state_dict"] else None,
        "train_loss_simple_first20_mean": round(sum(first) / max(1, len(first)), 5),
        "train_loss_simple_last20_mean": round(sum(last) / max(1, len(last)), 5),
        "val_loss_simple_ema": [(s, round(v, 5)) for s, v in val_curve],
        "logged_images": logged,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    if opt.eval_samples:
        result["prompt_following"] = score_samples(run, opt.eval_samples, opt.scale)
    (RESULTS / "txt2img_training.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if any(math.isnan(v) for _, v in train_curve):
        raise SystemExit("training loss became NaN")


if __name__ == "__main__":
    main()
