"""Reading user images and masks, and writing samples as numbered PNGs and grids.

Images are float tensors NCHW in [−1, 1]; masks N1HW of 0/1, **1 = the region to fill** (white in a mask
PNG), as the reference's inpainting examples.
"""
from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.visualization import make_grid, save_png, to_uint8

Size = Union[int, tuple[int, int], None]  # an int for square, (height, width), or None to keep the file's size


# PIL modes holding more than 8 bits per sample (16-bit PNG and TIFF greys open as these); `convert` would clip
# them at 255, turning a 16-bit image almost white.
WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """`image` as 8-bit `mode` ("RGB" or "L"), whatever it was stored as: 16-bit greys scaled to 8 bits (not
    clipped), transparency (RGBA, LA, palette with a transparent colour) composited over white (what a viewer
    shows), CMYK, palette and bilevel images converted. 32-bit float images are refused by name."""
    if image.mode == "F":
        raise ValueError("32-bit floating-point images are not supported; save it as an 8- or 16-bit PNG")
    if image.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert(mode)


def _open(path: Union[str, Path], mode: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        with Image.open(path) as image:
            return to_rgb(image, mode)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image ({e}); give a PNG or JPEG file") from e
    except ValueError as e:
        raise ValueError(f"cannot use {path}: {e}") from e


def _resized(image: Image.Image, size: Size, resample: int) -> Image.Image:
    if size is None:
        return image
    height, width = (size, size) if isinstance(size, int) else size
    return image if image.size == (width, height) else image.resize((width, height), resample)


def load_image(path: Union[str, Path], size: Size = None) -> torch.Tensor:
    """An RGB image as (1, 3, H, W) in [−1, 1], resized (bicubic) to `size` when given."""
    array = np.asarray(_resized(_open(path, "RGB"), size, Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)[None]


def load_mask(path: Union[str, Path], size: Size = None) -> torch.Tensor:
    """A mask as (1, 1, H, W) of 0/1: grey level ≥ 0.5 (white) is 1, the region to fill (nearest resize)."""
    array = np.asarray(_resized(_open(path, "L"), size, Image.NEAREST), dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """NCHW in [−1, 1] as RGB PIL images."""
    return [Image.fromarray(to_uint8(image)) for image in images]


def next_index(directory: Union[str, Path], prefix: str = "") -> int:
    """One past the highest number N of the files `<prefix>N.png` in `directory` (0 for none), so new files
    never overwrite earlier ones, even when some were deleted."""
    directory = Path(directory)
    numbered = re.compile(rf"^{re.escape(prefix)}(\d+)\.png$")
    numbers = [int(m[1]) for p in directory.iterdir() if (m := numbered.match(p.name))] if directory.is_dir() else []
    return max(numbers, default=-1) + 1


def unused_path(path: Union[str, Path]) -> Path:
    """`path` if nothing is there, else the first free `stem-1.suffix`, `stem-2.suffix`, ... beside it: a new
    output never replaces an input or an earlier output."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def save_images(images: torch.Tensor, directory: Union[str, Path], start: Optional[int] = None,
                text: Union[Mapping[str, str], Sequence[Mapping[str, str]], None] = None) -> list[Path]:
    """One PNG per image, numbered 00000.png, 00001.png, ... from `start` (default: after the existing ones), each
    carrying `text` (one mapping for all, or one per image) and its place in the batch (``batch_index``) as PNG
    text metadata."""
    directory = Path(directory)
    start = next_index(directory) if start is None else start
    texts = [text] * len(images) if text is None or isinstance(text, Mapping) else list(text)
    return [save_png(to_uint8(image), directory / f"{start + i:05d}.png",
                     None if texts[i] is None else {**texts[i], "batch_index": str(i)})
            for i, image in enumerate(images)]


def save_grid(images: torch.Tensor, path: Union[str, Path], nrow: int,
              text: Optional[Mapping[str, str]] = None) -> Path:
    """All images tiled in one PNG, `nrow` per row, with `text` as PNG text metadata."""
    return save_png(to_uint8(make_grid(images.float().cpu(), nrow=nrow)), path, text)
