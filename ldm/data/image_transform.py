"""What the image datasets do to a decoded picture: RGB, resize the shorter side to ``size``, crop to ``size`` x
``size`` (``center`` or ``random``), mirror left-right with probability ``flip_p``, scale to float32 in [-1, 1].

One class, so the folder datasets (`ldm.data.folder`) and the shard streams (`ldm.data.shards`) give the same
pixels for the same image and options. Random crops and flips use torch's global generator, which Lightning seeds
and each DataLoader worker reseeds (`ldm.data.datamodule.worker_init_fn`).
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, Optional, Union

import numpy as np
import torch
from PIL import Image

from ldm.image_io import to_rgb

CROPS = ("center", "random")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
# PIL raises these for truncated, corrupt or unsupported files.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(file: Union[str, Path, IO[bytes]]) -> Image.Image:
    """The image in `file` (a path or a binary file object), fully read and converted to RGB (`to_rgb`); raises one
    of `UNREADABLE_IMAGE_ERRORS` for a damaged file."""
    with Image.open(file) as image:
        image.load()
        return to_rgb(image)


class ImageTransform:
    """Resize, crop, flip and scale an RGB PIL image (`load_rgb`) to an (size, size, 3) float32 array in [-1, 1] (module docstring);
    ``size=None`` keeps the stored size."""

    def __init__(self, size: Optional[int] = 256, crop: str = "center", interpolation: str = "bicubic",
                 flip_p: float = 0.5) -> None:
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}: use one of {CROPS}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}: use one of {tuple(INTERPOLATIONS)}")
        if size is not None and size < 1:
            raise ValueError(f"size must be a positive number of pixels (or null to keep the stored size), got {size}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p}")
        self.size = size
        self.crop = crop
        self.interpolation = INTERPOLATIONS[interpolation]
        self.flip_p = flip_p

    @property
    def random_augmentation(self) -> bool:
        """Whether an image's pixels vary between visits (random crop or flips): then they cannot be cached."""
        return self.crop == "random" or self.flip_p > 0

    def resize_crop(self, image: Image.Image) -> Image.Image:
        if self.size is None:
            return image
        width, height = image.size
        scale = self.size / min(width, height)
        new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        image = image.resize(new_size, resample=self.interpolation)
        spare_x, spare_y = new_size[0] - self.size, new_size[1] - self.size
        if self.crop == "random":
            left = int(torch.randint(spare_x + 1, ()).item())
            top = int(torch.randint(spare_y + 1, ()).item())
        else:
            left, top = spare_x // 2, spare_y // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = self.resize_crop(image)
        if self.flip_p > 0 and torch.rand(()).item() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.float32) / 127.5 - 1.0
