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

At the start of the run (`ldm.prior_images.prepare_prior_preservation`, called by ``main.py`` once the model is built,
while it still is the base model: a LoRA's update starts at zero, new words are not in the prompts) the images are
sampled into ``<run>/prior/`` as a captioned folder (``00000.png`` + ``00000.txt``, the layout of ldm/data/folder.py),
and ``data.params.train`` becomes a `PriorMixDataset` (ldm/data/prior_mix.py) of the run's own images and those, one to
one, each item marked by `PRIOR_KEY`. The folder is written whole or not at all (a partial one is sampled again), and a
resumed run reuses it.

This module holds what the model reads (the settings, checked when it is built, and the batch key whose items it
weights); making the images needs the sampling API and the datasets, which the model must not import.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

PRIOR_KEY = "prior"  # a batch's mark of the base model's samples (1) among the run's own images (0)


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
