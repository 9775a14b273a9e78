"""Write inpainting example pairs (``name.png`` + ``name_mask.png``, and the image's caption in ``name.txt``)
from the built-in held-out test split.

    python scripts/make_inpainting_examples.py                       # 6 pairs at 32x32 in data/inpainting_examples
    python scripts/make_inpainting_examples.py --n 16 --size 64 --outdir my_examples
    python scripts/inpaint.py --indir data/inpainting_examples

The images are the first ``--n`` items of the compositional test split (ldm/data/shapes.py, ``ShapesTest``)
and the masks are that split's own random box and brush-stroke masks (ldm/data/masks.py). Both are pure
functions of the item index, so the output is the same on every run and machine. Masks are written as the
reference's examples are: white (255) marks the region to fill, black (0) the pixels to keep.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ldm.data.shapes import DEFAULT_NUM_SAMPLES, ShapesTest
from ldm.script_args import HelpFormatter, command_line, positive_int
from ldm.visualization import save_png, to_uint8


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--outdir", type=Path, default=Path("data/inpainting_examples"), help="where to write")
    parser.add_argument("--n", type=positive_int, default=6, help="number of image/mask pairs")
    parser.add_argument("--size", type=int, default=32,
                        help="side in pixels (32 = the built-in models' training size)")
    return parser


def write_examples(outdir: Path, n: int, size: int) -> list[tuple[Path, Path]]:
    """Write the first `n` test-split items and their masks at `size` pixels; returns the (image, mask) paths."""
    dataset = ShapesTest(size=size, num_samples=n, with_mask=True)
    pairs = []
    for index in range(n):
        item = dataset[index]
        image = to_uint8(torch.from_numpy(item["image"]).permute(2, 0, 1))
        mask = (item["mask"][:, :, 0] * 255).astype(np.uint8)  # 0/1 -> black keep / white fill
        name = f"shapes_test_{index:03d}"
        pairs.append((save_png(image, outdir / f"{name}.png"), save_png(mask, outdir / f"{name}_mask.png")))
        (outdir / f"{name}.txt").write_text(item["caption"] + "\n", encoding="utf-8")  # inpaint.py's prompt for it
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = get_parser()
    opt = parser.parse_args(argv)
    if opt.n > DEFAULT_NUM_SAMPLES["test"]:
        parser.error(f"--n {opt.n}: the test split has {DEFAULT_NUM_SAMPLES['test']} items; ask for at most that many")
    try:
        pairs = write_examples(opt.outdir, opt.n, opt.size)
    except ValueError as e:  # a size too small to draw shapes at
        parser.error(f"--size: {e}")
    print(f"wrote {len(pairs)} image/mask pairs to {opt.outdir}")


cli = command_line(main)
