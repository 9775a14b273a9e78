"""The diffusion U-Net (denoiser) of latent diffusion.

Architecture of Dhariwal & Nichol 2021 ("ADM", guided-diffusion) with the cross-attention
SpatialTransformer of Rombach et al. 2022 (sec. 3.3). Module and parameter names, constructor parameters
and numerics follow the reference's ``ldm/modules/diffusionmodules/openaimodel.py`` so its configs and
checkpoints work unchanged. Left out: the reference's dead float16 conversion helpers (mixed precision
is done with autocast instead), and its encoder-only classifier variant, which nothing here uses.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module, abc.ABC):
    """A layer whose forward takes the timestep embedding as a second argument."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """`x` transformed under the timestep embedding `emb` (B, emb_channels)."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands `emb` to TimestepBlocks and `context` to SpatialTransformers."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 (the inner two axes only for 3D signals), then an optional 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.dims = dims
        self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1) if use_conv else None
        if not use_conv and self.out_channels != channels:
            raise ValueError(f"Upsample without conv cannot change channels ({channels} -> {self.out_channels})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, size=(x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """Halves the resolution (the inner two axes for 3D): stride-2 3x3 conv, or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample without conv cannot change channels ({channels} -> {self.out_channels})")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020 / Dhariwal & Nichol 2021).

    ``in_layers`` = [GN, SiLU, conv3x3]; the projected embedding is added (or, with
    `use_scale_shift_norm`, applied as ``GN(h)·(1+scale)+shift``, adaptive group norm, ADM sec. 3);
    ``out_layers`` = [GN, SiLU, Dropout, conv3x3 (zero-initialised)]; plus the skip (identity, or a 1x1
    conv when channels change). With `up`/`down` the block also resamples both paths (resblock_updown).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out_channels = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the conv, so the conv runs at the new resolution.
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.view(*emb_out.shape, *([1] * (h.dim() - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head attention on a fused (B, 3·H·C, T) qkv tensor.

    Two channel layouts exist in the reference's checkpoints: per head [q, k, v] (``QKVAttentionLegacy``,
    guided-diffusion's older one; `legacy_order`) or [q of all heads, k, v] (``QKVAttention``, the
    `use_new_attention_order` one). Neither has weights, so one class serves both.
    """

    def __init__(self, n_heads: int, legacy_order: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.legacy_order = legacy_order

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        b, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.legacy_order:
            q, k, v = qkv.view(b, self.n_heads, 3 * ch, length).split(ch, dim=2)
        else:
            q, k, v = qkv.view(b, 3, self.n_heads, ch, length).unbind(1)
        return _attend(q, k, v)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QᵀK/√C)·V for channel-first heads (B, H, C, T), returned as (B, H·C, T).

    The reference scales q and k each by C^-1/4; the product is the same 1/√C that SDPA applies.
    """
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).flatten(1, 2)


class AttentionBlock(nn.Module):
    """Self-attention over all positions of a feature map, with a residual connection (ADM).

    GN, a 1x1 conv to fused qkv, multi-head attention, a zero-initialised 1x1 conv `proj_out`, plus the
    input. The reference always checkpoints this block whatever `use_checkpoint` says; here the flag is
    honoured.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels do not split into {num_heads} heads")
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(num_heads, legacy_order=not use_new_attention_order)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """Timestep- (and optionally class- or text-) conditional U-Net predicting noise, x0 or v.

    Encoder: a conv, then per level `num_res_blocks` ResBlocks (each followed by attention when the
    level's downsample factor is in `attention_resolutions` — factors 1, 2, 4, ..., not pixel sizes) and a
    downsampling layer except after the last level. Middle: ResBlock, attention, ResBlock. Decoder: the
    mirror image with ``num_res_blocks + 1`` blocks per level, each taking the matching encoder output
    concatenated on channels. Attention is a SpatialTransformer (cross-attention on `context`, width
    `context_dim`) with `use_spatial_transformer`, else a self-attention AttentionBlock.

    Heads: `num_heads` fixed per layer, or `num_head_channels` per head (heads = channels // that).
    `num_heads_upsample` only affects decoder AttentionBlocks with `legacy` and `num_head_channels` -1,
    as in the reference. `num_classes` adds a label embedding to the timestep embedding (input `y`: class
    indices (B,)); ``num_classes="sequential"`` (Stable Diffusion 2's "adm" input) instead maps a vector
    y (B, `adm_in_channels`), e.g. a learned class embedding, through a two-layer MLP to that embedding;
    `n_embed` makes the model output logits over a first-stage codebook of that size (`id_predictor`).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Union[int, str, None] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: Optional[int] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        adm_in_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        if (num_classes == "sequential") != (adm_in_channels is not None):
            raise ValueError("adm_in_channels (the width of the vector y) goes with num_classes='sequential', and "
                             f"only with it; got num_classes={num_classes!r}, adm_in_channels={adm_in_channels!r}")
        if use_fp16:
            raise ValueError(
                "use_fp16=True is not supported: train or sample in mixed precision instead (Lightning "
                "precision='16-mixed' or 'bf16-mixed', or torch.autocast), which keeps float32 weights"
            )
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the conditioning)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(
                "context_dim is set but use_spatial_transformer is False: cross-attention conditioning needs "
                "use_spatial_transformer=True (or drop context_dim)"
            )
        if use_spatial_transformer and dims != 2:
            raise ValueError(f"the SpatialTransformer works on 2D feature maps; got dims={dims}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels (both are -1)")
        if model_channels % 32:
            raise ValueError(
                f"model_channels must be a multiple of 32 (GroupNorm uses 32 groups), got {model_channels}"
            )
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.n_embed = n_embed
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_new_attention_order = use_new_attention_order
        self.use_spatial_transformer = use_spatial_transformer
        self.transformer_depth = transformer_depth
        self.context_dim = context_dim
        self.legacy = legacy
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.adm_in_channels = adm_in_channels
        if num_classes == "sequential":
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))
        elif num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims, use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm, up=up, down=down,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, decoder=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res_block(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                )
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), self._attention(ch, decoder=False), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, decoder=True))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True) if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # The reference builds these from `model_channels`; `ch` is the same whenever channel_mult[0] == 1
        # (every released config) and, unlike it, also correct otherwise.
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1))
        )
        if n_embed is not None:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, ch, n_embed, 1))

    def _attention(self, ch: int, decoder: bool) -> nn.Module:
        """The attention layer at a level with `ch` channels, with the reference's choice of heads."""
        if self.num_head_channels != -1:
            if ch % self.num_head_channels:
                raise ValueError(
                    f"{ch} channels do not split into heads of num_head_channels={self.num_head_channels}"
                )
            heads = ch // self.num_head_channels
        else:
            use_upsample_heads = decoder and self.legacy and not self.use_spatial_transformer
            heads = self.num_heads_upsample if use_upsample_heads else self.num_heads
            if heads <= 0 or ch % heads:
                raise ValueError(f"{ch} channels do not split into {heads} attention heads; change num_heads")
        if self.use_spatial_transformer:
            # The reference passes no dropout to the transformer; `dropout` applies to the ResBlocks only.
            return SpatialTransformer(
                ch, heads, ch // heads, depth=self.transformer_depth, context_dim=self.context_dim,
                use_checkpoint=self.use_checkpoint,
            )
        return AttentionBlock(
            ch, num_heads=heads, use_checkpoint=self.use_checkpoint,
            use_new_attention_order=self.use_new_attention_order,
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The model output for noisy input `x` (B, C, ...) at integer or real `timesteps` (B,).

        `context` (B, L, context_dim) is the cross-attention conditioning, `y` (B,) the class labels.
        Returns (B, out_channels, ...), or codebook logits (B, n_embed, ...) when built with `n_embed`.
        """
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps, a tensor of shape (B,)")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "pass class labels y if and only if the model is class-conditional (num_classes="
                f"{self.num_classes}, y {'given' if y is not None else 'missing'})"
            )
        if context is not None and not self.use_spatial_transformer:
            raise ValueError(
                "context was given but this U-Net has no cross-attention; build it with "
                "use_spatial_transformer=True and context_dim, or pass context=None"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            expected = (x.shape[0],) if self.adm_in_channels is None else (x.shape[0], self.adm_in_channels)
            if y.shape != expected:
                what = "one class index" if self.adm_in_channels is None else f"a vector of {self.adm_in_channels}"
                raise ValueError(f"y must hold {what} per sample, shape {expected}; got {tuple(y.shape)}")
            emb = emb + self.label_emb(y.to(emb.dtype) if self.adm_in_channels is not None else y)

        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
