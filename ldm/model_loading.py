"""Loading trained models: built-in names, model directories and configs with their weights, for every script
and the Python API (`ldm.inference` re-exports `load_model`)."""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from omegaconf import OmegaConf

from ldm import assets
from ldm.checkpoint import TRAINING_ONLY_PREFIXES, CheckpointError, load_state_dict, load_weights
from ldm.config import load_configs, safe_targets_only
from ldm.lora import LoraSpec, apply_loras
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.encoders.tokenization import set_strict_vocab
from ldm.util import instantiate_from_config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Built-in models: a directory holding config.yaml and model.safetensors (written by scripts/export_weights.py).
BUILTIN_MODELS = {
    "txt2img": Path("models/ldm/txt2img-shapes"),
    "inpainting": Path("models/ldm/inpainting-shapes"),
    "superres": Path("models/ldm/superres-shapes"),
    "semantic2img": Path("models/ldm/semantic2img-shapes"),
    "layout2img": Path("models/ldm/layout2img-shapes"),
}
# How to make a missing built-in model.
RECIPES = {
    "txt2img": "configs/latent-diffusion/txt2img.yaml",
    "inpainting": "configs/latent-diffusion/inpainting_txt.yaml",
    "superres": "configs/latent-diffusion/sr_shapes.yaml",
    "semantic2img": "configs/latent-diffusion/semantic2img_shapes.yaml",
    "layout2img": "configs/latent-diffusion/layout2img_shapes.yaml",
}
DEMO_MODELS = ("txt2img", "inpainting")  # what scripts/demo.sh makes


class ModelNotFound(FileNotFoundError):
    """A model's config or weights are missing; the message says how to make them."""


# Model params about how a training run starts (its starting weights, which of their keys to skip; a fine-tuning
# run's new words, whether only those train, and its prior-preservation images): a model's own weights replace them
# when it loads, and a run that fine-tunes it does not inherit them.
INIT_PARAMS = ("ckpt_path", "ignore_keys", "init_from_text_model", "init_from", "init_config", "new_words",
               "train_only_new_words", "prior_preservation")


def is_first_stage_target(target: str) -> bool:
    """Whether a config's `model.target` is a first stage (an autoencoder of ldm.models.autoencoder), not a
    diffusion model."""
    return target.startswith("ldm.models.autoencoder.")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when available, else the CPU; anything else is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
    return device


def _named_model(model: Union[str, Path]) -> Optional[Path]:
    """The model directory called `model` in ``$LDM_MODELS_DIR``, else the built-in one of that name."""
    name = str(model)
    if not name or Path(name).exists() or "/" in name or os.sep in name:
        return None
    for directory in assets.models_dirs()[:-1]:
        if (directory / name / "config.yaml").is_file():
            return directory / name
    return assets.resolve(BUILTIN_MODELS[name]) if name in BUILTIN_MODELS else None


# A Hugging Face Hub repository id ("owner/name"), tried when no local path of that name exists.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["config.yaml", "model.safetensors", "*.txt", "*.json", "README.md"]


def _hub_model(repo_id: str) -> Path:
    """A model directory from the Hugging Face Hub (the local cache first, then a download when online)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached: download below)
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 (offline, no such repo, HTTP errors: all end in the one message)
        raise ModelNotFound(f"{repo_id}: no such local model directory or config, and not loadable from the Hugging "
                            f"Face Hub ({e.__class__.__name__}); check the path, or download the repository where "
                            "there is network") from e


def model_files(model: Union[str, Path], ckpt: Optional[Union[str, Path]] = None) -> tuple[Path, Path, Optional[str]]:
    """(config, weights, built-in name or None) for `load_model`'s arguments."""
    named = _named_model(model)
    name = str(model) if named is not None and str(model) in BUILTIN_MODELS else None
    path = named if named is not None else Path(model)
    if named is None and not path.exists() and HUB_REPO_ID.match(str(model)):
        path = _hub_model(str(model))
    if path.suffix in (".yaml", ".yml"):
        config = path
        weights = Path(ckpt) if ckpt is not None else path.with_name("model.safetensors")
    else:
        config = path / "config.yaml"
        weights = Path(ckpt) if ckpt is not None else path / "model.safetensors"
    for needed in (config, weights):
        if not needed.is_file():
            raise ModelNotFound(_missing_model_message(needed, name, config))
    return config, weights, name


# Where released weights for the reference configs come from (Hugging Face Hub repository, file), by config name.
RELEASED_WEIGHTS = {"v1-inference": ("CompVis/stable-diffusion-v-1-4-original", "sd-v1-4.ckpt")}


def released_weights_hint(config: Path, option: str = "--ckpt ") -> str:
    """For a reference config whose weights are released: how to download them and pass them (`option` followed by
    the file name), as ", e.g. `hf download ...` ... and then --ckpt FILE"; "" for any other config."""
    if config.stem not in RELEASED_WEIGHTS:
        return ""
    repo, filename = RELEASED_WEIGHTS[config.stem]
    return (f", e.g. `hf download {repo} {filename} --local-dir .` (huggingface_hub's command; accept the model's "
            f"license on its Hub page first) and then {option}{filename}")


def weights_hash(model: Union[str, Path], ckpt: Optional[Union[str, Path]] = None) -> str:
    """The first 10 hex digits of the SHA-256 of the weights `load_model(model, ckpt)` reads (AUTOMATIC1111's
    "Model hash"; the whole digest is what a model card or the Hub lists)."""
    digest = hashlib.sha256()
    with open(model_files(model, ckpt)[1], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _missing_model_message(missing: Path, name: Optional[str], config: Path) -> str:
    if name is not None:
        target = BUILTIN_MODELS[name]
        demo = ("Make it with the main job,\n  bash scripts/demo.sh            (trains txt2img and inpainting on the "
                "shipped first stage: ~30 min on 2 cores)\nor train it alone" if name in DEMO_MODELS else "Train it")
        return (f"the built-in {name!r} model is missing ({missing} does not exist). {demo} and export its weights:\n"
                f"  python main.py --base {RECIPES[name]} -t\n"
                f"  python scripts/export_weights.py logs/<that run>/checkpoints/last.ckpt --model-dir {target}")
    if missing == config:
        return f"no model config at {config}: pass a config .yaml, or a directory holding config.yaml and model.safetensors"
    if config.suffix in (".yaml", ".yml"):
        return f"{config} is a config without weights: pass its weights with --ckpt (a .ckpt or .safetensors){released_weights_hint(config)}"
    return (f"no weights at {missing}: pass --ckpt (a .safetensors export or a Lightning .ckpt), or export a run with\n"
            f"  python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --model-dir {config.parent}")


def shared_parts(net: LatentDiffusion, state: Mapping[str, torch.Tensor], first_stage_ckpt: Optional[str]) -> list[str]:
    """State-dict prefixes a weights file may leave out: the frozen first stage when the config names its own
    checkpoint (`first_stage_ckpt`, loaded from there when the model was built) and the file has none of it."""
    if not first_stage_ckpt or any(k.startswith("first_stage_model.") for k in state):
        return []
    return ["first_stage_model.", "cond_stage_model."] if net.cond_stage_model is net.first_stage_model \
        else ["first_stage_model."]


def load_model(model: Union[str, Path] = "txt2img", ckpt: Optional[Union[str, Path]] = None,
               device: Union[str, torch.device] = "auto", precision: str = "fp32",
               trust_config: bool = False, strict_vocab: bool = False,
               lora: Sequence[LoraSpec] = ()) -> LatentDiffusion:
    """A trained model, in eval mode on `device`, ready for the functions below.

    `model` is a built-in name (`BUILTIN_MODELS`), the name of a model directory in ``$LDM_MODELS_DIR``, a
    Hugging Face Hub repository id (``owner/name``: a model directory there, from the cache or downloaded), a
    directory holding config.yaml and model.safetensors,
    or a config .yaml (then `ckpt` names the weights: a weights-only export or a training .ckpt, whose EMA
    weights are used when it has them). An export may leave out the frozen first stage when its config
    names the first stage's own checkpoint (`first_stage_config.params.ckpt_path`): it is loaded from there.
    `precision` ("fp32", "bf16", "fp16") is kept as `model.inference_precision`: sampling then runs under
    autocast in that type while the weights stay float32. The config may build only classes of ldm and
    torch.nn (`ldm.config.safe_targets_only`: a shared model directory cannot run code) unless `trust_config`.
    A prompt with words the text encoder's vocabulary lacks warns once (a `PromptWarning` naming them), or with
    `strict_vocab` raises `UnknownWordsError` (`ldm.modules.encoders.tokenization.set_strict_vocab`).
    `lora` lists LoRA files to apply, each ``path``, ``"path:scale"`` or ``(path, scale)`` (diffusers or kohya key
    format, `ldm.lora`): merged into the weights at their scales (needs peft).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = resolve_device(device) if isinstance(device, str) else device
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast needs a GPU; on the CPU use precision bf16 (or fp32)")
    config_path, weights_path, _ = model_files(model, ckpt)
    config = OmegaConf.to_container(load_configs([config_path]), resolve=True)
    if "model" not in config:
        raise ValueError(f"{config_path} has no 'model:' section")
    if is_first_stage_target(str(config["model"].get("target", ""))):
        raise ValueError(f"{config_path} is a first stage ({config['model']['target']}), not a diffusion model: "
                         f"sample with a diffusion model's directory; reconstruct images with ldm-reconstruct "
                         f"(in Python: ldm.model_loading.build_model(config, weights))")
    params = config["model"].setdefault("params", {})
    if params.get("lora_config"):
        raise ValueError(f"{config_path} is a LoRA fine-tuning run's config, whose checkpoints hold the adapter alone: "
                         f"export it (ldm-export <run>/checkpoints/last.ckpt --lora -o lora.safetensors) and sample "
                         f"its base model with --lora lora.safetensors, or export it merged (--merge-lora --model-dir)")
    state = load_state_dict(weights_path)
    ema_keys = [k for k in state if k.startswith("model_ema.")]
    params["use_ema"] = bool(ema_keys)  # an export already holds the EMA weights as the model's
    for init in INIT_PARAMS:
        params.pop(init, None)  # the weights come from `weights_path`, not the training config's init
    with safe_targets_only(not trust_config):
        net = instantiate_from_config(config["model"])
    first_stage_ckpt = params.get("first_stage_config", {}).get("params", {}).get("ckpt_path")
    ignore = [*TRAINING_ONLY_PREFIXES, *shared_parts(net, state, first_stage_ckpt)]
    load_weights(net, state, strict=True, ignore_prefixes=ignore, source=str(weights_path))
    if ema_keys:
        net.model_ema.copy_to(net.model)
    if lora:
        apply_loras(net, lora)
    net.inference_precision = precision
    set_strict_vocab(net, strict_vocab)
    return net.to(device).eval()


def build_model(config_path: str | Path, ckpt_path: Optional[str | Path] = None, device: str = "auto",
               strict: bool = True, ignore_prefixes: Iterable[str] = TRAINING_ONLY_PREFIXES,
               trust_config: bool = False) -> torch.nn.Module:
    """Any model (autoencoder, diffusion model, ...) built from a config file's `model:` with weights (.ckpt or
    .safetensors) loaded exactly as stored, in eval mode; no weights with `ckpt_path` None. `load_model`
    below is the sampling-ready form for diffusion models (built-in names, model directories, EMA folded in).

    Training-only ``loss.*`` weights are ignored by default, so weights-only exports and full training
    checkpoints both load. ``model_ema.*`` is ignored too when the model keeps no EMA (``use_ema: false``
    in an evaluation config for a checkpoint trained with one), and a weights file without EMA weights (an export,
    whose weights are the EMA's) loads into a model that then keeps none (`ema_scope` uses the weights as they are).
    """
    config = load_configs([config_path])
    if "model" not in config:
        raise CheckpointError(f"{config_path} has no 'model:' section")
    with safe_targets_only(not trust_config):  # as load_model
        model = instantiate_from_config(config.model)
    if ckpt_path is not None:
        ignore = tuple(ignore_prefixes)
        state = load_state_dict(ckpt_path)
        if getattr(model, "use_ema", False) and not any(k.startswith("model_ema.") for k in state):
            # A weights-only export holds the EMA weights as the model's own: no separate average to swap in.
            model.use_ema = False
            del model.model_ema
        if not any(k.startswith("model_ema.") for k in model.state_dict()):
            ignore += ("model_ema.",)
        load_weights(model, state, strict=strict, ignore_prefixes=ignore, source=str(ckpt_path))
    return model.to(resolve_device(device) if isinstance(device, str) else device).eval()
