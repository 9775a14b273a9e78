"""LoRA (Hu et al. 2021) on a LatentDiffusion model, through peft: adapters added for training, read from and
written to files (`ldm.lora_formats`), applied with a scale each at sampling, merged into the weights.

Training (`add_lora`, from a config's `model.params.lora_config`): every base weight is frozen and peft wraps the
target modules (the U-Net's attention projections by default; the text encoder's too when asked) in its LoRA
layers under the adapter name "default"; only those low-rank weights train and are checkpointed
(`training_state`). Sampling (`apply_loras`): each file becomes one more peft adapter with its own scale, merged
into the weights and unwrapped by default, so the model's modules and state-dict keys are the plain ones again.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open

from ldm.checkpoint import CheckpointError, load_state_dict, save_safetensors
from ldm.lora_formats import (FORMATS, TEXT_ENCODER_PATH, UNET_PATH, Adapter, LoraWeights, ecosystem_names,
                              from_state_dict, to_state_dict)

INSTALL_HINT = "pip install 'ldm[lora]' (or pip install peft)"
TRAINED = "default"  # peft's name of the adapter being trained
# The U-Net's attention projections (q, k, v and the output's Linear in CrossAttention); the BERT encoder's
# attention has a plain Linear `to_out`.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("to_q", "to_k", "to_v", "to_out")

LoraSpec = Union[str, Path, tuple[Union[str, Path], float]]  # a file, or (file, scale)


class LoraError(ValueError):
    """A LoRA that cannot be used here: peft missing, a file in no LoRA format, an adapter for another model."""


def import_peft() -> Any:
    """The peft module; `LoraError` saying how to install it when it is missing."""
    try:
        import peft
    except ImportError as e:
        raise LoraError(f"LoRA needs the peft package: {INSTALL_HINT}") from e
    return peft


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """`model.params.lora_config`: rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's input,
    the U-Net modules to adapt (names or name endings, as peft matches them) and, with `text_encoder`, the text
    encoder's; `file_format` is the key format of the adapter file a run writes beside its checkpoints
    (``last.safetensors``: diffusers' or kohya's, `ldm.lora_formats`)."""
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = UNET_TARGETS
    text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGETS
    file_format: str = "diffusers"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LoraSettings:
        """ValueError naming an unknown key or a bad value."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"lora_config: unknown key(s) {unknown}; the keys are {sorted(fields)}")
        values = dict(config)
        for key in ("target_modules", "text_encoder_target_modules"):
            if key in values:
                if isinstance(values[key], str) or not values[key]:
                    raise ValueError(f"lora_config.{key} must be a non-empty list of module names, got {values[key]!r}")
                values[key] = tuple(str(v) for v in values[key])
        settings = cls(**values)
        if not (isinstance(settings.rank, int) and settings.rank >= 1):
            raise ValueError(f"lora_config.rank must be an integer >= 1, got {settings.rank!r}")
        if not settings.alpha > 0:
            raise ValueError(f"lora_config.alpha must be > 0, got {settings.alpha!r}")
        if not 0 <= settings.dropout < 1:
            raise ValueError(f"lora_config.dropout must be in [0, 1), got {settings.dropout!r}")
        if settings.file_format not in FORMATS:
            raise ValueError(f"lora_config.file_format must be one of {', '.join(FORMATS)}, "
                             f"got {settings.file_format!r}")
        return settings


def _inject(config: Any, root: torch.nn.Module, adapter_name: str, where: str) -> None:
    peft = import_peft()
    try:
        peft.inject_adapter_in_model(config, root, adapter_name=adapter_name)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise LoraError(f"{where}: {str(e).splitlines()[0]}") from e


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> int:
    """Freeze every weight of `model` and add a trainable LoRA adapter (named "default") to its U-Net's target
    modules and, with `settings.text_encoder`, its text encoder's. Returns the number of trainable parameters."""
    peft = import_peft()
    model.requires_grad_(False)
    common = dict(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout)
    _inject(peft.LoraConfig(target_modules=list(settings.target_modules), **common),
            model.get_submodule(UNET_PATH), TRAINED, "lora_config.target_modules (U-Net)")
    if settings.text_encoder:
        if model.cond_stage_model is None or model.cond_stage_model is model.first_stage_model:
            raise LoraError("lora_config.text_encoder: this model has no text encoder of its own")
        _inject(peft.LoraConfig(target_modules=list(settings.text_encoder_target_modules), **common),
                model.get_submodule(TEXT_ENCODER_PATH), TRAINED, "lora_config.text_encoder_target_modules")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lora_layers(model: torch.nn.Module) -> Iterable[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return ((name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer))


def trained_adapter(model: torch.nn.Module, adapter_name: str = TRAINED) -> Adapter:
    """The adapter `adapter_name` of `model` as it is now (copies), keyed by module path."""
    adapter = {}
    for name, layer in _lora_layers(model):
        if adapter_name in layer.lora_A:
            adapter[name] = LoraWeights(layer.lora_A[adapter_name].weight.detach().clone(),
                                        layer.lora_B[adapter_name].weight.detach().clone(),
                                        float(layer.lora_alpha[adapter_name]))
    return adapter


# ------------------------------------------------------------------------------------------------ checkpoints


def training_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a LoRA run's checkpoint holds of `state_dict`: the trainable (adapter) weights and their EMA, if any;
    the frozen base weights come from the run's `init_from` when it is resumed."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable or k.startswith("model_ema.")}


def check_training_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError unless `state_dict` holds every trainable weight of `model` (a LoRA run's checkpoint)."""
    expected = training_state(model, model.state_dict())
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} of this LoRA's weights (e.g. {missing[0]}): it was not "
                              "written by a run with this lora_config (rank, target modules)")
    mismatched = [k for k in expected if state_dict[k].shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(f"{source}: {mismatched[0]} is {tuple(state_dict[mismatched[0]].shape)} there and "
                              f"{tuple(expected[mismatched[0]].shape)} in this LoRA: another rank or model")


def load_training_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a LoRA run's checkpoint weights into `model` (built from the run's config, base weights loaded)."""
    check_training_state(model, state_dict, source)
    model.load_state_dict(training_state(model, state_dict), strict=False)


def is_lora_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's state dict is a LoRA run's: peft's in-model names (``<module>.lora_A.<adapter
    name>.weight``; a diffusers-format file has no adapter name there) and no base weights."""
    return any(re.search(r"\.lora_A\.[^.]+\.weight$", k) for k in state_dict) \
        and not any(".base_layer." in k for k in state_dict)


# ------------------------------------------------------------------------------------------- sampling, merging


def _set_weights(layer: Any, name: str, weights: LoraWeights, path: str, source: str) -> None:
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if a.shape != weights.down.shape or b.shape != weights.up.shape:
        raise LoraError(f"{source} is a LoRA for another model: its update of {path} is "
                        f"{tuple(weights.up.shape[:1]) + tuple(weights.down.shape[1:])}, this model's "
                        f"{tuple(b.shape[:1]) + tuple(a.shape[1:])}")
    with torch.no_grad():
        a.copy_(weights.down)
        b.copy_(weights.up)


def add_adapter(model: torch.nn.Module, adapter: Adapter, name: str, scale: float = 1.0,
                source: str = "the LoRA") -> None:
    """Add `adapter` to `model` as peft adapter `name` with weight `scale` (its update is scale × alpha / rank ×
    up @ down), next to any adapters already there."""
    peft = import_peft()
    for root in (UNET_PATH, TEXT_ENCODER_PATH):
        part = {path[len(root) + 1:]: w for path, w in adapter.items() if path.startswith(root + ".")}
        if not part:
            continue
        # Every module by its full path (re.escape: peft reads pattern keys as regular expressions), so modules of
        # one file may have ranks and alphas of their own.
        first = next(iter(part.values()))
        config = peft.LoraConfig(r=first.rank, lora_alpha=first.alpha, target_modules=list(part),
                                 rank_pattern={re.escape(p): w.rank for p, w in part.items()},
                                 alpha_pattern={re.escape(p): w.alpha for p, w in part.items()})
        module = model.get_submodule(root)
        with warnings.catch_warnings():  # peft's note that a second adapter is being added: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            _inject(config, module, name, source)
        for path, weights in part.items():
            layer = module.get_submodule(path)
            _set_weights(layer, name, weights, f"{root}.{path}", source)
            layer.set_scale(name, scale)
    model.requires_grad_(False)
    # peft activates the adapter it adds alone: every adapter acts, each with its scale.
    for _, layer in _lora_layers(model):
        layer.set_adapter(list(layer.lora_A.keys()))
        layer.requires_grad_(False)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA adapter of `model` into the weights it adapts (at its scale) and put the plain modules back,
    so that the model's modules and state-dict keys are those it had before any adapter."""
    for name, layer in list(_lora_layers(model)):
        layer.merge(adapter_names=list(layer.lora_A.keys()))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    return model


def parse_lora_spec(spec: LoraSpec) -> tuple[Path, float]:
    """(file, scale) of ``FILE``, ``FILE:SCALE`` or a (file, scale) pair; the scale defaults to 1."""
    if isinstance(spec, tuple):
        path, scale = spec
        return Path(path), float(scale)
    text = str(spec)
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass  # a colon in the file name, no scale
    return Path(text), 1.0


def read_lora(path: Union[str, Path], model: torch.nn.Module) -> Adapter:
    """The adapter a LoRA file (diffusers or kohya format) holds for `model`; `LoraError` naming the file for one
    in neither format or made for another model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        state = load_state_dict(path)
        metadata = _file_metadata(path)
    except CheckpointError as e:
        raise LoraError(str(e)) from e
    if is_lora_checkpoint(state):
        raise LoraError(f"{path} is a LoRA run's training checkpoint: export its adapter first "
                        f"(ldm-export {path} --lora -o lora.safetensors) and pass that file")
    try:
        return from_state_dict(state, ecosystem_names(model), metadata)
    except ValueError as e:
        raise LoraError(f"{path}: {e}") from e


def _file_metadata(path: Path) -> Optional[dict[str, str]]:
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def apply_loras(model: torch.nn.Module, loras: Sequence[LoraSpec], merge: bool = True) -> torch.nn.Module:
    """`model` with each LoRA file of `loras` (``FILE``, ``FILE:SCALE`` or (file, scale)) added at its scale, merged
    into the weights unless `merge` is False (then peft's layers compute the updates at every call)."""
    for i, spec in enumerate(loras):
        path, scale = parse_lora_spec(spec)
        add_adapter(model, read_lora(path, model), f"lora{i}", scale, source=str(path))
    return merge_lora(model) if merge else model


def write_lora(adapter: Adapter, model: torch.nn.Module, path: Union[str, Path], fmt: str = "diffusers",
               metadata: Optional[Mapping[str, object]] = None) -> Path:
    """Write `adapter` (of `model`) to a `.safetensors` file in key format `fmt` ("diffusers" or "kohya")."""
    if not adapter:
        raise LoraError("the model has no LoRA adapter to write")
    state = to_state_dict(adapter, ecosystem_names(model), fmt)
    ranks = sorted({w.rank for w in adapter.values()})
    info = {"format": fmt, "rank": ranks[0] if len(ranks) == 1 else ranks, "modules": len(adapter)}
    return save_safetensors(state, path, metadata={**info, **(metadata or {})})


def export_trained_lora(model: Any, path: Union[str, Path], fmt: Optional[str] = None,
                        metadata: Optional[Mapping[str, object]] = None) -> Path:
    """Write the adapter a LoRA run trains (its EMA when the run keeps one, as exports of whole models do) to
    `path` in key format `fmt` (None: the run's `lora_config.file_format`, else diffusers'), with the base model and
    settings in the file's metadata."""
    with model.ema_scope():
        adapter = trained_adapter(model)
    settings = getattr(model, "lora_settings", None)
    fmt = fmt or (settings.file_format if settings is not None else "diffusers")
    info = {"base_model": str(getattr(model, "init_from", "") or ""),
            **({"base_config": str(model.init_config)} if getattr(model, "init_config", None) else {}),
            **({"lora_config": dataclasses.asdict(settings)} if settings is not None else {})}
    return write_lora(adapter, model, path, fmt, metadata={**info, **(metadata or {})})


def merge_trained_lora(model: Any) -> Any:
    """A LoRA run's model as a plain model: its adapter (the EMA one when the run keeps one) merged into the base
    weights, no EMA left (the merged weights are the ones to sample with)."""
    if model.use_ema:
        model.model_ema.copy_to(model.model)
        model.use_ema = False
        del model.model_ema
    merge_lora(model)
    model.lora_settings = None
    return model
