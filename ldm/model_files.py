"""Where a model's files are: built-in names, model directories (here, in ``$LDM_MODELS_DIR`` or on the Hugging Face
Hub), configs with their weights, a training run's saved configs, and the model a fine-tuning run starts from; with
messages that say how to make a missing one. Paths only: building the model is `ldm.model_loading`'s, and this module
sits below the models so that a model being fine-tuned can find its base (ldm/finetune.py)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from ldm import assets
from ldm.config import ConfigError

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
    # A repository path (a config's `init_from: models/first_stage_models/kl-f4-shapes`) works from anywhere, as
    # configs' file paths do (`ldm.assets.resolve`; a user's own path of that name wins).
    path = named if named is not None else assets.resolve(model)
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


def run_config_files(logdir: Path) -> list[Path]:
    """The run's latest saved configs, project then lightning (trainer, callbacks): what `-r` restores, as the
    reference's main.py merges every configs/*.yaml of the run."""
    configs = logdir / "configs"
    return [path for kind in ("project", "lightning") for path in sorted(configs.glob(f"*-{kind}.yaml"))[-1:]]


# The model a fine-tuning run starts from (ldm/finetune.py; ldm/new_words.py reads its vocabulary).
INIT_FROM = "model.params.init_from"
INIT_CONFIG = "model.params.init_config"
WEIGHTS_SUFFIXES = (".ckpt", ".safetensors")  # a weights file, in a run or alone


def _run_configs(ckpt: Path) -> list[Path]:
    """The saved project config of the run `ckpt` belongs to (``<run>/checkpoints/x.ckpt``), or [] for a file
    outside a run."""
    run = ckpt.resolve().parent.parent
    return run_config_files(run)[:1] if ckpt.resolve().parent.name == "checkpoints" else []


def base_model_files(init_from: str, init_config: Optional[str] = None) -> tuple[list[Path], Path]:
    """(config files, weights) of the model `init_from` names: a run's saved project config and its checkpoint for
    a run directory or a `.ckpt` in one; `init_config` and the file for a weights file outside a run (ConfigError
    without `init_config`); else a model directory's config.yaml and model.safetensors (`model_files`)."""
    path = Path(init_from)
    if path.suffix in WEIGHTS_SUFFIXES or (path.is_dir() and (path / "checkpoints").is_dir()):
        ckpt = path if path.suffix in WEIGHTS_SUFFIXES else path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            hint = released_weights_hint(Path(init_config), f"{INIT_FROM}=") if init_config and path.suffix else ""
            raise FileNotFoundError(f"init_from {init_from}: no checkpoint at {ckpt}{hint}")
        project = _run_configs(ckpt)
        if project:
            return project, ckpt
        if init_config:
            return [Path(init_config)], ckpt
        if path.suffix == ".ckpt" and ckpt.resolve().parent.name == "checkpoints":
            raise FileNotFoundError(f"init_from {init_from}: no run config beside {ckpt} (expected "
                                    f"{ckpt.resolve().parent.parent / 'configs'}/*-project.yaml)")
        raise ConfigError(f"init_from {init_from} is a weights file with no config of its own: name its model's "
                          f"config with {INIT_CONFIG}=CONFIG.yaml (configs/stable-diffusion/v1-inference.yaml for "
                          "Stable Diffusion v1)")
    config, weights, _ = model_files(init_from)
    return [config], weights
