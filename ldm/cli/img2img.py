"""Image-to-image with a latent diffusion model (SDEdit, as Stable Diffusion's scripts/img2img.py).

    python scripts/img2img.py --init-img sketch.png --prompt "a red circle above a blue square" --strength 0.6

The init image is resized to the model's training resolution (or to --H x --W), encoded, noised to
strength * steps DDIM steps (Meng et al. 2022, SDEdit) and denoised under the prompt: strength 1 ignores
the image, small strengths keep it. Samples go to <outdir>/samples/NNNNN.png (numbered after the files already
there) and one grid per run to <outdir>/grid-NNNN.png (a row per iteration, --n_samples columns).
"""
import argparse
from pathlib import Path


from ldm.image_io import load_image
from ldm.inference import downsampling_factor, image_to_image, latent_shape
from ldm.models.diffusion.samplers import get_sampler
from ldm.script_args import (HelpFormatter, SampleWriter, add_model_args, add_negative_prompt_arg, add_output_args,
                             add_sampler_args, add_strict_vocab_arg, command_line, guidance_scale, model_from_args,
                             sampler_kwargs)


def strength(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is not in (0, 1]: 1 replaces the init image entirely, smaller values keep more of it")
    return value


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--init-img", type=Path, required=True, help="the image to start from")
    parser.add_argument("--prompt", default="a red circle above a blue square", help="the prompt to render")
    parser.add_argument("--strength", type=strength, default=0.75,
                        help="how much noise to add to the init image, in (0, 1] (1 = ignore it)")
    parser.add_argument("--scale", type=guidance_scale, default=3.0,
                        help="classifier-free guidance scale (1 = no guidance)")
    add_negative_prompt_arg(parser)
    add_strict_vocab_arg(parser)
    parser.add_argument("--H", type=int, default=None, help="resize the init image to this height (pixels)")
    parser.add_argument("--W", type=int, default=None, help="resize the init image to this width (pixels)")
    add_output_args(parser, "outputs/img2img-samples")
    add_model_args(parser, default_model="txt2img")
    add_sampler_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    name = sampler_kwargs(opt)["sampler"]
    if not get_sampler(name).starts_midway:
        parser.error(f"img2img starts the reverse process midway, which --sampler {name} cannot")
    writer = SampleWriter(opt)  # checks --outdir before the model loads
    model = model_from_args(opt)
    try:
        _, latent_h, latent_w = latent_shape(model, opt.H, opt.W)
    except ValueError as e:
        parser.error(f"--H/--W: {e}")
    factor = downsampling_factor(model)
    try:
        init = load_image(opt.init_img, size=(latent_h * factor, latent_w * factor))
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--init-img: {e}")

    for iteration in range(opt.n_iter):
        # One seed per batch: each batch is reproducible on its own and batches differ from each other.
        images = image_to_image(model, init.expand(opt.n_samples, -1, -1, -1), [opt.prompt] * opt.n_samples,
                                strength=opt.strength, scale=opt.scale, negative_prompt=opt.negative_prompt,
                                **{**sampler_kwargs(opt), "seed": opt.seed + iteration})
        writer.add(images, opt.prompt, opt.seed + iteration)
    writer.finish()


cli = command_line(main)
