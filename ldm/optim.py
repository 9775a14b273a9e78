"""The optimizer the diffusion models train with (Lightning's `configure_optimizers` builds it here)."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, **kwargs: float) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) over `params` with PyTorch's defaults otherwise."""
    return torch.optim.AdamW(params, lr=lr, **kwargs)
