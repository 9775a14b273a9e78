"""Where the toolkit's own files are: the built-in models, configs and vocabularies.

Configs name files by paths relative to the repository root, as the reference's do
(``ckpt_path: models/first_stage_models/kl-f4-shapes/model.safetensors``, ``--base
configs/latent-diffusion/txt2img.yaml``). `resolve` makes those paths work from any working directory, in a
checkout and in an installed wheel alike. A path is looked up, in order:

1. as given (relative to the working directory): a user's own file always wins;
2. under the checkout this package was imported from (``python scripts/txt2img.py`` run from elsewhere, or
   an editable install);
3. inside the installed package: a wheel carries ``models/`` and ``configs/`` as ``ldm/assets/models`` and
   ``ldm/assets/configs`` (pyproject.toml's package data), and ``ldm/...`` files as themselves.

`models_dirs` lists where model directories are looked up by name: ``$LDM_MODELS_DIR`` (a user's own
collection, ``os.pathsep``-separated) before the built-in ``models/ldm``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

PACKAGE = Path(__file__).resolve().parent  # ldm/assets
CHECKOUT = PACKAGE.parents[1]  # the repository root when imported from a checkout
# Top-level directories of the repository that a wheel carries inside ldm/assets/.
PACKAGED_TREES = ("models", "configs")
MODELS_DIR_VARIABLE = "LDM_MODELS_DIR"


def candidates(path: Union[str, os.PathLike]) -> list[Path]:
    """The places `resolve` tries for `path`, in order."""
    path = Path(path)
    if path.is_absolute():
        return [path]
    places = [path, CHECKOUT / path]
    if path.parts and path.parts[0] in PACKAGED_TREES:
        places.append(PACKAGE / path)
    elif path.parts and path.parts[0] == "ldm":
        places.append(PACKAGE.parents[1] / path)  # site-packages/ldm/... in a wheel
    return places


def resolve(path: Union[str, os.PathLike]) -> Path:
    """The first existing place of `path` (see the module docstring); the path as given when none exists, so
    that an error message names what the user wrote."""
    for place in candidates(path):
        if place.exists():
            return place
    return Path(path)


def models_dirs() -> list[Path]:
    """Directories holding model directories that `load_model` finds by name: ``$LDM_MODELS_DIR`` entries,
    then the built-in ``models/ldm``."""
    extra = [Path(p).expanduser() for p in os.environ.get(MODELS_DIR_VARIABLE, "").split(os.pathsep) if p]
    return extra + [resolve("models/ldm")]
