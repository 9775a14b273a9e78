"""LoRA files in the key formats other tools load: diffusers' (peft's) and kohya's (AUTOMATIC1111, ComfyUI).

An adapter is held as `Adapter`: our module path in the LatentDiffusion model -> `LoraWeights` (peft's lora_A =
kohya's lora_down, lora_B = lora_up, and alpha; the update is up @ down × alpha / rank). A file names each module
as the ecosystem does, through the same mapping our diffusers export uses for the weights:

- the U-Net: diffusers' UNet2DConditionModel names (`ldm.diffusers_bridge.unet.diffusers_module_names`), which are
  also what kohya's Stable Diffusion LoRAs name (``lora_unet_down_blocks_0_attentions_0_..._attn1_to_q``);
- the text encoder: diffusers' LDMBertModel names for our BERT encoder, transformers' CLIPTextModel names
  (``text_model.encoder.layers.0.self_attn.q_proj``) for Stable Diffusion's CLIP encoder.

diffusers format: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.`` for the text encoder), the
scale alpha / rank folded into lora_B: diffusers' and peft's loaders read a file without alphas at scale 1, so every
loader gives the same update. Alphas a diffusers file carries (``<module>.alpha`` keys or the
``lora_adapter_metadata`` that diffusers' `save_lora_weights` writes) are read back.
kohya format: ``lora_unet_<module with _ for .>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (``lora_te_``
for the text encoder).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Optional

import torch

FORMATS = ("diffusers", "kohya")
UNET_PATH = "model.diffusion_model"  # where the U-Net and the text encoder live in a LatentDiffusion model
TEXT_ENCODER_PATH = "cond_stage_model"
# diffusers' component prefixes and kohya's, for the U-Net and the text encoder.
DIFFUSERS_PREFIXES = {UNET_PATH: "unet", TEXT_ENCODER_PATH: "text_encoder"}
KOHYA_PREFIXES = {UNET_PATH: "lora_unet", TEXT_ENCODER_PATH: "lora_te"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' own key for the LoraConfig it saved


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One adapted module's low-rank update ΔW = up @ down × alpha / rank."""
    down: torch.Tensor  # (rank, in_features) or (rank, in_channels, kh, kw): peft's lora_A, kohya's lora_down
    up: torch.Tensor  # (out_features, rank) or (out_channels, rank, 1, 1): peft's lora_B, kohya's lora_up
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


Adapter = dict[str, LoraWeights]  # our module path in the LatentDiffusion model -> its update


def ecosystem_names(model: Any) -> dict[str, str]:
    """Our module path -> ``"<part path>|<ecosystem module path>"`` where the part is the U-Net or the text encoder,
    for every module with weights that has an ecosystem name (a text encoder with none has no entries)."""
    from ldm.diffusers_bridge.text_encoder import ldmbert_module_names
    from ldm.diffusers_bridge.unet import diffusers_module_names, unet_params
    from ldm.modules.encoders.modules import BERTEmbedder

    names = {f"{UNET_PATH}.{ours}": f"{UNET_PATH}|{theirs}"
             for ours, theirs in diffusers_module_names(unet_params(model.model.diffusion_model)).items()}
    encoder = model.cond_stage_model
    if isinstance(encoder, BERTEmbedder):
        text = ldmbert_module_names(encoder)
    elif type(encoder).__name__ == "FrozenCLIPEmbedder":  # `transformer` is a transformers CLIPTextModel
        text = {f"transformer.{name}": name for name, module in encoder.transformer.named_modules()
                if isinstance(getattr(module, "weight", None), torch.Tensor)}
    else:
        text = {}
    names.update({f"{TEXT_ENCODER_PATH}.{ours}": f"{TEXT_ENCODER_PATH}|{theirs}" for ours, theirs in text.items()})
    return names


def _split(name: str) -> tuple[str, str]:
    part, _, module = name.partition("|")
    return part, module


def _file_module(name: str, fmt: str) -> str:
    """How a `fmt` file names the module `ecosystem_names` calls `name` (the stem its keys share)."""
    part, module = _split(name)
    if fmt == "diffusers":
        return f"{DIFFUSERS_PREFIXES[part]}.{module}"
    return f"{KOHYA_PREFIXES[part]}_{module.replace('.', '_')}"


def to_state_dict(adapter: Adapter, names: Mapping[str, str], fmt: str) -> dict[str, torch.Tensor]:
    """`adapter` as a `fmt` ("diffusers" or "kohya") state dict; ValueError naming a module with no ecosystem name."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}: use one of {', '.join(FORMATS)}")
    state = {}
    for path, weights in adapter.items():
        if path not in names:
            raise ValueError(f"the LoRA adapts {path}, which has no name in the {fmt} format (only the U-Net and a "
                             "BERT or CLIP text encoder have one)")
        key = _file_module(names[path], fmt)
        if fmt == "diffusers":
            state[f"{key}.lora_A.weight"] = weights.down
            state[f"{key}.lora_B.weight"] = weights.up * (weights.alpha / weights.rank)
        else:
            state[f"{key}.lora_down.weight"] = weights.down
            state[f"{key}.lora_up.weight"] = weights.up
            state[f"{key}.alpha"] = torch.tensor(float(weights.alpha))
    return state


def detect_format(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """"kohya", "diffusers", or None for a file in neither LoRA format."""
    keys = list(state)
    if keys and all(k.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES.values())) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    return None


def _metadata_alpha(metadata: Mapping[str, str], prefix: str, module: str) -> Optional[float]:
    """The alpha diffusers' `save_lora_weights` recorded for `module` of component `prefix` (its LoraConfig in
    the ``lora_adapter_metadata`` JSON, keys prefixed by the component), or None."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    config = {k.removeprefix(f"{prefix}."): v for k, v in json.loads(raw).items() if k.startswith(f"{prefix}.")}
    if config.get("use_rslora"):
        raise ValueError("the LoRA was trained with rank-stabilised scaling (use_rslora), which is not supported")
    from peft.utils.other import get_pattern_key  # peft's own rule for its alpha_pattern keys

    pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(pattern.keys(), module)
    return float(pattern[key]) if key in pattern else (float(config["lora_alpha"]) if "lora_alpha" in config else None)


def from_state_dict(state: Mapping[str, torch.Tensor], names: Mapping[str, str],
                    metadata: Optional[Mapping[str, str]] = None) -> Adapter:
    """The adapter a diffusers- or kohya-format state dict holds, keyed by our module paths. ValueError for keys in
    neither format and for modules this model does not have (a LoRA made for another model)."""
    fmt = detect_format(state)
    if fmt is None:
        raise ValueError("it holds no LoRA weights in diffusers' format (<module>.lora_A.weight / .lora_B.weight) "
                         "or kohya's (lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha)")
    lookup = {_file_module(name, fmt): ours for ours, name in names.items()}
    suffixes = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"} if fmt == "kohya" else \
        {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha"}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        kind = next((kind for kind, suffix in suffixes.items() if key.endswith(suffix)), None)
        if kind is None:
            raise ValueError(f"key {key!r} is not part of a {fmt}-format LoRA")
        modules.setdefault(key[: -len(suffixes[kind])], {})[kind] = value
    unknown = sorted(m for m in modules if m not in lookup)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ValueError(f"it adapts {shown}, which this model does not have: it is a LoRA for another model")
    adapter = {}
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"{module} has no {'down' if 'down' not in parts else 'up'} weight: the file is incomplete")
        rank = parts["down"].shape[0]
        alpha = parts.get("alpha")
        if alpha is None and fmt == "diffusers" and metadata:
            part, name = _split(names[lookup[module]])
            alpha = _metadata_alpha(metadata, DIFFUSERS_PREFIXES[part], name)
        # No alpha anywhere (our own diffusers files, which fold it into lora_B): diffusers' convention, scale 1.
        adapter[lookup[module]] = LoraWeights(parts["down"], parts["up"], float(rank if alpha is None else alpha))
    return adapter
