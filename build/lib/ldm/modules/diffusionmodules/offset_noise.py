"""Offset noise (Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org): training noise with a
per-channel constant added, so the model learns to change an image's mean brightness and colour.

With i.i.d. noise the lowest frequency (each channel's mean) is the last to be destroyed: at the
training schedule's end it still carries the data's mean, so the model never learns to generate it and
samples stay mid-grey. Adding s·ε', ε' ~ N(0, 1) per (example, channel), noises that component too.
"""
from __future__ import annotations

import torch


class OffsetNoise:
    """``noise(x) = ε + s·ε'`` with ε ~ N(0, I) of x's shape and ε' ~ N(0, 1) of shape (B, C, 1, …, 1).

    This is the noise of q_sample **and of the training target**: an ε-model learns to predict ε + s·ε'
    and a v-model the v made from it, so each element's noise has variance 1 + s². s = 0 draws ε alone,
    with the same random numbers as without offset noise.
    """

    def __init__(self, strength: float = 0.0) -> None:
        if not (isinstance(strength, (int, float)) and strength >= 0):
            raise ValueError(f"offset_noise_strength must be a number >= 0 (0 disables it; 0.1 is the paper's), "
                             f"got {strength!r}")
        self.strength = float(strength)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        if self.strength == 0:
            return noise
        offset = torch.randn(x.shape[:2] + (1,) * (x.dim() - 2), device=x.device, dtype=x.dtype)
        return noise + self.strength * offset
