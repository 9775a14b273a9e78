"""Inpainting with a latent diffusion model (the CompVis reference's scripts/inpaint.py).

    python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting-samples --steps 50
    python scripts/inpaint.py --config txt2img --prompt "a purple circle on the left" --scale 3

--indir holds pairs name.png + name_mask.png; in a mask, white (grey level >= 0.5) marks the region to fill
and black the pixels to keep. A name.txt beside a pair is its prompt for a text-conditioned model, unless
--prompt gives one for every pair. Each result is written to <outdir>/name.png, the same size as its input: the
kept pixels are the input's exactly, the filled region is the model's. A file already there (an earlier result,
or the input itself when --outdir is --indir) is never replaced: the result takes the next free name-1.png,
name-2.png, ... (--overwrite replaces earlier results, never inputs). Unless --skip_grid, <outdir>/grid-NNNN.png
shows a row per pair: the masked input the model sees, then the result. Every PNG carries how it was made (the
prompt, sampler, steps, scale, seed, model, its input and mask) as PNG text.

The default model, the built-in "inpainting" one, is conditioned on the masked image and mask (as the
reference's inpainting model) and on the prompt (as Stable Diffusion's). Any other model (e.g. --config
txt2img, with an optional --prompt) fills the region by keeping the known latents at every sampling step.
Every pair is sampled with the same --seed.
"""
import argparse
from pathlib import Path


import torch
from tqdm import tqdm

from ldm.image_io import load_image, load_mask, next_index, save_grid, unused_path
from ldm.util import read_utf8
from ldm.visualization import save_png, to_uint8
from ldm.inference import inpaint, reads_prompts
from ldm.script_args import (HelpFormatter, add_model_args, add_negative_prompt_arg, add_sampler_args,
                             add_strict_vocab_arg, check_writable, command_line, generation_text, guidance_scale,
                             model_from_args, sampler_kwargs)

MASK_SUFFIX = "_mask.png"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--indir", type=Path, default=Path("data/inpainting_examples"),
                        help="folder of name.png + name_mask.png pairs (white in the mask = fill)")
    parser.add_argument("--outdir", type=Path, default=Path("outputs/inpainting-samples"), help="where to write")
    parser.add_argument("--prompt", default="",
                        help="what to paint, for every pair, for a text-conditioned model (default: each pair's "
                             "name.txt, or no text)")
    parser.add_argument("--scale", type=guidance_scale, default=1.0,
                        help="classifier-free guidance scale for --prompt (1 = no guidance)")
    add_negative_prompt_arg(parser)
    add_strict_vocab_arg(parser)
    parser.add_argument("--skip_grid", action="store_true", help="do not write the grid")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier results of the same name in --outdir (inputs are never replaced)")
    add_model_args(parser, default_model="inpainting")
    add_sampler_args(parser)
    return parser


def find_pairs(indir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths: every name_mask.png of `indir`, sorted, with its name.png (as the reference)."""
    if not indir.is_dir():
        raise FileNotFoundError(f"--indir {indir} is not a folder; give a folder of name.png + name{MASK_SUFFIX} pairs")
    masks = sorted(indir.glob(f"*{MASK_SUFFIX}"))
    if not masks:
        raise FileNotFoundError(f"--indir {indir} has no *{MASK_SUFFIX} files; each image name.png needs a mask "
                                f"name{MASK_SUFFIX} (white = fill), e.g. from ldm-make-inpainting-examples")
    pairs = []
    for mask in masks:
        image = mask.with_name(mask.name[: -len(MASK_SUFFIX)] + ".png")
        if not image.is_file():
            raise FileNotFoundError(f"mask {mask} has no image: expected {image} beside it")
        pairs.append((image, mask))
    return pairs


def pair_prompt(image_path: Path, prompt: str) -> str:
    """`prompt` when given, else the caption in name.txt beside name.png (as make_inpainting_examples.py writes
    it), else no text."""
    caption = image_path.with_suffix(".txt")
    if prompt or not caption.is_file():
        return prompt
    return read_utf8(caption).strip()


def load_pair(image_path: Path, mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (1, 3, H, W) in [-1, 1] and its mask (1, 1, H, W), 1 = fill; they must be the same size."""
    image, mask = load_image(image_path), load_mask(mask_path)
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"{image_path} is {image.shape[-1]}x{image.shape[-2]} but its mask {mask_path} is "
                         f"{mask.shape[-1]}x{mask.shape[-2]}; make the mask the image's size")
    return image, mask


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    check_writable(opt.outdir)  # before the model loads
    # Every input is read before the model loads, so a bad folder fails at once.
    try:
        pairs = find_pairs(opt.indir)
        inputs = [load_pair(image, mask) for image, mask in pairs]
    except (OSError, ValueError) as e:
        parser.error(str(e))
    model = model_from_args(opt)
    takes_text = reads_prompts(model)
    if opt.prompt and not takes_text:
        print("note: this model takes no text; --prompt is not used")

    opt.outdir.mkdir(parents=True, exist_ok=True)
    inputs_on_disk = {path.resolve() for pair in pairs for path in pair}
    shown = []
    for (image_path, _), (image, mask) in tqdm(list(zip(pairs, inputs)), desc="Inpainting", unit="image"):
        try:
            prompts = [pair_prompt(image_path, opt.prompt)] if takes_text else None
            result = inpaint(model, image, mask, prompts, scale=opt.scale, negative_prompt=opt.negative_prompt,
                             progress=False, **sampler_kwargs(opt))
        except ValueError as e:  # a size the first stage cannot encode, ...
            parser.error(f"{image_path}: {e}")
        out_path = opt.outdir / image_path.name
        if not (opt.overwrite and out_path.resolve() not in inputs_on_disk):
            out_path = unused_path(out_path)
        save_png(to_uint8(result[0]), out_path, generation_text(
            opt, prompts[0] if prompts else (opt.prompt or ""), opt.seed, source=str(image_path),
            mask=str(image_path.with_name(image_path.stem + MASK_SUFFIX))))
        tqdm.write(f"wrote {out_path}")
        shown.append((image * (1.0 - mask), result.cpu()))

    if not opt.skip_grid:
        if len({masked.shape for masked, _ in shown}) == 1:
            grid_path = save_grid(torch.cat([torch.cat(row) for row in shown]),
                                  opt.outdir / f"grid-{next_index(opt.outdir, 'grid-'):04}.png", nrow=2,
                                  text=generation_text(opt, opt.prompt or "", opt.seed,
                                                       rows="masked input, result per pair"))
            print(f"grid (a row per pair: masked input, result): {grid_path}")
        else:
            print("no grid: the images differ in size")


cli = command_line(main)
