"""Conversion between the CompVis KL autoencoder (`ldm.models.autoencoder.AutoencoderKL`) and diffusers'
`AutoencoderKL`, both ways.

The two are the same network (Rombach et al. 2022, sec. 3 and appendix G: ResNet levels, a middle
ResNet-attention-ResNet, 1x1 `quant_conv`/`post_quant_conv`) under different names; the mapping is the
one diffusers uses to read CompVis checkpoints (``convert_ldm_vae_checkpoint`` in
``diffusers/loaders/single_file_utils.py``), made exact and invertible. Only the middle attention's 1x1
convolutions change shape: diffusers holds them as Linear weights (C, C) instead of (C, C, 1, 1).

What diffusers' AutoencoderKL can hold: attention only in the middle (`attn_resolutions: []`),
`ch_mult` starting at 1, `z_channels == embed_dim` (its quant convs keep the channel count), convolutional
resampling, and the plain decoder output. Anything else raises ValueError naming the parameter.
The latent scale (our `scale_factor`) is diffusers' `scaling_factor`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ldm.diffusers_bridge.common import check_keys, device_and_dtype, import_diffusers
from ldm.models.autoencoder import AutoencoderKL

if TYPE_CHECKING:
    import diffusers

IDENTITY_LOSS = {"target": "torch.nn.Identity"}

_NETWORK_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")

# Middle-attention submodules -> diffusers `Attention` names.
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _check_representable(ddconfig: Mapping[str, Any], embed_dim: int) -> None:
    def unsupported(param: str, why: str) -> ValueError:
        return ValueError(f"diffusers' AutoencoderKL cannot hold this autoencoder: {param} ({why})")

    if list(ddconfig.get("attn_resolutions", [])):
        raise unsupported(f"attn_resolutions={list(ddconfig['attn_resolutions'])}",
                          "diffusers' KL autoencoder has attention only in its middle block; use []")
    if list(ddconfig["ch_mult"])[0] != 1:
        raise unsupported(f"ch_mult={list(ddconfig['ch_mult'])}", "its first level must keep `ch` channels: start with 1")
    if ddconfig["z_channels"] != embed_dim:
        raise unsupported(f"z_channels={ddconfig['z_channels']} with embed_dim={embed_dim}",
                          "its quant convs keep the latent channel count: make them equal")
    for param, value, why in (("double_z", True, "a KL autoencoder predicts mean and log-variance"),
                              ("resamp_with_conv", True, "its resampling layers are convolutions"),
                              ("give_pre_end", False, "its decoder ends with norm, SiLU and conv_out"),
                              ("tanh_out", False, "its decoder output has no tanh"),
                              ("attn_type", "vanilla", "its attention is the vanilla one")):
        if ddconfig.get(param, value) != value:
            raise unsupported(f"{param}={ddconfig[param]!r}", why)


def diffusers_vae_config(ddconfig: Mapping[str, Any], embed_dim: int, scaling_factor: float) -> dict[str, Any]:
    """The diffusers AutoencoderKL config of the CompVis autoencoder built with `ddconfig` and `embed_dim`."""
    _check_representable(ddconfig, embed_dim)
    levels = len(ddconfig["ch_mult"])
    return {
        "in_channels": ddconfig["in_channels"],
        "out_channels": ddconfig["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
        "layers_per_block": ddconfig["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": ddconfig["z_channels"],
        "norm_num_groups": 32,
        "sample_size": ddconfig["resolution"],
        "scaling_factor": float(scaling_factor),
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def ddconfig_from_diffusers(config: Mapping[str, Any]) -> tuple[dict[str, Any], int, float]:
    """(ddconfig, embed_dim, scaling_factor) of the CompVis autoencoder equal to a diffusers AutoencoderKL."""
    channels = list(config["block_out_channels"])
    for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(block != expected for block in config[key]):
            raise ValueError(f"this diffusers AutoencoderKL has {key}={list(config[key])}: only {expected} levels "
                             "have a CompVis equivalent")
    for key, expected in (("act_fn", "silu"), ("norm_num_groups", 32), ("mid_block_add_attention", True),
                          ("use_quant_conv", True), ("use_post_quant_conv", True)):
        if config.get(key, expected) != expected:
            raise ValueError(f"this diffusers AutoencoderKL has {key}={config[key]!r}; the CompVis autoencoder "
                             f"needs {expected!r}")
    if any(c % channels[0] for c in channels):
        raise ValueError(f"block_out_channels={channels} are not multiples of the first level's channels")
    ddconfig = {
        "double_z": True,
        "z_channels": config["latent_channels"],
        "resolution": config["sample_size"],
        "in_channels": config["in_channels"],
        "out_ch": config["out_channels"],
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": config["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return ddconfig, config["latent_channels"], float(config.get("scaling_factor", 1.0))


def _diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of one CompVis AutoencoderKL state-dict key (`levels` = len(ch_mult))."""
    rules = (
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
        (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        # The decoder's `up[i]` is stored by resolution level (up[0] at full size); diffusers' up_blocks run
        # in execution order, coarsest first.
        (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.",
         lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTENTION_NAMES[m[2]]}."),
        (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
        (r"\.nin_shortcut\.", lambda m: ".conv_shortcut."),
    )
    for pattern, replace in rules:
        key = re.sub(pattern, replace, key)
    return key


def _key_map(ddconfig: Mapping[str, Any], embed_dim: int) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """(CompVis key -> diffusers key, CompVis key -> shape) for the autoencoder built from `ddconfig`."""
    _check_representable(ddconfig, embed_dim)
    with torch.device("meta"):  # shapes and names only
        model = AutoencoderKL(ddconfig=dict(ddconfig), lossconfig=IDENTITY_LOSS, embed_dim=embed_dim)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    key_map = {k: _diffusers_key(k, len(ddconfig["ch_mult"])) for k in shapes}
    if len(set(key_map.values())) != len(key_map):
        raise RuntimeError("two AutoencoderKL keys map to one diffusers key: the mapping is wrong")
    return key_map, shapes


def _is_attention_matrix(key: str) -> bool:
    """A middle-attention q/k/v/proj_out weight: a 1x1 conv here, a Linear in diffusers."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) is not None


def to_diffusers_vae_state_dict(state_dict: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any],
                                embed_dim: int) -> dict[str, torch.Tensor]:
    """A CompVis AutoencoderKL state dict (no `loss.*`) under diffusers' key names and shapes."""
    key_map, shapes = _key_map(ddconfig, embed_dim)
    check_keys(state_dict, shapes, "AutoencoderKL state dict")
    return {key_map[k]: state_dict[k].flatten(1) if _is_attention_matrix(k) else state_dict[k] for k in shapes}


def from_diffusers_vae_state_dict(state_dict: Mapping[str, torch.Tensor],
                                  config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under the CompVis key names and shapes (the inverse mapping)."""
    ddconfig, embed_dim, _ = ddconfig_from_diffusers(config)
    key_map, shapes = _key_map(ddconfig, embed_dim)
    diffusers_shapes = {d: shapes[k][:2] if _is_attention_matrix(k) else shapes[k] for k, d in key_map.items()}
    check_keys(state_dict, diffusers_shapes, "diffusers AutoencoderKL state dict")
    return {k: state_dict[d].reshape(shapes[k]) for k, d in key_map.items()}


def to_diffusers(autoencoder: AutoencoderKL, scaling_factor: float = 1.0) -> diffusers.AutoencoderKL:
    """A diffusers AutoencoderKL with `autoencoder`'s weights (copied), device, dtype and mode; its
    ``encode(x).latent_dist`` and ``decode(z).sample`` equal our `encode` and `decode`.
    `scaling_factor` is the latent diffusion model's `scale_factor`."""
    ddconfig, embed_dim = autoencoder.ddconfig, autoencoder.embed_dim
    # The network only: not the training loss (`loss.*`, with its discriminator) or an EMA copy.
    state = {k: v for k, v in autoencoder.state_dict().items() if k.split(".")[0] in _NETWORK_PARTS}
    device, dtype = device_and_dtype(autoencoder)
    with torch.device(device):
        vae = import_diffusers().AutoencoderKL.from_config(diffusers_vae_config(ddconfig, embed_dim, scaling_factor))
    if vae.dtype != dtype:
        vae.to(dtype)
    vae.load_state_dict(to_diffusers_vae_state_dict(state, ddconfig, embed_dim))
    return vae.train(autoencoder.training)


def from_diffusers(vae: diffusers.AutoencoderKL) -> tuple[AutoencoderKL, float]:
    """(a CompVis AutoencoderKL with the diffusers model's weights, in its device, dtype and mode;
    the latent `scaling_factor`)."""
    ddconfig, embed_dim, scaling_factor = ddconfig_from_diffusers(vae.config)
    state = from_diffusers_vae_state_dict(vae.state_dict(), vae.config)
    device, dtype = device_and_dtype(vae)
    with torch.device(device):
        autoencoder = AutoencoderKL(ddconfig=ddconfig, lossconfig=IDENTITY_LOSS, embed_dim=embed_dim).to(dtype)
    autoencoder.load_state_dict(state)
    return autoencoder.train(vae.training), scaling_factor
