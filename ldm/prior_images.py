"""The prior images of prior preservation (ldm/prior_preservation.py): sampled by the base model into the run directory
at the start of a fine-tuning run, or a captioned folder the config names, and mixed into the training data.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.config import ConfigError, describe_key
from ldm.data.folder import ImageFolderDataset
from ldm.image_io import save_images
from ldm.inference import text_to_image
from ldm.model_loading import resolve_device
from ldm.prior_preservation import PriorPreservation

log = logging.getLogger(__name__)

OPTION = "model.params.prior_preservation"
PRIOR_DIR = "prior"
MIX_TARGET = "ldm.data.prior_mix.PriorMixDataset"


def check_prior_folder(folder: str, where: str) -> Path:
    """`folder` if it is a captioned image folder (ldm/data/folder.py), else a `ConfigError` naming the problem."""
    try:
        dataset = ImageFolderDataset(folder, size=None)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
    if dataset.caption_source == "none":
        raise ConfigError(f"{where}: the images in {folder} have no captions: put each image's prompt beside it "
                          "(name.txt) or in metadata.jsonl, as for training images")
    return Path(folder)


def generate_prior_images(model: Any, settings: PriorPreservation, directory: Path) -> Path:
    """`settings.n_images` samples of `settings.prompts` (in turn) by `model`, as a captioned folder at `directory`;
    a complete folder already there is reused. The model is put back on its device and in its mode after."""
    if directory.is_dir():
        return directory
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a run stopped while sampling: sample again
    prompts = [settings.prompts[i % len(settings.prompts)] for i in range(settings.n_images)]
    device, was_training = next(model.parameters()).device, model.training
    model.to(resolve_device("auto")).eval()
    log.info(f"prior preservation: sampling {len(prompts)} images of {len(settings.prompts)} prompt(s) with the base "
             f"model into {directory}")
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), settings.batch_size):
                chunk = prompts[start:start + settings.batch_size]
                seeds = [settings.seed + start + i for i in range(len(chunk))]  # one per image: batch-independent
                images = text_to_image(model, chunk, scale=settings.scale, sampler=settings.sampler,
                                       steps=settings.steps, seed=seeds, progress=False)
                paths = save_images(images, partial, start=start, text=[{"prompt": p} for p in chunk])
                for path, prompt in zip(paths, chunk):
                    path.with_suffix(".txt").write_text(prompt, encoding="utf-8")
    finally:
        model.to(device).train(was_training)
    partial.rename(directory)  # complete: a resumed run reuses it
    return directory


def prepare_prior_preservation(config: DictConfig, model: Any, logdir: Path) -> Optional[Path]:
    """Sample (or check) the prior images `model.params.prior_preservation` asks for and mix them into
    ``data.params.train`` (module docstring); returns their folder, or None when the config asks for none."""
    options = OmegaConf.select(config, OPTION)
    if options is None:
        return None
    settings = PriorPreservation.from_config(OmegaConf.to_container(options))  # the model has checked it already
    train = OmegaConf.select(config, "data.params.train")
    if train is None:
        raise ConfigError(f"{describe_key(config.model.params, 'prior_preservation')} mixes the base model's "
                          "samples into the training data, but the config has no data.params.train")
    if settings.folder:
        folder = check_prior_folder(settings.folder, describe_key(options, "folder"))
    else:
        folder = generate_prior_images(model, settings, logdir / PRIOR_DIR)
    if train.get("target") != MIX_TARGET:  # a resumed run's saved config mixes them already
        size = (train.get("params") or {}).get("size")
        config.data.params.train = OmegaConf.create({"target": MIX_TARGET, "params": {
            "instance": OmegaConf.to_container(train), "prior_root": str(folder), "size": size}})
    return folder
