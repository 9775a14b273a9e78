"""Interpolation through the diffusion process and progressive generation (DDPM paper, sec. 4.3).

    python scripts/interpolate.py                                   # two built-in test images, t = 500, 8 frames
    python scripts/interpolate.py --image-a a.png --image-b b.png --t 250 --slerp --sampler ddpm
    python scripts/interpolate.py --mode progressive --prompt "a red circle above a blue square" --n_samples 4

--mode interpolate: each pair (--image-a[i], --image-b[i]) is encoded, noised to step --t of the model's T
with the same noise, mixed at --n_frames evenly spaced λ from 0 to 1 (linearly, or spherically with
--slerp) and decoded by the reverse process from there (--sampler ddpm: ancestral, as the paper; ddim or
plms: from the nearest of their --steps timesteps at or below --t). The first and last frames are the two
images reconstructed through step t; larger t gives smoother, less faithful paths. Without --image-a/-b
the first two images of the built-in held-out test split are used. Images are resized to the model's
training size.

--mode progressive: --n_samples samples of --prompt (text models), --class_label (class-conditional
models) or unconditional, showing the predicted x̂_0 at --n_frames evenly spaced sampler steps (fig. 6).

Each run writes one strip, a row per pair or sample, to <outdir>/interpolation-NNNN.png or
<outdir>/progressive-NNNN.png (numbered after the strips already there).
"""
import argparse
from pathlib import Path


import torch

from ldm.data.shapes import ShapesTest
from ldm.image_io import next_index, load_image, save_grid
from ldm.inference import downsampling_factor
from ldm.interpolation import interpolate, interpolation_samplers, progressive_generation, start_step
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.script_args import (HelpFormatter, add_model_args, add_sampler_args, add_strict_vocab_arg, check_writable,
                             command_line, generation_text, guidance_scale, model_from_args, sampler_kwargs)

MODES = ("interpolate", "progressive")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="interpolate", help="what to show (default interpolate)")
    parser.add_argument("--image-a", "--image_a", dest="image_a", type=Path, nargs="+", default=None,
                        help="first image of each pair (default: the built-in test split's first image)")
    parser.add_argument("--image-b", "--image_b", dest="image_b", type=Path, nargs="+", default=None,
                        help="second image of each pair, as many as --image-a (default: the test split's second)")
    parser.add_argument("--t", type=int, default=500,
                        help="noise level: the timestep (0..T-1) both images are noised to (default 500 of 1000)")
    parser.add_argument("--n_frames", type=int, default=8, help="images per row (default 8)")
    parser.add_argument("--slerp", action="store_true",
                        help="mix the noisy latents spherically instead of linearly")
    parser.add_argument("--prompt", default="", help="a prompt, for text-conditional models")
    add_strict_vocab_arg(parser)
    parser.add_argument("--class_label", type=int, default=None, help="a class index, for class-conditional models")
    parser.add_argument("--scale", type=guidance_scale, default=3.0,
                        help="classifier-free guidance scale for --prompt / --class_label (1 = no guidance)")
    parser.add_argument("--n_samples", type=int, default=4, help="progressive mode: rows (samples) in the strip")
    parser.add_argument("--outdir", type=Path, default=Path("outputs/interpolations"), help="where to write")
    add_model_args(parser, default_model="txt2img")
    add_sampler_args(parser)
    return parser


def load_pairs(parser: argparse.ArgumentParser, opt: argparse.Namespace,
               size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches (N, 3, size, size) of the pairs' first and second images, or the test split's first two."""
    if opt.image_a is None:
        dataset = ShapesTest(size=size, num_samples=2)
        a, b = (torch.from_numpy(dataset[i]["image"]).permute(2, 0, 1)[None] for i in range(2))
        return a, b
    try:
        return (torch.cat([load_image(path, size=size) for path in opt.image_a]),
                torch.cat([load_image(path, size=size) for path in opt.image_b]))
    except (OSError, ValueError) as e:
        parser.error(str(e))


def generation_kwargs(opt: argparse.Namespace) -> dict:
    """The condition and sampler options both modes share."""
    return {"prompt": opt.prompt, "class_label": opt.class_label, "scale": opt.scale, **sampler_kwargs(opt)}


def run_interpolation(parser: argparse.ArgumentParser, opt: argparse.Namespace,
                      model: LatentDiffusion) -> torch.Tensor:
    images_a, images_b = load_pairs(parser, opt, model.image_size * downsampling_factor(model))  # training size
    kwargs = generation_kwargs(opt)
    step = start_step(model, opt.t, kwargs["sampler"], opt.steps)
    mixing = "spherical" if opt.slerp else "linear"
    print(f"interpolating {images_a.shape[0]} pair(s) through step {step} of {model.num_timesteps} "
          f"({kwargs['sampler']}, {mixing} mixing, {opt.n_frames} frames)")
    return interpolate(model, images_a, images_b, t=opt.t, n_frames=opt.n_frames, spherical=opt.slerp, **kwargs)


def run_progressive(opt: argparse.Namespace, model: LatentDiffusion) -> torch.Tensor:
    kwargs = generation_kwargs(opt)
    print(f"progressive generation: {opt.n_samples} sample(s), x̂_0 at {opt.n_frames} evenly spaced "
          f"{kwargs['sampler']} steps")
    return progressive_generation(model, opt.n_samples, n_frames=opt.n_frames, progress=True, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    check_writable(opt.outdir)  # before the model loads
    if opt.n_frames < 2 or opt.n_samples < 1:
        parser.error("--n_frames must be at least 2 and --n_samples at least 1")
    if (opt.image_a is None) != (opt.image_b is None):
        parser.error("give both --image-a and --image-b (or neither, for two built-in test images)")
    if opt.image_a is not None and len(opt.image_a) != len(opt.image_b):
        parser.error(f"got {len(opt.image_a)} --image-a and {len(opt.image_b)} --image-b; give one b per a")
    sampler = sampler_kwargs(opt)["sampler"]
    if opt.mode == "interpolate" and sampler not in interpolation_samplers():
        parser.error(f"interpolation starts the reverse process at step --t, which --sampler {sampler} cannot; "
                     f"use --sampler {', '.join(interpolation_samplers())}")
    model = model_from_args(opt)
    try:
        rows = run_interpolation(parser, opt, model) if opt.mode == "interpolate" else run_progressive(opt, model)
    except ValueError as e:  # a --t outside the schedule, a prompt for an unconditional model, ...
        parser.error(str(e))
    name = "interpolation" if opt.mode == "interpolate" else "progressive"
    path = opt.outdir / f"{name}-{next_index(opt.outdir, f'{name}-'):04}.png"
    text = {"mode": opt.mode, "t": str(opt.t)} if opt.mode == "interpolate" else {"mode": opt.mode}
    if opt.image_a is not None:
        text.update(image_a=" ".join(map(str, opt.image_a)), image_b=" ".join(map(str, opt.image_b)))
    save_grid(rows.flatten(0, 1), path, nrow=opt.n_frames, text=generation_text(opt, opt.prompt, opt.seed, **text))
    print(f"strip ({rows.shape[0]} row(s) x {opt.n_frames}): {path}")


cli = command_line(main)
