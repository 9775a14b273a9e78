"""The sampling noise: one generator for a batch, or one per image.

With a list of `torch.Generator`s (one per image, as diffusers' pipelines accept), image i's noise, the start
x_T and every noise a stochastic sampler adds, comes from generator i alone: the same seed gives the same image
whatever else is in the batch (up to float rounding in batched matrix products).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def generators_for(seeds: Sequence[int], device: Union[str, torch.device] = "cpu") -> list[torch.Generator]:
    """One generator per seed."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def randn(shape: Sequence[int], generator: Generators = None, device: Optional[torch.device] = None,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Standard normal noise of `shape` from `generator` (none: the global one; a list: one per image)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per image")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                        for g in generator]).to(device)
