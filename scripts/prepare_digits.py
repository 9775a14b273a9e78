"""Write scikit-learn's digits (1,797 8x8 images, 10 classes) as a class-folder image set for ImageFolderDataset.

    python scripts/prepare_digits.py                       # -> data/digits/{train,validation}/<digit>/<index>.png
    python scripts/prepare_digits.py --outdir /tmp/digits --size 32 --limit 20

The data ship inside the scikit-learn wheel (`sklearn.datasets.load_digits`), so nothing is downloaded.
Each image's 16 grey levels (0..16) are scaled to 0..255, upscaled with PIL bicubic to `--size` and stored
as RGB. The split is deterministic and stratified: within each class, every 5th image (in load_digits order)
goes to validation, the rest to train (1,442 / 355 images). Files are named by the image's index in
load_digits, zero-padded so the sorted file order is the index order.

Digits stay white on black, as scikit-learn stores them (the value is the amount of ink): the images are then
the raw data, a judge reading them back at 8x8 sees what scikit-learn's own digits classifiers see, and the
plain background is the -1 end of the model's [-1, 1] range.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

VALIDATION_EVERY = 5  # every 5th image of each class: a 20 % validation split with all ten classes
SPLITS = ("train", "validation")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) of 0..16, labels (1797,)) from scikit-learn; a one-line error without it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: scikit-learn is not installed; run `pip install scikit-learn` "
                         "(or `pip install -e .[digits]`)") from None
    digits = load_digits()
    return digits.images, digits.target


def split_of(labels: np.ndarray, limit: Optional[int] = None) -> dict[int, str]:
    """Image index -> "train" / "validation": every VALIDATION_EVERY-th image of each class to validation,
    keeping only the first `limit` images of each class when given."""
    splits: dict[int, str] = {}
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)[:limit]
        for rank, index in enumerate(indices):
            splits[int(index)] = "validation" if rank % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
    return splits


def to_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 array of 0..16 as a `size` x `size` RGB image (0..255, bicubic)."""
    grey = Image.fromarray(np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if size != grey.width:
        grey = grey.resize((size, size), resample=Image.Resampling.BICUBIC)
    return grey.convert("RGB")


def prepare(outdir: Path, size: int = 32, limit: Optional[int] = None) -> dict[str, int]:
    """Write the tree under `outdir` and `outdir/prepared.json`; returns the number of images per split."""
    if size < 8:
        raise SystemExit(f"error: --size must be at least 8 (the digits are 8x8), got {size}")
    if limit is not None and limit < 1:
        raise SystemExit(f"error: --limit must be a positive number of images per class, got {limit}")
    images, labels = load_digits_arrays()
    splits = split_of(labels, limit)
    wanted = {outdir / split / str(int(labels[i])) / f"{i:04d}.png": i for i, split in splits.items()}
    # PNGs left by an earlier run with another --limit would silently join the data: remove them.
    for split in SPLITS:
        for old in (outdir / split).glob("*/*.png"):
            if old not in wanted:
                old.unlink()
    for path, index in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        to_image(images[index], size).save(path)
    counts = {split: sum(1 for s in splits.values() if s == split) for split in SPLITS}
    # Generated data, remade by this script: keep it out of git wherever it is written.
    (outdir / ".gitignore").write_text("*\n")
    (outdir / "prepared.json").write_text(json.dumps({"size": size, "limit": limit, **counts}) + "\n")
    return counts


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", type=Path, default=Path("data/digits"), help="where to write (default %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N images of each class (tests)")
    opt = parser.parse_args(argv)
    counts = prepare(opt.outdir, opt.size, opt.limit)
    print(f"wrote {counts['train']} train and {counts['validation']} validation images of {opt.size}x{opt.size} "
          f"under {opt.outdir}/{{train,validation}}/<digit>/")


if __name__ == "__main__":
    sys.exit(main())
