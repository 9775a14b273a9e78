"""Low-/high-resolution pairs for super-resolution (LDM paper, sec. 4.4): any image dataset, each image with
a degraded copy at 1/`factor` of its size under ``LR_image`` (the reference's key).

Degradations (`DEGRADATIONS`):

- ``bicubic``: anti-aliased bicubic downsampling, the SR3 / LDM-SR evaluation setting;
- ``bsr_light``: in the spirit of the reference's ``degradation_bsrgan_variant`` light setting (Zhang et al.
  2021, "Designing a Practical Degradation Model for Deep Blind Image Super-Resolution"): a Gaussian blur
  of random width, downsampling with a random interpolation, Gaussian noise of random strength and JPEG
  compression of random quality, each drawn per image (ranges in `bsr_light`). The reference also shuffles the order and adds camera-sensor noise;
  this variant keeps the fixed order blur → resize → noise → JPEG.

Every draw comes from ``numpy.random.default_rng([seed, index])``, so an item's degradation is the same in
every epoch, worker and process (as the built-in data). The bicubic upsampling of the low-resolution image
(`bicubic_upsample`) is the baseline the super-resolution model is measured against.
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ldm.util import instantiate_from_config

DEGRADATIONS = ("bicubic", "bsr_light")
BLUR_SIGMA_RANGE = (0.1, 1.0)  # in low-resolution pixels, before downsampling: ×factor in the image
RESIZE_MODES = ("bilinear", "bicubic", "area")
NOISE_STD_RANGE = (1 / 255, 8 / 255)  # on the [0, 1] scale
JPEG_QUALITY_RANGE = (40, 95)


def _to_nchw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def _to_hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).numpy().astype(np.float32)


def _check_size(image: np.ndarray, factor: int) -> None:
    if image.ndim != 3 or image.shape[0] % factor or image.shape[1] % factor:
        raise ValueError(f"super-resolution by {factor} needs HWC images whose sides are multiples of {factor}, "
                         f"got shape {image.shape}")


def bicubic_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, C) in [-1, 1] -> (H/factor, W/factor, C): anti-aliased bicubic (as PIL's and MATLAB's imresize)."""
    _check_size(image, factor)
    small = F.interpolate(_to_nchw(image), scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return _to_hwc(small.clamp(-1, 1))


def bicubic_upsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, h·factor, w·factor) bicubic, clamped to [-1, 1]: the baseline of super-resolution."""
    return F.interpolate(images, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    padded = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    array = ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 127.5 - 1
    return _to_nchw(decoded)


def bsr_light(image: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) in [-1, 1] -> (H/factor, W/factor, 3): blur (σ uniform in BLUR_SIGMA_RANGE low-resolution
    pixels), resize with a random mode of RESIZE_MODES, Gaussian noise (std uniform in NOISE_STD_RANGE) and
    JPEG (quality uniform in JPEG_QUALITY_RANGE)."""
    _check_size(image, factor)
    x = _gaussian_blur(_to_nchw(image), float(rng.uniform(*BLUR_SIGMA_RANGE)) * factor)
    mode = RESIZE_MODES[rng.integers(len(RESIZE_MODES))]
    size = (image.shape[0] // factor, image.shape[1] // factor)
    x = F.interpolate(x, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    noise = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    x = (x + 2 * float(rng.uniform(*NOISE_STD_RANGE)) * noise).clamp(-1, 1)  # ×2: std on the [0, 1] scale
    return _to_hwc(_jpeg(x, int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))))


def degrade(image: np.ndarray, factor: int, degradation: str, rng: np.random.Generator) -> np.ndarray:
    """The low-resolution input of `image` under `degradation` (one of `DEGRADATIONS`)."""
    if degradation == "bicubic":
        return bicubic_downsample(image, factor)
    if degradation == "bsr_light":
        return bsr_light(image, factor, rng)
    raise ValueError(f"unknown degradation {degradation!r}; choose one of {', '.join(DEGRADATIONS)}")


class SuperResolutionPairs(Dataset):
    """Any image dataset's items plus ``LR_image``: the ``image`` degraded to 1/`factor` of its size.

    `dataset` is a dataset or its config (``target``/``params``), e.g. the built-in ``ShapesTrain`` or an
    ``ImageFolderDataset`` of your own images (configs/latent-diffusion/sr_folder.yaml).
    """

    def __init__(self, dataset: Union[Dataset, Mapping[str, Any]], factor: int = 4, degradation: str = "bicubic",
                 seed: int = 0) -> None:
        if degradation not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {degradation!r}; choose one of {', '.join(DEGRADATIONS)}")
        if factor < 2:
            raise ValueError(f"factor must be at least 2, got {factor}")
        self.dataset = instantiate_from_config(dataset) if isinstance(dataset, Mapping) else dataset
        self.factor = factor
        self.degradation = degradation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        rng = np.random.default_rng([self.seed, index])
        item["LR_image"] = degrade(np.asarray(item["image"], dtype=np.float32), self.factor, self.degradation, rng)
        return item
