"""The part of x-transformers (as vendored by latent-diffusion) that `BERTEmbedder` uses.

A bidirectional pre-norm transformer encoder (Vaswani et al. 2017, with the pre-LayerNorm placement of
Xiong et al. 2020) over learned token and absolute position embeddings. Module names and nesting follow
the reference so its checkpoints load unchanged:

    token_emb.weight, pos_emb.emb.weight,
    attn_layers.layers.{2i}   = [LayerNorm, Attention]    -> .0.{weight,bias}, .1.to_{q,k,v}.weight, .1.to_out.*
    attn_layers.layers.{2i+1} = [LayerNorm, FeedForward]  -> .0.{weight,bias}, .1.net.0.0.*, .1.net.2.*
    norm.{weight,bias}, to_logits.{weight,bias}

As in the reference there is no attention mask: padding tokens are attended to, and their outputs are
returned too.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.attention import CrossAttention


class AbsolutePositionalEmbedding(nn.Module):
    """A learned embedding per position 0..max_seq_len-1."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, n, dim) embeddings for the n positions of `x` (B, n, ...)."""
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None]


class Attention(CrossAttention):
    """Multi-head self-attention, softmax(QK^T / sqrt(dim_head)) V (Vaswani et al. 2017, eq. 1): the U-Net's
    `CrossAttention` with no context and a plain `to_out` Linear (x-transformers' key names).

    The width is heads * dim_head whatever `dim` is, as in the reference (512 for the defaults).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head)
        self.to_out = nn.Linear(heads * dim_head, dim)


class FeedForward(nn.Module):
    """Linear(dim, mult*dim), exact GELU, Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()),
            # The reference's Dropout (p=0 in every config) sat here; the placeholder keeps the output
            # Linear at index 2, i.e. the key `net.2.*` of its checkpoints.
            nn.Identity(),
            nn.Linear(inner_dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """`depth` pre-norm blocks, each x = x + Attention(LN(x)) then x = x + FeedForward(LN(x))."""

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.dim = dim
        layers = []
        for _ in range(depth):
            layers.append(nn.ModuleList([nn.LayerNorm(dim), Attention(dim, heads=heads, dim_head=dim_head)]))
            layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim)]))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = block(norm(x)) + x
        return x


class TransformerWrapper(nn.Module):
    """Token + position embedding, the `attn_layers` encoder, a final LayerNorm, and a vocabulary head."""

    def __init__(self, num_tokens: int, max_seq_len: int, attn_layers: Encoder, emb_dropout: float = 0.0):
        super().__init__()
        dim = attn_layers.dim
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        # Unused by the embedders (they ask for the embeddings), but part of the reference checkpoints.
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens: torch.Tensor, return_embeddings: bool = False) -> torch.Tensor:
        """`tokens` (B, n) integer ids, n <= max_seq_len -> the final-normed hidden states (B, n, dim) if
        `return_embeddings`, else vocabulary logits (B, n, num_tokens)."""
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex():
            raise TypeError(
                f"TransformerWrapper expects integer token ids of shape (batch, length); got a {tokens.dtype} "
                f"tensor of shape {tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(
                f"sequence of {tokens.shape[1]} tokens is longer than max_seq_len={self.max_seq_len}; "
                "truncate it or build the model with a larger max_seq_len"
            )
        x = self.token_emb(tokens) + self.pos_emb(tokens)
        x = self.norm(self.attn_layers(self.emb_dropout(x)))
        return x if return_embeddings else self.to_logits(x)
