"""Fine-tuning a trained model: the run starts from the model `model.params.init_from` names.

`init_from` is a built-in model name (``txt2img``), a model directory (or a name in ``$LDM_MODELS_DIR``, or a Hub
repository id: whatever `load_model` takes), a run directory or a `.ckpt` in one, or a weights file with no config of
its own (a released checkpoint such as Stable Diffusion's ``sd-v1-4.ckpt``, ``.ckpt`` or ``.safetensors``), whose
config `model.params.init_config` then names (``configs/stable-diffusion/v1-inference.yaml``), as ``load_model(config,
ckpt)`` takes them. Two things follow from it:

- the architecture: before the model is built, the base model's `model:` config goes under the run's own
  (`apply_init_from`), so a fine-tuning config says only what it changes (learning rate, EMA, `lora_config`, ...)
  and its data; the base's data and lightning sections are not used;
- the weights: the model built from that config loads the base's weights (`load_base_weights`), the averaged (EMA)
  ones where a training checkpoint keeps both, and its EMA restarts from them. The base's `scale_factor` is kept.

Every start of the run (also `-r`) reads the base again: a LoRA run's checkpoints hold the adapter alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import TRAINING_ONLY_PREFIXES, load_state_dict, load_weights, shared_parts
from ldm.config import ConfigError, describe_key, load_configs, merge_onto
from ldm.model_files import INIT_CONFIG, INIT_FROM, base_model_files
from ldm.modules.ema import LitEma
from ldm.new_words import grow_base_state

# Model params about how a training run starts (its starting weights, which of their keys to skip; a fine-tuning
# run's new words, whether only those train, its prior-preservation images, and the VAE its first stage is swapped
# for): a model's own weights replace them when it loads, and a run that fine-tunes it does not inherit them.
INIT_PARAMS = ("ckpt_path", "ignore_keys", "init_from_text_model", "init_from", "init_config", "new_words",
               "train_only_new_words", "prior_preservation", "vae")


def apply_init_from(config: DictConfig) -> None:
    """Put the base model's `model:` config under `config.model` when `model.params.init_from` is set (in place).
    The base's own starting point (`ckpt_path`, ...) is dropped; a LoRA run cannot be a base (its checkpoints hold
    no base weights)."""
    init_from = OmegaConf.select(config, INIT_FROM)
    if not init_from:
        return
    if OmegaConf.select(config, "model.params.ckpt_path"):
        raise ConfigError(f"{describe_key(config.model.params, 'ckpt_path')} and {INIT_FROM} both name starting "
                          "weights: keep one")
    init_config = OmegaConf.select(config, INIT_CONFIG)
    files, _ = base_model_files(str(init_from), str(init_config) if init_config else None)
    base = load_configs(files).get("model")
    if base is None:
        raise ConfigError(f"init_from {init_from}: {files[0]} has no 'model:' section")
    params = base.setdefault("params", {})
    if params.get("lora_config"):
        raise ConfigError(f"init_from {init_from} is a LoRA run (its checkpoints hold the adapter alone): export it "
                          "merged (ldm-export <ckpt> --merge-lora --model-dir DIR) and start from DIR")
    for init in INIT_PARAMS:
        params.pop(init, None)
    config.model = merge_onto(base, config.model)


def _ema_as_model(model: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` with its EMA weights (a training checkpoint's ``model_ema.*``, named as `LitEma` names them: the
    parameter's name without dots) in place of the trained ones: the weights the base model samples with."""
    state = dict(state)
    ema = {f"model.{name}": f"model_ema.{name.replace('.', '')}" for name, _ in model.model.named_parameters()}
    if all(shadow in state for shadow in ema.values()):
        state.update({name: state[shadow] for name, shadow in ema.items()})
    return {k: v for k, v in state.items() if not k.startswith("model_ema.")}


def load_base_weights(model: Any, init_from: str, first_stage_config: Optional[Mapping[str, Any]] = None,
                      new_words: Optional[Mapping[str, Optional[str]]] = None,
                      init_config: Optional[str] = None) -> None:
    """Load the weights of the model `init_from` names into `model` (built from `apply_init_from`'s config) and
    restart its EMA from them. A first stage the weights leave out comes from its own checkpoint (as `load_model`).
    With `new_words` ({word: like word or None}) the base's embedding table is first grown onto `model`'s
    vocabulary (ldm/new_words.py). `init_config` is the config of a weights file `init_from` names alone."""
    _, weights = base_model_files(init_from, init_config)
    state = _ema_as_model(model, load_state_dict(weights))
    if new_words:
        state = grow_base_state(state, model, init_from, new_words, init_config)
    first_stage_ckpt = ((first_stage_config or {}).get("params") or {}).get("ckpt_path")
    ignore = [*TRAINING_ONLY_PREFIXES, "model_ema.", *shared_parts(model, state, first_stage_ckpt)]
    load_weights(model, state, strict=True, ignore_prefixes=ignore, source=str(weights))
    if model.use_ema:
        model.model_ema = LitEma(model.model, decay=float(model.model_ema.decay))
