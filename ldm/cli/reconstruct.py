"""Reconstruct held-out built-in images (or a folder of yours) with a trained first stage.

    python scripts/reconstruct.py --run logs/<run>                 # config + last.ckpt of a run
    python scripts/reconstruct.py --config cfg.yaml --ckpt w.safetensors --indir my_images/

Writes `<outdir>/reconstructions.png` (pairs of rows: inputs, then their reconstructions) and prints
PSNR / SSIM over the images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


from ldm.model_loading import build_model
from ldm.evaluation.reconstruction import dataset_images, reconstruct, reconstruction_metrics
from ldm.visualization import save_image_grid
from ldm.script_args import HelpFormatter, add_trust_config_arg, check_writable, command_line


def load_images(opt: argparse.Namespace, size: int) -> torch.Tensor:
    if opt.indir is not None:
        from ldm.data.folder import ImageFolderDataset

        data = ImageFolderDataset(str(opt.indir), size=size, caption_source="none", flip_p=0.0)
    else:
        from ldm.data.shapes import ShapesValidation

        data = ShapesValidation(size=size, num_samples=opt.n, seed=opt.seed)
    return dataset_images(data, 0, min(opt.n, len(data)))


def resolve(opt: argparse.Namespace) -> tuple[Path, Path]:
    if opt.run is not None:
        config = sorted((opt.run / "configs").glob("*-project.yaml"))
        if not config:
            raise SystemExit(f"{opt.run} has no configs/*-project.yaml: is it a run directory made by main.py?")
        ckpt = opt.ckpt or opt.run / "checkpoints" / "last.ckpt"
        return config[-1], ckpt
    if opt.config is None or opt.ckpt is None:
        raise SystemExit("give --run logs/<run>, or both --config and --ckpt")
    return opt.config, opt.ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run", type=Path, help="a run directory written by main.py")
    parser.add_argument("--config", type=Path, help="model config (with --ckpt)")
    parser.add_argument("--ckpt", type=Path, help=".ckpt or .safetensors weights")
    parser.add_argument("--indir", type=Path, default=None, help="a folder of images (default: built-in held-out)")
    parser.add_argument("--n", type=int, default=16, help="number of images in the grid and metrics")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's resolution)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--outdir", type=Path, default=Path("outputs/reconstructions"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_trust_config_arg(parser)
    opt = parser.parse_args()
    check_writable(opt.outdir)  # before the model loads
    config, ckpt = resolve(opt)
    model = build_model(config, ckpt, device=opt.device, trust_config=opt.trust_config)
    size = opt.size or int(model.encoder.resolution)
    images = load_images(opt, size).to(opt.device)
    recon = reconstruct(model, images)
    nrow = min(8, len(images))
    rows = []
    for start in range(0, len(images), nrow):
        rows += [images[start:start + nrow], recon[start:start + nrow]]
    grid = save_image_grid(torch.cat(rows).cpu(), opt.outdir / "reconstructions.png", nrow=nrow)
    metrics = reconstruction_metrics(model, [images], progress=False)
    (opt.outdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} over {metrics['images']} images")
    print(f"wrote {grid}")


cli = command_line(main)
