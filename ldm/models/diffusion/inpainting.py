"""Latent diffusion trained for inpainting: the condition is the masked image and its mask.

The U-Net sees ``[z_t, E(masked image), mask↓]`` stacked on channels (``conditioning_key: concat``, so
``in_channels = 2·C + 1``), as the reference's ``inpainting_big`` model and Stable Diffusion's inpainting
model do. The mask is 1 where the model must fill (``masked_image = (1 − mask) · image``, the reference's
convention) and is resized to the latent grid by nearest-neighbour interpolation, as the reference's
``scripts/inpaint.py`` does, so its released inpainting checkpoint sees the inputs it was trained on.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class LatentInpaintDiffusion(LatentDiffusion):
    """`LatentDiffusion` whose condition is ``(masked image, mask)``, encoded by the frozen first stage.

    The raw condition is one NCHW tensor, the masked image's channels then the mask channel (so samplers,
    loggers and `get_input` handle it as any image condition); `get_learned_conditioning` turns it into the
    concat input ``[scale_factor · E(masked image), mask↓]``. The latent of the masked image is the posterior
    mode (deterministic) times the same `scale_factor` as z, so both have the statistics the U-Net expects.
    """

    def __init__(self, mask_key: str = "mask", masked_image_key: str = "masked_image",
                 cond_stage_config: Any = "__is_first_stage__", conditioning_key: Optional[str] = "concat",
                 cond_stage_key: str = "masked_image", **kwargs: Any) -> None:
        if cond_stage_config != "__is_first_stage__":
            raise ValueError("LatentInpaintDiffusion encodes the masked image with the first stage; set "
                             "cond_stage_config: __is_first_stage__ (or leave it out)")
        if conditioning_key != "concat":
            raise ValueError(f"LatentInpaintDiffusion stacks its condition on channels; conditioning_key must be "
                             f"'concat', got {conditioning_key!r}")
        super().__init__(cond_stage_config=cond_stage_config, conditioning_key=conditioning_key,
                         cond_stage_key=cond_stage_key, **kwargs)
        self.mask_key = mask_key
        self.masked_image_key = masked_image_key

    def get_raw_condition(self, batch: Mapping, key: Optional[str] = None) -> torch.Tensor:
        """``cat([masked image, mask])`` on channels, NCHW (the mask 1 = fill)."""
        for name in (self.masked_image_key, self.mask_key):
            if name not in batch:
                raise KeyError(f"an inpainting batch needs {name!r} (it has {sorted(batch)}); the built-in data "
                               "gives it with `with_mask: true` in the dataset params")
        return torch.cat([DDPM.get_input(self, batch, self.masked_image_key),
                          DDPM.get_input(self, batch, self.mask_key)], dim=1)

    def get_learned_conditioning(self, c: torch.Tensor) -> torch.Tensor:
        """``[scale_factor · E(masked image), mask resized to the latent grid]`` from `get_raw_condition`'s tensor."""
        return self.inpainting_condition(c[:, :-1], c[:, -1:])

    @torch.no_grad()
    def inpainting_condition(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The U-Net's concat input for a masked image (N, 3, H, W) in [−1, 1] and its mask (N, 1, H, W)."""
        posterior = self.encode_first_stage(masked_image.to(self.device))
        latent = posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        latent = self.get_first_stage_encoding(latent)  # the same scaling (and channel norm) as z
        mask = F.interpolate(mask.to(latent), size=latent.shape[-2:])
        return torch.cat([latent, mask], dim=1)
