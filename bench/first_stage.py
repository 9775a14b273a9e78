"""Benchmark: train the built-in first-stage configs for a fixed CPU budget, then measure reconstructions.

    python bench/first_stage.py                    # 10 minutes per config (the issue's budget)
    python bench/first_stage.py --minutes 1 --configs kl

Each config is trained through `main.py` exactly as a user would (with Lightning's `--max_time`), then
its `last.ckpt` reconstructs held-out built-in images (the validation split, never seen in training).
PSNR and SSIM are always reported; LPIPS only where VGG16 weights can be found (see docs/compatibility.md).
Results go to bench/results/first_stage.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.model_loading import build_model  # noqa: E402
from ldm.evaluation.reconstruction import dataset_images, reconstruction_metrics  # noqa: E402

CONFIGS = {
    "kl": "configs/autoencoder/autoencoder_kl_shapes_f4.yaml",
    "vq": "configs/autoencoder/autoencoder_vq_shapes_f4.yaml",
}


def held_out_batches(n: int, batch_size: int = 64, seed: int = 1234):
    from ldm.data.shapes import ShapesValidation

    data = ShapesValidation(size=32, num_samples=n, seed=seed)
    for start in range(0, n, batch_size):
        yield dataset_images(data, start, min(n, start + batch_size))


def try_lpips():
    from ldm.modules.losses.lpips import LPIPS, VGGWeightsNotFound

    try:
        return LPIPS().eval()
    except VGGWeightsNotFound as e:
        print(f"LPIPS skipped: {e}".splitlines()[0])
        return None


def _duration(minutes: float) -> str:
    """Lightning's DD:HH:MM:SS."""
    seconds = int(round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(kind: str, minutes: float, logroot: Path) -> tuple[Path, float, int]:
    name = f"bench_{kind}"
    t0 = time.time()
    cmd = [sys.executable, "main.py", "--base", CONFIGS[kind], "-t", "--no-test", "-n", name, "-l", str(logroot),
           "--max_time", _duration(minutes), "--max_steps", "-1"]
    env = {**os.environ}
    env.pop("LDM_RUN_NOW", None)
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    run = sorted(p for p in logroot.iterdir() if p.name.endswith(name))[-1]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return run, time.time() - t0, int(ckpt["global_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per config")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--eval-images", type=int, default=1024)
    parser.add_argument("--logdir", type=Path, default=REPO / "logs" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "first_stage")
    opt = parser.parse_args()
    opt.logdir.mkdir(parents=True, exist_ok=True)
    lpips = try_lpips()
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
               "budget_minutes": opt.minutes, "eval_images": opt.eval_images, "runs": {}}
    for kind in opt.configs:
        run, seconds, steps = train(kind, opt.minutes, opt.logdir)
        config = sorted((run / "configs").glob("*-project.yaml"))[-1]
        model = build_model(config, run / "checkpoints" / "last.ckpt")
        metrics = reconstruction_metrics(model, held_out_batches(opt.eval_images), lpips=lpips)
        results["runs"][kind] = {"config": CONFIGS[kind], "run_dir": str(run),
                                 "wall_seconds": round(seconds, 1), "global_step": steps,
                                 "batches": steps // 2, **{k: round(v, 4) for k, v in metrics.items()}}
        print(json.dumps(results["runs"][kind], indent=1))
    opt.out.parent.mkdir(parents=True, exist_ok=True)
    opt.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"# First-stage benchmark ({opt.minutes:g} min CPU budget per config)", "",
             f"Machine: {results['machine']}", "",
             "| config | batches | wall s | PSNR dB | SSIM | LPIPS |", "|---|---:|---:|---:|---:|---:|"]
    for kind, r in results["runs"].items():
        lp = f"{r['lpips']:.4f}" if "lpips" in r else "n/a (no VGG16 weights)"
        lines.append(f"| {r['config']} | {r['batches']} | {r['wall_seconds']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {lp} |")
    opt.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
