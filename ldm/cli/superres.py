"""Super-resolution x4 with a latent diffusion model (the LDM paper's sec. 4.4, configs/latent-diffusion/sr_shapes.yaml).

    python scripts/superres.py --input low_res.png --outdir outputs/superres
    python scripts/superres.py --input folder_of_images/ --n_samples 2

Each input image (a file, or every image of a folder) is enlarged by the model's factor (x4 for the built-in
model): the low-resolution pixels condition the sampler on the latent grid they match. Any size works, also
larger than the 8x8 inputs the model was trained on (the U-Net is convolutional); sides must be multiples of 4
(the U-Net halves the grid twice). --bicubic also writes the bicubic enlargement, the baseline, beside.
Outputs: <outdir>/samples/NNNNN.png (numbered after the files already there), and one grid per run with a
row per input: [input (nearest), bicubic, samples...].
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.data.superres import bicubic_upsample
from ldm.image_io import load_image, save_images
from ldm.inference import downsampling_factor, super_resolve
from ldm.script_args import (HelpFormatter, SampleWriter, add_model_args, add_output_args, add_sampler_args,
                             command_line, model_from_args, sampler_kwargs)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GRID_MULTIPLE = 4


def input_images(parser: argparse.ArgumentParser, path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            parser.error(f"--input {path}: no images there ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.is_file():
        parser.error(f"--input {path}: no such file or folder")
    return [path]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="a low-resolution image, or a folder of them")
    parser.add_argument("--bicubic", action="store_true", help="also write the bicubic enlargement (<outdir>/bicubic/)")
    add_output_args(parser, "outputs/superres-samples")
    parser.set_defaults(n_samples=1)
    add_model_args(parser, default_model="superres")
    add_sampler_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    files = input_images(parser, opt.input)
    writer = SampleWriter(opt)
    model = model_from_args(opt)
    factor = downsampling_factor(model)
    rows = []
    for file in files:
        try:
            low = load_image(file)
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--input: {e}")
        if low.shape[-1] % GRID_MULTIPLE or low.shape[-2] % GRID_MULTIPLE:
            parser.error(f"--input {file}: {low.shape[-1]}x{low.shape[-2]} pixels; the sides must be multiples of "
                         f"{GRID_MULTIPLE} (crop or resize it)")
        images = super_resolve(model, low.expand(opt.n_samples, -1, -1, -1), **sampler_kwargs(opt))
        writer.add(images, f"superres of {file.name}", opt.seed)
        bicubic = bicubic_upsample(low, factor)
        if opt.bicubic:
            save_images(bicubic, opt.outdir / "bicubic", text={"source": str(file), "method": "bicubic"})
        rows.append(torch.cat([F.interpolate(low, scale_factor=factor, mode="nearest"), bicubic, images.cpu()]))
    # The grid: a row per input, [input, bicubic, samples], when the inputs share one size.
    if len({row.shape[-2:] for row in rows}) > 1 and not opt.skip_grid:
        print("grid: skipped (the inputs differ in size)")
        opt.skip_grid = True
    writer.finish(None if opt.skip_grid else torch.cat(rows), opt.n_samples + 2)


cli = command_line(main)
