"""The package's metadata, dependencies and commands are in pyproject.toml; this file says which files the wheel
holds, and keeps `pip install -e .` and `python setup.py develop` working as in the reference.

The built-in models (about 19 MB), the configs and the caption vocabulary travel inside the wheel: the
repository's models/ and configs/ become ldm/assets/models and ldm/assets/configs, where `ldm.assets.resolve`
finds them, so load_model("txt2img") and `ldm-train --base configs/...` work from any directory.
"""
from setuptools import find_packages, setup

ASSET_TREES = {"ldm.assets.models": "models", "ldm.assets.configs": "configs"}

setup(
    packages=find_packages(include=["ldm", "ldm.*"]) + list(ASSET_TREES),
    package_dir=ASSET_TREES,
    package_data={
        "ldm.assets.models": ["**/*.yaml", "**/*.safetensors", "**/*.json", "**/*.md", "**/*.txt"],
        "ldm.assets.configs": ["**/*.yaml"],
        "ldm.data": ["*.txt"],
    },
)
