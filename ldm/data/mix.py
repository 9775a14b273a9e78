"""Two datasets mixed half and half: a run's own items, and as many drawn from another dataset so that training on
the first does not forget the second.

`MixedDataset` is twice as long as its `first` dataset: the first half is `first`'s items, each item of the second
half an item of `second` drawn at random (torch's global generator, which Lightning seeds; ``draw: in_order`` takes
`second`'s first items instead, for a validation set that is the same at every check), so every shuffled batch holds
about as many of each whatever the two datasets' sizes. Items keep the keys both datasets give (or `keys`), as the
default collate needs the same keys in every item. Prior preservation mixes a fine-tuning run's images with the
base model's own samples this way (`ldm.data.prior_mix`); `FolderMixDataset` mixes a user's image folder with another
dataset: configs/autoencoder/decoder_finetune.yaml mixes a user's images with the built-in ones, so the fine-tuned
decoder keeps drawing what it drew.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch.utils.data import Dataset

from ldm.config import instantiate_from_config
from ldm.data.folder import DEFAULT_EXTENSIONS, ImageFolderDataset

DRAWS = ("random", "in_order")


def _dataset(spec: Union[Mapping[str, Any], Dataset]) -> Dataset:
    """A dataset, or one built from a ``target:``/``params:`` config."""
    return instantiate_from_config(spec) if isinstance(spec, Mapping) else spec


class MixedDataset(Dataset):
    """`first`'s items, then as many drawn at random from `second` (module docstring); each a dataset or a
    ``target:``/``params:`` config."""

    def __init__(self, first: Union[Mapping[str, Any], Dataset], second: Union[Mapping[str, Any], Dataset],
                 keys: Optional[Sequence[str]] = None, draw: str = "random") -> None:
        if draw not in DRAWS:
            raise ValueError(f"unknown draw {draw!r}: use one of {DRAWS}")
        self.draw_order = draw
        self.first, self.second = _dataset(first), _dataset(second)
        for which, dataset in (("first", self.first), ("second", self.second)):
            if len(dataset) == 0:
                raise ValueError(f"{type(self).__name__}: the {which} dataset ({type(dataset).__name__}) is empty")
        shared = [k for k in self.first[0] if k in self.second[0]]
        lacking = [k for k in keys or () if k not in shared]
        if lacking:
            raise ValueError(f"{type(self).__name__}: keys {lacking} are not in the items of both datasets (both "
                             f"have {shared})")
        self.keys = list(keys) if keys else shared

    def __len__(self) -> int:
        return 2 * len(self.first)

    def draw(self, index: int) -> tuple[dict[str, Any], Optional[int]]:
        """Item `index` with every key its dataset gives, and where it came from: None for `first`'s own items,
        the index in `second` of a drawn one."""
        n = len(self.first)
        if not 0 <= index < 2 * n:
            raise IndexError(f"index {index} out of range for a {type(self).__name__} of {2 * n} items")
        if index < n:
            return self.first[index], None
        if self.draw_order == "in_order":
            drawn = (index - n) % len(self.second)
        else:
            drawn = int(torch.randint(len(self.second), ()).item())
        return self.second[drawn], drawn

    def __getitem__(self, index: int) -> dict[str, Any]:
        item, _ = self.draw(index)
        return {k: item[k] for k in self.keys}


class FolderMixDataset(MixedDataset):
    """The images of a folder (`root`, searched as `ldm.data.folder.ImageFolderDataset` searches it, with its `size`,
    `crop`, `interpolation`, `flip_p` and `extensions`; captions are not read) mixed half and half with `mix_with` (a
    ``target:``/``params:`` config), as `MixedDataset`: what an autoencoder fine-tuned on a user's images trains on."""

    def __init__(self, root: str, mix_with: Mapping[str, Any], size: Optional[int] = 256, crop: str = "center",
                 interpolation: str = "bicubic", flip_p: float = 0.5, extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                 keys: Optional[Sequence[str]] = None, draw: str = "random") -> None:
        folder = ImageFolderDataset(root, size=size, caption_source="none", crop=crop, interpolation=interpolation,
                                    flip_p=flip_p, extensions=extensions)
        super().__init__(folder, mix_with, keys, draw)
