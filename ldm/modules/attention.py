"""Cross-attention transformer layers of the latent-diffusion U-Net (Rombach et al. 2022, sec. 3.3).

Module and parameter names follow the reference's ``ldm/modules/attention.py`` so released checkpoints
load unchanged. Attention runs through ``F.scaled_dot_product_attention``, which picks a fused kernel
where one exists and never materialises the full attention matrix when it does not need to.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention softmax(QKᵀ/√d_head)V of `x` over `context` (over `x` itself when None).

    Queries come from `x` (B, N, query_dim), keys and values from `context` (B, M, context_dim).
    `to_q/to_k/to_v` have no bias; `to_out` is ``Sequential(Linear, Dropout)`` as in the reference.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.context_dim = context_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, L, H·D) -> (B, H, L, D) as a view: SDPA takes strided inputs, so no copy is made here.
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if context is None and self.context_dim != x.shape[-1]:
            raise ValueError(
                f"this attention was built for a context of width {self.context_dim}, but none was given; "
                "pass the conditioning as context"
            )
        if context is not None and context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context has {context.shape[-1]} features but this attention was built with "
                f"context_dim={self.context_dim}; set the U-Net's context_dim to the conditioning "
                "encoder's output width"
            )
        # Projections that read the same input run as one matrix product with the weights side by side
        # (q, k, v for self-attention; k, v for cross-attention): fewer, larger products, same result. An adapter
        # wrapping a projection (a peft LoRA layer, ldm/lora.py) computes more than its weight: then each runs itself.
        if not all(type(m) is nn.Linear for m in (self.to_q, self.to_k, self.to_v)):
            source = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        elif context is None:
            q, k, v = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])).chunk(3, -1)
        else:
            q = self.to_q(x)
            k, v = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])).chunk(2, -1)
        # Default scale 1/sqrt(dim_head), as the reference (Vaswani et al. 2017, eq. 1).
        out = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


def _pointwise(conv: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to tokens (B, L, C): as the linear map it is, or, when an adapter wraps it (a peft
    LoRA layer computes more than its weight), as the module itself on the tokens laid out as a (B, C, L, 1) map."""
    if type(conv) is nn.Conv2d:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)
    return conv(tokens.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, eq. 6): value · GELU(gate), both from one projection.

    The first half of `proj`'s output is the value and the second half the gate, as the reference;
    GELU is the exact (erf) form.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise MLP: (GEGLU or Linear+GELU) to ``mult·dim``, dropout, Linear to `dim_out`.

    Keys are ``net.0.proj`` (GEGLU) or ``net.0.0`` (plain), and ``net.2``, as the reference.
    """

    def __init__(
        self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention over `context`, feed-forward.

    ``x = attn1(norm1(x)) + x; x = attn2(norm2(x), context) + x; x = ff(norm3(x)) + x``. With no
    context, `attn2` is a second self-attention (which needs ``context_dim`` None or equal to `dim`).
    With `checkpoint` the block's activations are recomputed in backward instead of stored.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        # Definition order fixes the state_dict key order, which matches the reference's.
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (B, C, H, W), with a residual connection.

    GroupNorm (eps 1e-6), a 1x1 conv `proj_in` to ``n_heads·d_head`` channels, `depth` transformer blocks
    over the H·W tokens, a 1x1 conv `proj_out` back to `in_channels` (zero-initialised, so the layer
    starts as the identity), plus the input. `use_checkpoint` defaults to True because the reference
    always checkpoints its transformer blocks; the U-Net passes its own `use_checkpoint`.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        # eps 1e-6 here but 1e-5 in the U-Net's ResBlocks: the reference uses both, and weights depend on it.
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, checkpoint=use_checkpoint
            )
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        # Work on tokens (B, H·W, C) from the normalised map on: a view of channels-last maps, one copy of
        # the others. The 1x1 convolutions proj_in/proj_out are the same maps as linear layers on tokens, so
        # they run as such (their weights reshaped), without a layout change around each.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = _pointwise(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        tokens = _pointwise(self.proj_out, tokens)
        # x first: the sum takes x's memory layout, so a contiguous U-Net stays contiguous.
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
