"""The optimizer the diffusion models train with (Lightning's `configure_optimizers` builds it here)."""
from __future__ import annotations

from collections.abc import Iterable

import torch

# Devices with a fused AdamW kernel in PyTorch.
FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable[torch.nn.Parameter], lr: float, **kwargs: float) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) over `params`, fused where PyTorch has the kernel.

    The fused update reads and writes each parameter, gradient and moment once per step in one kernel;
    the default on the CPU is a Python loop of about ten tensor operations per parameter, which profiled
    at 18-27 % of a training step here (bench/results/performance.md). Same update, same state dict.
    """
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, fused=fused or None, **kwargs)
