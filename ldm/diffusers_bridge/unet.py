"""Conversion between the CompVis U-Net (`UNetModel`) and diffusers' `UNet2DConditionModel`, both ways.

The key mapping is the one diffusers uses to read CompVis checkpoints (``convert_ldm_unet_checkpoint`` and
``DIFFUSERS_TO_LDM_MAPPING["unet"]`` in ``diffusers/loaders/single_file_utils.py``), made exact and
invertible: every tensor is accounted for on both sides, and a key that does not fit raises instead of
being dropped. Weights are only renamed (never reshaped), so the two models compute the same function.

What diffusers can hold: a U-Net with cross-attention SpatialTransformers (``use_spatial_transformer``),
2D, convolutional resampling, channel_mult starting at 1, optionally class-conditional through
``num_classes`` and with adaptive group norm (``use_scale_shift_norm``). Anything else raises ValueError
naming the parameter. The config conversion picks one canonical form where several CompVis params
describe the same network (see `unet_params_from_diffusers`).

diffusers is an optional dependency (the ``bench`` extra): it is imported only by `to_diffusers`, which
builds a diffusers model object. Everything else works on plain configs and state dicts.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ldm.diffusers_bridge.common import check_keys, device_and_dtype, import_diffusers
from ldm.modules.diffusionmodules.openaimodel import UNetModel

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

# The CompVis LatentDiffusion state-dict prefix of the U-Net's weights.
LDM_UNET_PREFIX = "model.diffusion_model."

# UNetModel params with no effect on a U-Net built with use_spatial_transformer (they only steer the
# self-attention AttentionBlocks), so a diffusers config has no place for them; coming back from diffusers
# they take these values, which are those of every latent-diffusion config in configs/.
NO_EFFECT_PARAMS: dict[str, Any] = {"num_heads_upsample": -1, "use_new_attention_order": False, "legacy": False}

# diffusers config values every converted U-Net has: the CompVis architecture's fixed choices (sinusoidal
# timestep embedding laid out [cos, sin] with frequencies max_period^(-i/half), i.e. flip_sin_to_cos and
# freq_shift 0; SiLU; 32-group GroupNorm with eps 1e-5; 1x1-conv transformer projections; the class
# embedding added to the timestep embedding). Each equals UNet2DConditionModel's default, so a key left
# out of a config means this value.
_FIXED_CONFIG: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# Why some diffusers settings have no CompVis counterpart (the error message for a non-default value).
_WHY_UNSUPPORTED = {
    "use_linear_projection": "the CompVis SpatialTransformer projects in and out with 1x1 convolutions "
                             "(Stable Diffusion 2's linear projections are not part of this UNetModel)",
    "addition_embed_type": "the CompVis U-Net adds only a class-label embedding to the timestep embedding",
    "class_embed_type": "the CompVis U-Net's class conditioning is a plain label embedding (num_class_embeds)",
    "act_fn": "the CompVis U-Net uses SiLU throughout",
    "mid_block_type": "the CompVis U-Net's middle is ResBlock, SpatialTransformer, ResBlock",
    "upcast_attention": "the CompVis attention has no float32 upcast switch",
}

_DOWN_BLOCKS = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
_UP_BLOCKS = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}

# ResBlock submodules -> diffusers ResnetBlock2D names (update_unet_resnet_ldm_to_diffusers).
_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}


# ------------------------------------------------------------------------------------------------ configs


def _unet_signature() -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(UNetModel.__init__).parameters.items() if name != "self"}


def unet_params(unet: UNetModel) -> dict[str, Any]:
    """The constructor params of a built `unet`: ``UNetModel(**unet_params(unet))`` builds the same network.

    Sequences come back as lists (as YAML writes them). `num_heads_upsample` is -1 when it equals
    `num_heads` (the model stores it resolved), and `use_fp16` is left out (it can only be False).
    """
    params = {}
    for name in _unet_signature():
        if name == "use_fp16":
            continue
        value = getattr(unet, name)
        params[name] = list(value) if isinstance(value, tuple) else value
    if params["num_heads_upsample"] == params["num_heads"]:
        params["num_heads_upsample"] = -1
    return params


def _complete_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with UNetModel's defaults filled in; unknown or missing required params raise ValueError."""
    signature = _unet_signature()
    unknown = sorted(set(params) - set(signature))
    if unknown:
        raise ValueError(f"not UNetModel params: {unknown}; the params are {sorted(signature)}")
    missing = sorted(n for n, p in signature.items() if p.default is inspect.Parameter.empty and n not in params)
    if missing:
        raise ValueError(f"UNetModel params missing: {missing}")
    full = {n: p.default for n, p in signature.items()}
    full.update(params)
    for name in ("attention_resolutions", "channel_mult"):
        full[name] = [int(v) for v in full[name]]
    return full


def _check_representable(p: Mapping[str, Any]) -> None:
    """Raise ValueError for a UNetModel config that UNet2DConditionModel has no equivalent of."""
    def unsupported(param: str, why: str) -> ValueError:
        return ValueError(f"cannot convert to diffusers: {param}={p[param]!r}: {why}")

    if not p["use_spatial_transformer"]:
        raise unsupported("use_spatial_transformer", "UNet2DConditionModel's attention blocks are cross-attention "
                          "transformers; this U-Net's are self-attention AttentionBlocks")
    if p["context_dim"] is None:
        raise unsupported("context_dim", "UNet2DConditionModel needs the width of the cross-attention context")
    if p["dims"] != 2:
        raise unsupported("dims", "UNet2DConditionModel is 2D only")
    if not p["conv_resample"]:
        raise unsupported("conv_resample", "diffusers' down/upsamplers of these blocks are convolutions, not "
                          "average pooling / plain nearest upsampling")
    if p["resblock_updown"]:
        raise unsupported("resblock_updown", "the diffusers blocks with this layout resample with convolutions, "
                          "not with ResBlocks")
    if p["num_classes"] == "sequential":
        raise unsupported("num_classes", "the vector-input ('adm') label MLP is not mapped to diffusers' class "
                          "embedding types")
    if p["n_embed"] is not None:
        raise unsupported("n_embed", "UNet2DConditionModel has no codebook-logit head (id_predictor)")
    if p["use_fp16"]:
        raise unsupported("use_fp16", "convert the float32 model and cast the result instead")
    if p["channel_mult"][0] != 1:
        raise unsupported("channel_mult", "diffusers sizes conv_in and the timestep embedding from "
                          "block_out_channels[0], the CompVis U-Net from model_channels: channel_mult[0] must be 1")
    if isinstance(p["transformer_depth"], bool) or not isinstance(p["transformer_depth"], int):
        raise unsupported("transformer_depth", "it must be one int (the same depth at every level)")


def _heads_per_level(p: Mapping[str, Any]) -> list[int]:
    """Attention heads of each level's SpatialTransformers (the middle one uses the last level's)."""
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    if p["num_head_channels"] == -1:
        return [p["num_heads"]] * len(channels)
    # Levels without attention never build a transformer: their entry is unused, by diffusers too.
    return [max(1, ch // p["num_head_channels"]) for ch in channels]


def _levels_with_attention(p: Mapping[str, Any]) -> list[bool]:
    """Per level, whether its blocks carry attention (its downsampling factor 2^level is listed)."""
    return [2**level in p["attention_resolutions"] for level in range(len(p["channel_mult"]))]


def diffusers_unet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The `UNet2DConditionModel` config of a UNetModel built with `params`, every key set explicitly.

    `attention_head_dim` holds, for historical reasons in diffusers, the NUMBER of heads: the int
    `num_heads` for a fixed head count, or a per-level list computed from `num_head_channels` (diffusers'
    own CompVis converter leaves it at its default of 8 heads for such configs, which changes the output).
    `use_checkpoint` is no config value in diffusers (`to_diffusers` turns on gradient checkpointing for it);
    `NO_EFFECT_PARAMS` are dropped. Raises ValueError for a config diffusers cannot represent.
    """
    p = _complete_params(params)
    _check_representable(p)
    has_attention = _levels_with_attention(p)
    config = {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "down_block_types": [_DOWN_BLOCKS[a] for a in has_attention],
        "up_block_types": [_UP_BLOCKS[a] for a in reversed(has_attention)],
        "block_out_channels": [p["model_channels"] * m for m in p["channel_mult"]],
        "layers_per_block": p["num_res_blocks"],
        "dropout": p["dropout"],
        "cross_attention_dim": p["context_dim"],
        "transformer_layers_per_block": p["transformer_depth"],
        "attention_head_dim": p["num_heads"] if p["num_head_channels"] == -1 else _heads_per_level(p),
        "num_class_embeds": p["num_classes"],
        "resnet_time_scale_shift": "scale_shift" if p["use_scale_shift_norm"] else "default",
    }
    config.update(_FIXED_CONFIG)
    return config


def _single(config: Mapping[str, Any], key: str) -> Any:
    """A config value given as one value or as a per-block list of equal values, as that one value."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if not value or any(v != value[0] for v in value) or isinstance(value[0], (list, tuple)):
            raise ValueError(f"diffusers config {key}={list(value)!r}: the CompVis U-Net has one value for all levels")
        return value[0]
    return value


def _equivalent(given: Any, expected: Any) -> bool:
    """Whether a config value equals the expected one, a per-block list of equal values counting as one."""
    if isinstance(given, (list, tuple)):
        if isinstance(expected, (list, tuple)):
            return list(given) == list(expected)
        return all(v == expected for v in given)
    return given == expected


def _heads_from_config(config: Mapping[str, Any], channels: list[int], attention_levels: list[int]) -> tuple[int, int]:
    """(num_heads, num_head_channels) for diffusers' per-level head counts `attention_head_dim`."""
    heads = config["attention_head_dim"]
    per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    if len(per_level) != len(channels):
        raise ValueError(f"diffusers config attention_head_dim={heads!r} needs one entry per block "
                         f"({len(channels)})")
    used = [(channels[i], per_level[i]) for i in attention_levels]
    for ch, n in used:
        if not isinstance(n, int) or n <= 0 or ch % n:
            raise ValueError(f"diffusers config attention_head_dim={heads!r}: {n!r} heads do not split {ch} channels")
    widths = {ch // n for ch, n in used}
    if isinstance(heads, (list, tuple)) and len(widths) == 1:
        return -1, widths.pop()
    counts = {n for _, n in used}
    if len(counts) == 1:
        return counts.pop(), -1
    raise ValueError(f"diffusers config attention_head_dim={heads!r}: the CompVis U-Net has either a fixed head count "
                     "(num_heads) or a fixed head width (num_head_channels) at every attention level")


_REQUIRED_KEYS = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
                  "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim")


def unet_params_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The UNetModel params of a `UNet2DConditionModel` config (a model's ``.config`` or its config.json).

    Raises ValueError for a config with no CompVis equivalent, naming the key. Where several CompVis
    params build the same network, the result is one canonical form: `attention_resolutions` ascending
    (only the factors of existing levels), a list `attention_head_dim` as `num_head_channels` when the
    head width is the same at every attention level (else `num_heads`), an int as `num_heads`,
    `NO_EFFECT_PARAMS` at their listed values, and `use_checkpoint` False. A config written by
    `diffusers_unet_config` comes back to params that rebuild the identical network.
    """
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _diffusers_version, ...
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"diffusers config lacks {missing} (a config.json written by save_pretrained has every key)")
    if config["cross_attention_dim"] is None:
        raise ValueError("diffusers config cross_attention_dim=None: the CompVis U-Net's transformers need the "
                         "width of the cross-attention context")
    channels = [int(c) for c in config["block_out_channels"]]
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise ValueError(f"diffusers config block_out_channels={channels}: the CompVis U-Net's level widths are "
                         f"multiples (channel_mult) of the first, {model_channels}")
    unknown_blocks = sorted(set(config["down_block_types"]) - set(_DOWN_BLOCKS.values()))
    if unknown_blocks:
        raise ValueError(f"diffusers config down_block_types has {unknown_blocks}: only "
                         f"{sorted(_DOWN_BLOCKS.values())} have CompVis equivalents")
    if len(config["down_block_types"]) != len(channels):
        raise ValueError(f"diffusers config down_block_types={list(config['down_block_types'])} needs one entry per "
                         f"block_out_channels entry ({len(channels)})")
    attention_levels = [i for i, t in enumerate(config["down_block_types"]) if t == _DOWN_BLOCKS[True]]
    # The middle transformer uses the last level's heads, whether or not that level has attention.
    num_heads, num_head_channels = _heads_from_config(config, channels,
                                                      sorted(set(attention_levels) | {len(channels) - 1}))
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"diffusers config resnet_time_scale_shift={shift!r}: the CompVis ResBlock adds the timestep "
                         "embedding ('default') or applies it as scale and shift ('scale_shift')")
    sample_size = _single(config, "sample_size")
    if not isinstance(sample_size, int):
        raise ValueError(f"diffusers config sample_size={config['sample_size']!r}: the CompVis U-Net needs an int "
                         "image_size (the latent size it was trained at)")
    has_depth = "transformer_layers_per_block" in config
    params = {
        "image_size": sample_size,
        "in_channels": config["in_channels"],
        "model_channels": model_channels,
        "out_channels": config["out_channels"],
        "num_res_blocks": _single(config, "layers_per_block"),
        "attention_resolutions": [2**level for level in attention_levels],
        "dropout": config.get("dropout", 0.0),
        "channel_mult": [c // model_channels for c in channels],
        "conv_resample": True,
        "dims": 2,
        "num_classes": config.get("num_class_embeds"),
        "use_checkpoint": False,
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "use_scale_shift_norm": shift == "scale_shift",
        "resblock_updown": False,
        "use_spatial_transformer": True,
        "transformer_depth": _single(config, "transformer_layers_per_block") if has_depth else 1,
        "context_dim": _single(config, "cross_attention_dim"),
        "n_embed": None,
        **NO_EFFECT_PARAMS,
    }
    expected = diffusers_unet_config(params)
    for key, value in config.items():
        if key not in expected:
            raise ValueError(f"diffusers config key {key!r} ({value!r}) is not one this conversion knows; it "
                             f"covers {sorted(expected)}")
        # attention_head_dim was checked above: its entries at levels without attention are unused.
        if key != "attention_head_dim" and not _equivalent(value, expected[key]):
            why = _WHY_UNSUPPORTED.get(key, "the CompVis UNetModel has no such option")
            raise ValueError(f"diffusers config {key}={value!r} has no CompVis UNetModel equivalent (it needs "
                             f"{expected[key]!r}): {why}")
    return params


# -------------------------------------------------------------------------------------------- state dicts


def _module_names(p: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """CompVis module path -> (diffusers module path, whether it is a ResBlock), per convert_ldm_unet_checkpoint."""
    levels = len(p["channel_mult"])
    blocks = p["num_res_blocks"]
    has_attention = _levels_with_attention(p)
    names = {
        "time_embed.0": ("time_embedding.linear_1", False),
        "time_embed.2": ("time_embedding.linear_2", False),
        "label_emb": ("class_embedding", False),
        "input_blocks.0.0": ("conv_in", False),
        "middle_block.0": ("mid_block.resnets.0", True),
        "middle_block.1": ("mid_block.attentions.0", False),
        "middle_block.2": ("mid_block.resnets.1", True),
        "out.0": ("conv_norm_out", False),
        "out.2": ("conv_out", False),
    }
    index = 1
    for level in range(levels):
        for j in range(blocks):
            names[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", True)
            if has_attention[level]:
                names[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", False)
            index += 1
        if level != levels - 1:
            names[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", False)
            index += 1
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            names[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", True)
            if has_attention[level]:
                names[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", False)
            if level and j == blocks:
                upsample = 2 if has_attention[level] else 1
                names[f"output_blocks.{index}.{upsample}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", False)
            index += 1
    return names


def _diffusers_key(key: str, names: Mapping[str, tuple[str, bool]]) -> str:
    module, param = key.rsplit(".", 1)
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in names:
            target, is_resnet = names[prefix]
            inner = ".".join(parts[n:])
            if is_resnet:
                inner = _RESNET_NAMES[inner]
            # Inside attention blocks (SpatialTransformer = Transformer2DModel) the names are the same.
            return ".".join(s for s in (target, inner, param) if s)
    raise RuntimeError(f"no diffusers name for UNetModel key {key!r}: the mapping misses a module")


def _key_map(params: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """(CompVis key -> diffusers key, CompVis key -> shape) for a UNetModel built with `params`."""
    p = _complete_params(params)
    _check_representable(p)
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation cost
        shapes = {k: v.shape for k, v in UNetModel(**p).state_dict().items()}
    names = _module_names(p)
    key_map = {k: _diffusers_key(k, names) for k in shapes}
    if len(set(key_map.values())) != len(key_map):
        raise RuntimeError("two UNetModel keys map to one diffusers key: the mapping is wrong")
    return key_map, shapes


def diffusers_module_names(params: Mapping[str, Any]) -> dict[str, str]:
    """CompVis module path -> diffusers module path, for every module of a UNetModel built with `params` that holds
    weights (what an adapter such as a LoRA is keyed by: the same mapping as the weights'). ValueError for a U-Net
    diffusers cannot hold."""
    key_map, _ = _key_map(params)
    return {key.rsplit(".", 1)[0]: name.rsplit(".", 1)[0] for key, name in key_map.items() if key.endswith(".weight")}


def _check_unet_keys(state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], what: str) -> None:
    """`check_keys`, with a hint when the keys are a whole LatentDiffusion state dict."""
    hint = ""
    if any(k.startswith(LDM_UNET_PREFIX) for k in state_dict if k not in shapes):
        hint = (f"This looks like a whole LatentDiffusion state dict: pass only the U-Net's part, the keys "
                f"under {LDM_UNET_PREFIX!r} with that prefix removed (its EMA copy, if any, is under 'model_ema.')")
    check_keys(state_dict, shapes, what, hint)


def to_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A UNetModel state dict (no ``model.diffusion_model.`` prefix) under diffusers' key names.

    `params` are the UNetModel's constructor params. Every key must belong to that model and every model
    key must be there, with its shape; otherwise ValueError lists the offending keys. The tensors are the
    given ones, renamed, not copied.
    """
    key_map, shapes = _key_map(params)
    _check_unet_keys(state_dict, shapes, "UNetModel state dict")
    return {key_map[k]: state_dict[k] for k in shapes}


def from_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A `UNet2DConditionModel` state dict under the CompVis UNetModel key names (the inverse mapping).

    `config` is the diffusers model's config; the UNetModel to load the result into is built with
    ``unet_params_from_diffusers(config)``. Keys are checked as in `to_diffusers_state_dict`.
    """
    key_map, shapes = _key_map(unet_params_from_diffusers(config))
    _check_unet_keys(state_dict, {key_map[k]: s for k, s in shapes.items()}, "diffusers UNet2DConditionModel state dict")
    return {k: state_dict[d] for k, d in key_map.items()}


# ----------------------------------------------------------------------------------------------- models


def diffusers_unet_class() -> type[UNet2DConditionModel]:
    """diffusers' `UNet2DConditionModel` class; ImportError saying how to install diffusers when it is missing."""
    return import_diffusers().UNet2DConditionModel


def to_diffusers(unet: UNetModel) -> UNet2DConditionModel:
    """A diffusers `UNet2DConditionModel` with `unet`'s weights (copied), device, dtype and train/eval mode.

    It computes the same outputs: ``model(x, t, encoder_hidden_states=context, class_labels=y).sample``
    equals ``unet(x, t, context, y)``. `use_checkpoint` turns on diffusers' gradient checkpointing.
    """
    params = unet_params(unet)
    device, dtype = device_and_dtype(unet)
    with torch.device(device):  # built where the weights are, not built on the CPU and then moved
        model = diffusers_unet_class().from_config(diffusers_unet_config(params))
    if model.dtype != dtype:  # (diffusers warns on any cast to a dtype, needed or not)
        model.to(dtype)
    model.load_state_dict(to_diffusers_state_dict(unet.state_dict(), params))
    if unet.use_checkpoint:
        model.enable_gradient_checkpointing()
    return model.train(unet.training)


def from_diffusers(model: UNet2DConditionModel) -> UNetModel:
    """A CompVis UNetModel with a diffusers `UNet2DConditionModel`'s weights (copied), device, dtype and mode.

    Its params are ``unet_params_from_diffusers(model.config)``, with `use_checkpoint` set when the diffusers
    model has gradient checkpointing on. Raises ValueError for a model with no CompVis equivalent.
    """
    if not hasattr(model, "config") or not hasattr(model, "is_gradient_checkpointing"):
        raise TypeError(f"from_diffusers takes a diffusers UNet2DConditionModel, got {type(model).__name__}")
    params = unet_params_from_diffusers(model.config)
    params["use_checkpoint"] = bool(model.is_gradient_checkpointing)
    state = from_diffusers_state_dict(model.state_dict(), model.config)
    device, dtype = device_and_dtype(model)
    with torch.device(device):
        unet = UNetModel(**params).to(dtype)
    unet.load_state_dict(state)
    return unet.train(model.training)
