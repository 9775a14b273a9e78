"""A fine-tuning run's own images mixed one to one with the base model's samples (DreamBooth's prior preservation).

`PriorMixDataset` mixes the run's training dataset (`instance`, a ``target:``/``params:`` config) with a captioned
folder of the base model's own samples (`prior_root`: what ``ldm/prior_images.py`` generates, or a folder the user
gives) half and half (`ldm.data.mix.MixedDataset`): the instance items, then as many prior images drawn at random, so
every shuffled batch holds about as many of each, as DreamBooth's batches do (Ruiz et al. 2023, eq. 2). Each item is
marked ``PRIOR_KEY`` 0 or 1; the model weights the loss of the marked ones (`prior_preservation.weight`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from ldm.data.folder import ImageFolderDataset
from ldm.data.mix import MixedDataset
from ldm.prior_preservation import PRIOR_KEY

INDEX_KEY = "index"  # a latent cache's key for an item (`cache_latents`)


class PriorMixDataset(MixedDataset):
    """The instance items, then as many prior items drawn at random (module docstring). Items keep the keys both
    datasets give (image, caption, ...) and ``PRIOR_KEY``; a prior image's ``index`` follows the instance ones, so a
    latent cache tells them apart."""

    def __init__(self, instance: Mapping[str, Any], prior_root: str, size: Optional[int] = None) -> None:
        # A center crop: the samples are already at the model's size, a user's folder may not be.
        super().__init__(instance, ImageFolderDataset(prior_root, size=size, crop="center", flip_p=0.0))
        self.instance, self.prior = self.first, self.second

    def __getitem__(self, index: int) -> dict[str, Any]:
        item, drawn = self.draw(index)
        if drawn is not None and INDEX_KEY in item:
            item = {**item, INDEX_KEY: len(self.instance) + drawn}
        return {**{k: item[k] for k in self.keys}, PRIOR_KEY: int(drawn is not None)}
