"""Prior preservation (DreamBooth, Ruiz et al. 2023): a fine-tuning run also trains on the base model's own samples
of prompts it already knew, so that it keeps drawing them while it learns the run's images.

    model:
      params:
        init_from: txt2img
        prior_preservation:
          prompts: [a red circle, two small blue squares]   # what the base model draws (its "class" prompts)
          n_images: 64          # sampled once, spread evenly over the prompts
          weight: 1.0           # the prior samples' loss weight (DreamBooth's lambda)
          folder: null          # or a captioned folder of such images: then nothing is sampled

At the start of the run (`prepare_prior_preservation`, called by ``main.py`` once the model is built, while it still
is the base model: a LoRA's update starts at zero, new words are not in the prompts) the images are sampled into
``<run>/prior/`` as a captioned folder (``00000.png`` + ``00000.txt``, the layout of ldm/data/folder.py), and
``data.params.train`` becomes a `PriorMixDataset` (ldm/data/prior_mix.py) of the run's own images and those, one to
one. The folder is written whole or not at all (a partial one is sampled again), and a resumed run reuses it.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ldm.config import ConfigError, describe_key

log = logging.getLogger(__name__)

OPTION = "model.params.prior_preservation"
PRIOR_DIR = "prior"
MIX_TARGET = "ldm.data.prior_mix.PriorMixDataset"


@dataclasses.dataclass(frozen=True)
class PriorPreservation:
    """`model.params.prior_preservation`: the base model's prompts and how many images of them to sample (with
    which sampler, steps, guidance scale and first seed), or a `folder` of them; the loss `weight` of those images."""
    prompts: tuple[str, ...] = ()
    n_images: int = 64
    weight: float = 1.0
    folder: Optional[str] = None
    sampler: str = "ddim"
    steps: int = 50
    scale: float = 3.0
    seed: int = 0
    batch_size: int = 16

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PriorPreservation:
        """ValueError naming an unknown key or a bad value."""
        if not isinstance(config, Mapping):
            raise ValueError(f"prior_preservation must be a mapping (prompts, n_images, weight, ...), got {config!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"prior_preservation: unknown key(s) {unknown}; the keys are {sorted(fields)}")
        values = dict(config)
        prompts = values.get("prompts", ())
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prior_preservation.prompts must be a list of prompts, got {prompts!r}")
        values["prompts"] = tuple(prompts)
        settings = cls(**values)
        if not settings.prompts and not settings.folder:
            raise ValueError("prior_preservation needs prompts the base model draws (prompts: [...]), or a folder "
                             "of captioned images of them (folder: DIR)")
        for name in ("n_images", "steps", "batch_size"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"prior_preservation.{name} must be an integer >= 1, got {value!r}")
        if isinstance(settings.weight, bool) or not isinstance(settings.weight, (int, float)) or settings.weight < 0:
            raise ValueError(f"prior_preservation.weight must be a number >= 0, got {settings.weight!r}")
        return settings


def check_prior_folder(folder: str, where: str) -> Path:
    """`folder` if it is a captioned image folder (ldm/data/folder.py), else a `ConfigError` naming the problem."""
    from ldm.data.folder import ImageFolderDataset

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
    import torch

    from ldm.image_io import save_images
    from ldm.inference import text_to_image
    from ldm.model_loading import resolve_device

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
