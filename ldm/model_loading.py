"""Loading trained models: a model built from the config and weights `ldm.model_files` finds for a built-in name, a
model directory or a config, for every script and the Python API (`ldm.inference` re-exports `load_model`)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import TRAINING_ONLY_PREFIXES, CheckpointError, load_state_dict, load_weights, shared_parts
from ldm.config import load_configs, safe_targets_only
from ldm.finetune import INIT_PARAMS
from ldm.lora import LoraSpec, apply_loras
from ldm.model_files import model_files
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.encoders.tokenization import set_strict_vocab
from ldm.util import instantiate_from_config
from ldm.vae import swap_vae, vae_weights_file

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def hash_cache_file() -> Path:
    """Where weights hashes are kept between runs: ``$LDM_CACHE_DIR/hashes.json``, else ``ldm/hashes.json`` in
    ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    root = os.environ.get("LDM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"
    return Path(root) / "hashes.json"


def file_sha256(path: Union[str, Path]) -> str:
    """The SHA-256 hex digest of a file, read once per version of the file: digests are kept in `hash_cache_file()`
    under the file's resolved path with its size and modification time (as AUTOMATIC1111 keeps model hashes in its
    cache.json), so a model's start-up reads its weights only to load them. A cache that cannot be read or written
    is ignored (the digest is then computed each time)."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: start a new one
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(str(path))
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    # Entries of files that are gone are dropped, so the cache does not grow with every deleted run or export.
    cache = {k: v for k, v in cache.items() if Path(k).is_file()}
    cache[str(path)] = {**stamp, "sha256": digest.hexdigest()}
    temporary = None
    try:  # through a temporary file, so that a concurrent reader sees the old cache or the new one
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache_file.parent, prefix=".hashes-", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=0)
        os.replace(temporary, cache_file)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
    return digest.hexdigest()


def weights_hash(model: Union[str, Path], ckpt: Optional[Union[str, Path]] = None) -> str:
    """The first 10 hex digits of the SHA-256 of the weights `load_model(model, ckpt)` reads (AUTOMATIC1111's
    "Model hash"; the whole digest is what a model card or the Hub lists), from the hash cache after the first time
    (`file_sha256`)."""
    return file_sha256(model_files(model, ckpt)[1])[:10]


def vae_hash(vae: Union[str, Path]) -> str:
    """The first 10 hex digits of the SHA-256 of the weights file the VAE path names (AUTOMATIC1111's "VAE hash")."""
    return file_sha256(vae_weights_file(vae))[:10]


def load_model(model: Union[str, Path] = "txt2img", ckpt: Optional[Union[str, Path]] = None,
               device: Union[str, torch.device] = "auto", precision: str = "fp32",
               trust_config: bool = False, strict_vocab: bool = False,
               lora: Sequence[LoraSpec] = (), vae: Optional[Union[str, Path]] = None) -> LatentDiffusion:
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
    `vae` names a first stage of the model's architecture whose weights replace its own (`ldm.vae`: a first stage's
    .safetensors or .ckpt, its model directory or its training run), as AUTOMATIC1111's VAE setting; a VAE of
    another architecture is a `ldm.vae.VaeMismatch` (a ValueError) naming the difference.
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
    if vae is not None:
        swap_vae(net, vae)
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
