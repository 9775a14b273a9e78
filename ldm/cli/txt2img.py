"""Text-to-image sampling with a latent diffusion model (the CompVis reference's scripts/txt2img.py).

    python scripts/txt2img.py --prompt "a red circle above a blue square" --n_samples 4 --n_iter 2 --steps 50
    python scripts/txt2img.py --from-file prompts.txt --H 64 --W 96 --plms --seed 7
    python scripts/txt2img.py --prompt "a red circle" --lora my_lora.safetensors:0.8 --lora other.safetensors

Every sample is written to <outdir>/samples/NNNNN.png, numbered after the files already there, and each run
adds one grid <outdir>/grid-NNNN.png with a row per prompt and iteration and --n_samples columns. --H/--W
larger than the model's training size sample the U-Net convolutionally on the larger latent (LDM paper,
Sec. 4.3.2). Image k of a run (counted over all batches) has seed --seed + k: the same seed gives the same
image, alone (--n_samples 1) or in any batch. Each sample's PNG carries how it was made as text metadata
(prompt, negative prompt, seed, sampler, steps, scale, model; `PIL.Image.open(path).text`).

--lora FILE[:SCALE] (repeatable) applies LoRA adapters, each at its scale (default 1), merged into the model's
weights before sampling: the files `ldm-export <run>/checkpoints/last.ckpt --lora` writes, or LoRAs in diffusers' or
kohya's key format made for a model of this layout (docs/training.md, "Fine-tuning a trained model").
"""
import argparse
from pathlib import Path


from ldm.inference import latent_shape, text_to_image
from ldm.script_args import (HelpFormatter, SampleWriter, add_model_args, add_negative_prompt_arg, add_output_args,
                             add_sampler_args, add_strict_vocab_arg, command_line, guidance_scale, model_from_args,
                             read_prompt_file, sampler_kwargs)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--prompt", default="a red circle above a blue square", help="the prompt to render")
    parser.add_argument("--from-file", type=Path, default=None,
                        help="a text file with one prompt per line (blank lines skipped), instead of --prompt")
    parser.add_argument("--scale", type=guidance_scale, default=3.0,
                        help="classifier-free guidance scale (1 = no guidance)")
    add_negative_prompt_arg(parser)
    add_strict_vocab_arg(parser)
    parser.add_argument("--fixed_code", action="store_true",
                        help="the same start noise for every batch (image j of each batch has seed --seed + j)")
    parser.add_argument("--H", type=int, default=None, help="image height in pixels (default: the training size)")
    parser.add_argument("--W", type=int, default=None, help="image width in pixels (default: the training size)")
    add_output_args(parser, "outputs/txt2img-samples")
    add_model_args(parser, default_model="txt2img")
    add_sampler_args(parser)
    return parser


def read_prompts(parser: argparse.ArgumentParser, opt: argparse.Namespace) -> list[str]:
    """[--prompt], or the non-blank lines of --from-file."""
    return [opt.prompt] if opt.from_file is None else read_prompt_file(parser, opt.from_file)


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    prompts = read_prompts(parser, opt)
    writer = SampleWriter(opt)  # checks --outdir before the model loads
    model = model_from_args(opt)
    try:
        latent_shape(model, opt.H, opt.W)  # sizes the first stage cannot decode fail here, before sampling
    except ValueError as e:
        parser.error(f"--H/--W: {e}")
    kwargs = sampler_kwargs(opt)

    made = 0
    for iteration in range(opt.n_iter):
        for p, prompt in enumerate(prompts):
            # One seed per image (--seed + its number in the run; with --fixed_code the same n_samples seeds for every
            # batch, the reference's shared start code): an image comes out the same made alone or in any batch.
            first = 0 if opt.fixed_code else made
            seeds = [opt.seed + first + j for j in range(opt.n_samples)]
            made += opt.n_samples
            print(f"iteration {iteration + 1}/{opt.n_iter}, prompt {p + 1}/{len(prompts)}: {prompt!r}")
            images = text_to_image(model, [prompt] * opt.n_samples, scale=opt.scale, height=opt.H, width=opt.W,
                                   negative_prompt=opt.negative_prompt, **{**kwargs, "seed": seeds})
            writer.add(images, prompt, seeds)
    writer.finish()


cli = command_line(main)
