"""Batch sampling from unconditional, class- and text-conditional models, for looking at and for metrics (FID,
IS): the CompVis reference's scripts/sample_diffusion.py, which could not sample conditional models.

    python main.py --base configs/latent-diffusion/class2img.yaml -t      # trains logs/<date>_class2img
    python scripts/sample_diffusion.py -r logs/<date>_class2img -n 1000 --batch_size 50 -c 50 -e 0.0
    python scripts/sample_diffusion.py -r logs/<date>_class2img -n 16 --class_label 3 --class_label 7 --scale 2
    python scripts/sample_diffusion.py --config <model dir with config.yaml + model.safetensors> -v

Writes sample_000000.png, ... to <logdir>/<global step>/<timestamp>/img/ and all samples as one uint8 NHWC
array (key arr_0, plus `labels` for a class-conditional model) to
<logdir>/<global step>/<timestamp>/numpy/samples_<N>x<H>x<W>x3.npz, as the reference. <logdir> defaults to
<run>/samples with -r, else outputs/sample_diffusion; <global step> is read from a .ckpt ("samples" otherwise).
A class-conditional model cycles through all classes evenly unless --class_label picks some; a text-conditional
one takes prompts from --from-file, or the built-in validation captions (stored in the .npz as `captions`).

    python scripts/sample_diffusion.py --config txt2img -n 256 --scale 3 --sampler dpmpp_2m --steps 20
"""
import argparse
import datetime
import time
from pathlib import Path
from typing import Optional


import numpy as np
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint_file
from ldm.image_io import to_pil
from ldm.data.shapes import ShapesValidation
from ldm.inference import generate, text_to_image
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.inpainting import LatentInpaintDiffusion
from ldm.modules.encoders.modules import ClassEmbedder
from ldm.script_args import (HelpFormatter, add_model_args, add_sampler_args, check_writable, command_line,
                             guidance_scale, model_from_args, read_prompt_file, sampler_kwargs)
from ldm.cli.train import _resolve_resume


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-r", "--resume", type=Path, default=None,
                        help="a training run logs/<run> (its configs/*-project.yaml and checkpoints/last.ckpt) or a "
                             ".ckpt inside one; instead of --config/--ckpt")
    parser.add_argument("-n", "--n_samples", type=int, default=64, help="number of samples to draw")
    parser.add_argument("-l", "--logdir", type=Path, default=None,
                        help="output root (default: <run>/samples with -r, else outputs/sample_diffusion)")
    parser.add_argument("--batch_size", type=int, default=16, help="samples per batch")
    parser.add_argument("--class_label", type=int, action="extend", nargs="+", default=None,
                        help="class(es) to sample, cycled through (repeatable; default: all classes evenly)")
    parser.add_argument("--scale", type=guidance_scale, default=1.0,
                        help="classifier-free guidance scale for conditional models (1 = no guidance)")
    parser.add_argument("--from-file", type=Path, default=None,
                        help="text-conditional models: prompts, one per line, cycled (default: the built-in "
                             "validation split's captions, to compare with its images)")
    add_model_args(parser)
    # No built-in model is unconditional or class-conditional: the model comes from -r or --config.
    parser.set_defaults(config=None)
    add_sampler_args(parser, default_steps=50)
    # The reference's own spellings of the shared sampler options, and its default eta 1.
    parser.add_argument("-e", dest="eta", type=float, default=argparse.SUPPRESS,
                        help="same as --eta; here the default is 1 (stochastic DDIM), as the reference")
    parser.add_argument("-c", "--custom_steps", dest="steps", type=int, default=argparse.SUPPRESS,
                        help="same as --steps")
    parser.add_argument("-v", "--vanilla_sample", dest="sampler", action="store_const", const="ddpm",
                        default=argparse.SUPPRESS, help="DDPM ancestral sampling over all T steps (--sampler ddpm)")
    parser.set_defaults(eta=1.0)
    return parser


def checkpoint_global_step(ckpt: Optional[str]) -> Optional[int]:
    """The training step a Lightning .ckpt was saved at (None for weights-only files)."""
    if ckpt is None or Path(ckpt).suffix != ".ckpt":
        return None
    # mmap: only the small `global_step` entry is read, not the weights again.
    return load_checkpoint_file(Path(ckpt), mmap=True).get("global_step")


def new_run_dir(root: Path) -> Path:
    """A fresh <root>/<timestamp> directory (the reference's layout); `-1`, `-2`, ... for runs in the same second."""
    now = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    path, repeat = root / now, 0
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            repeat += 1
            path = root / f"{now}-{repeat}"


def model_source(parser: argparse.ArgumentParser, opt: argparse.Namespace) -> Path:
    """Point opt.config/opt.ckpt at the run of -r; returns the default output root."""
    if opt.resume is None:
        if opt.config is None:
            parser.error("no model given: use -r logs/<run> or --config (a model directory or config .yaml)")
        return Path("outputs/sample_diffusion")
    if opt.config is not None or opt.ckpt is not None:
        parser.error("-r/--resume names the config and checkpoint itself: leave out --config and --ckpt")
    try:
        run, ckpt = _resolve_resume(str(opt.resume))
    except FileNotFoundError as e:
        parser.error(str(e))
    configs = sorted((run / "configs").glob("*-project.yaml"))
    if not configs:
        parser.error(f"-r {opt.resume}: no configs/*-project.yaml in {run} (is it a training run directory?)")
    opt.config, opt.ckpt = str(configs[-1]), str(ckpt)
    return run / "samples"


def sample_prompts(parser: argparse.ArgumentParser, opt: argparse.Namespace) -> list[str]:
    """One prompt per sample for a text-conditional model: --from-file cycled, or the built-in validation
    split's captions (so FID can be measured against that split's images)."""
    if opt.class_label:
        parser.error("--class_label needs a class-conditional model; this one is text-conditional (use --from-file)")
    if opt.from_file is None:
        data = ShapesValidation(size=8)
        return [data[i % len(data)]["caption"] for i in range(opt.n_samples)]
    prompts = read_prompt_file(parser, opt.from_file)
    return [prompts[i % len(prompts)] for i in range(opt.n_samples)]


def sample_labels(parser: argparse.ArgumentParser, opt: argparse.Namespace,
                  model: LatentDiffusion) -> Optional[list[int]]:
    """One class label per sample for a class-conditional model (None for an unconditional one)."""
    embedder = model.cond_stage_model
    if not isinstance(embedder, ClassEmbedder):
        if opt.class_label or opt.scale != 1.0:
            parser.error("--class_label and --scale need a class-conditional model; this one is unconditional")
        return None
    classes = opt.class_label or list(range(embedder.n_classes))
    bad = [c for c in classes if not 0 <= c < embedder.n_classes]
    if bad:
        parser.error(f"--class_label {bad}: this model has classes 0 to {embedder.n_classes - 1}")
    if opt.scale != 1.0 and not embedder.add_null_class:
        parser.error("--scale needs a model trained with a null class (add_null_class: true); use --scale 1")
    return [classes[i % len(classes)] for i in range(opt.n_samples)]


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    if opt.n_samples < 1 or opt.batch_size < 1:
        parser.error("-n/--n_samples and --batch_size must be at least 1")
    default_root = model_source(parser, opt)
    check_writable(opt.logdir or default_root, "-l/--logdir")  # before the model loads
    model = model_from_args(opt)
    if isinstance(model, LatentInpaintDiffusion):
        parser.error("this is an inpainting model: use scripts/inpaint.py")
    text = model.model.conditioning_key is not None and not isinstance(model.cond_stage_model, ClassEmbedder)
    prompts = sample_prompts(parser, opt) if text else None
    labels = None if text else sample_labels(parser, opt, model)
    kwargs = sampler_kwargs(opt)

    step = checkpoint_global_step(opt.ckpt)
    outdir = new_run_dir((opt.logdir or default_root) / (f"{step:08}" if step is not None else "samples"))
    img_dir, numpy_dir = outdir / "img", outdir / "numpy"
    img_dir.mkdir()
    numpy_dir.mkdir()
    OmegaConf.save(OmegaConf.create({k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()}),
                   outdir / "sampling_config.yaml")
    print(f"writing {opt.n_samples} samples to {outdir}")

    unet_evaluations = 0

    def count_evaluation(*_) -> None:
        nonlocal unet_evaluations
        unet_evaluations += 1

    hook = model.model.register_forward_hook(count_evaluation)
    arrays = []
    seconds = 0.0  # sampling time only, not writing files
    for b, first in enumerate(range(0, opt.n_samples, opt.batch_size)):
        count = min(opt.batch_size, opt.n_samples - first)
        start = time.perf_counter()
        # One seed per batch, so every batch is reproducible on its own.
        if prompts is not None:
            images = text_to_image(model, prompts[first:first + count], scale=opt.scale,
                                   **{**kwargs, "seed": opt.seed + b}).cpu()
        else:
            images = generate(model, count, class_labels=None if labels is None else labels[first:first + count],
                              scale=opt.scale, batch_size=count, **{**kwargs, "seed": opt.seed + b}).cpu()
        seconds += time.perf_counter() - start
        for i, image in enumerate(to_pil(images)):
            image.save(img_dir / f"sample_{first + i:06}.png")
            arrays.append(np.asarray(image))
    hook.remove()

    samples = np.stack(arrays)
    npz_path = numpy_dir / f"samples_{'x'.join(str(d) for d in samples.shape)}.npz"
    extra = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
    if prompts is not None:
        extra["captions"] = np.asarray(prompts)
    np.savez(npz_path, samples, **extra)
    print(f"{opt.n_samples} samples in {seconds:.1f} s: {opt.n_samples / seconds:.3f} samples/s, "
          f"{seconds / unet_evaluations:.4f} s per U-Net evaluation ({unet_evaluations} U-Net calls on batches "
          f"of up to {opt.batch_size} samples; the times include conditioning and decoding)")
    print(f"images: {img_dir}\narray: {npz_path}")


cli = command_line(main)
