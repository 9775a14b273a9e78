"""Building blocks shared by the diffusion U-Net and its attention layers.

Follows the reference's ``ldm/modules/diffusionmodules/util.py`` (itself from OpenAI's guided-diffusion)
for the parts the U-Net uses. Its hand-written autograd ``CheckpointFunction`` is replaced by PyTorch's
own non-reentrant activation checkpointing, which gives the same saving without re-implementing autograd.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
AVG_POOL_TYPES: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (N,) -> (N, dim), float32.

    Transformer positional encoding (Vaswani et al. 2017, sec. 3.5) applied to t, with frequencies
    ``max_period^(-i/half)`` for i < half, laid out as ``[cos(t·f), sin(t·f)]``: cos first, unlike the
    first-stage DDPM code. Released U-Nets were trained with this exact layout. An odd `dim` gets one zero
    column appended. With `repeat_only`, t itself is repeated `dim` times instead.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must have shape (N,), got {tuple(timesteps.shape)}")
    if repeat_only:
        return timesteps[:, None].float().repeat(1, dim)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(
    func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[nn.Parameter], flag: bool
) -> Any:
    """``func(*inputs)``, with activation checkpointing when `flag` is set and autograd is recording.

    Checkpointing keeps only the inputs and recomputes the intermediate activations during backward,
    trading compute for memory. `params` is the reference's argument (its custom autograd Function had to
    be told which weights receive gradients); non-reentrant checkpointing tracks them by itself, so it is
    accepted for call compatibility and not needed.
    """
    del params  # tracked by autograd itself, see the docstring
    if flag and torch.is_grad_enabled():
        return torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def zero_module(module: nn.Module) -> nn.Module:
    """`module` with every parameter set to zero, returned for chaining.

    Used on the last layer of each residual branch, so that at initialisation every block is the identity
    (the guided-diffusion initialisation), which stabilises early training of deep U-Nets.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, returned in the input dtype.

    Group statistics over large feature maps lose too much precision in float16/bfloat16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # nothing to cast
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The U-Net's normalisation layer: 32-group GroupNorm, eps 1e-5, in float32."""
    return GroupNorm32(32, channels)


def _check_dims(dims: int) -> None:
    if dims not in CONV_TYPES:
        raise ValueError(f"dims must be 1, 2 or 3 (signal dimensionality), got {dims}")


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D convolution; the arguments are those of ``nn.Conv{dims}d``."""
    _check_dims(dims)
    return CONV_TYPES[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D average pooling; the arguments are those of ``nn.AvgPool{dims}d``."""
    _check_dims(dims)
    return AVG_POOL_TYPES[dims](*args, **kwargs)
