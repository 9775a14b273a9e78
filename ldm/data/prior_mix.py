"""A fine-tuning run's own images mixed one to one with the base model's samples (DreamBooth's prior preservation).

`PriorMixDataset` wraps the run's training dataset (`instance`, a ``target:``/``params:`` config) and a captioned
folder of the base model's own samples (`prior_root`: what ``ldm/prior_images.py`` generates, or a folder the
user gives). It is twice as long as `instance`: the first half is the instance items, each item of the second half
a prior image drawn at random (torch's global generator, which Lightning seeds), so every shuffled batch holds
about as many of each, as DreamBooth's batches do (Ruiz et al. 2023, eq. 2). Each item is marked
``PRIOR_KEY`` 0 or 1; the model weights the loss of the marked ones (`prior_preservation.weight`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from ldm.config import instantiate_from_config
from ldm.data.folder import ImageFolderDataset
from ldm.prior_preservation import PRIOR_KEY

INDEX_KEY = "index"  # a latent cache's key for an item (`cache_latents`)


class PriorMixDataset(Dataset):
    """The instance items, then as many prior items drawn at random (module docstring). Items keep the keys both
    datasets give (image, caption, ...) and ``PRIOR_KEY``; a prior image's ``index`` follows the instance ones, so a
    latent cache tells them apart."""

    def __init__(self, instance: Mapping[str, Any], prior_root: str, size: Optional[int] = None) -> None:
        self.instance = instantiate_from_config(instance)
        # A center crop: the samples are already at the model's size, a user's folder may not be.
        self.prior = ImageFolderDataset(prior_root, size=size, crop="center", flip_p=0.0)
        if len(self.instance) == 0:
            raise ValueError("prior preservation: the training dataset is empty")
        first, prior_first = self.instance[0], self.prior[0]
        self.keys = [k for k in first if k in prior_first]  # the default collate needs the same keys in every item

    def __len__(self) -> int:
        return 2 * len(self.instance)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.instance)
        if index < n:
            item, prior = self.instance[index], 0
        else:
            drawn = int(torch.randint(len(self.prior), ()).item())
            item, prior = self.prior[drawn], 1
            if INDEX_KEY in item:
                item = {**item, INDEX_KEY: n + drawn}
        return {**{k: item[k] for k in self.keys}, PRIOR_KEY: prior}
