"""Did fine-tuning teach a text model new shapes and colours, and what did it forget?

`NewWordsProbe` is the quality probe (ldm/evaluation/quality_probe.py) of fine-tuning on the new shapes and colours
of the built-in data (``ldm.data.shape_attributes.EXTRA_SHAPES`` / ``EXTRA_COLOURS``; bench/fine_tuning.py): at
every measurement it samples

- the model's original prompts (`quality_probe.prompt_sets`: seen and held-out pairs, canonical and typed), judged
  by the shipped attribute classifier as every other probe does: what the model still knows;
- held-out prompts that combine a new shape or colour with known attributes (`novel_prompts`: the extended
  validation split's captions, none of them a caption of the training folder), judged by a classifier that knows
  the extended label space (`novel_classifier_path`): ``novel_share`` is the share of samples that draw every new
  shape and colour their prompt states, on the object the prompt puts it on.

Both judges only read samples: nothing here feeds a gradient.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from ldm.data.shapes import COLOURS, SHAPES, ShapesValidation, caption_to_attributes
from ldm.evaluation.attribute_classifier import AttributeClassifier, attribute_accuracy, load_attribute_classifier
from ldm.evaluation.prompt_following import align_unordered, caption_targets
from ldm.evaluation.quality_probe import MATCH_COLUMNS, PromptFollowingProbe

NOVEL_SETS = ("novel", "novel_typed")
NOVEL_SEED = 0  # the extended validation split's seed: the training folder is the train split, another stream


def states_new_attribute(caption: str) -> bool:
    """Whether `caption` names a new shape or colour (an index past the default ones)."""
    attributes = caption_to_attributes(caption)["attributes"]
    return bool((attributes[:, 0] >= len(SHAPES)).any() or (attributes[:, 1] >= len(COLOURS)).any())


def novel_prompts(n: int, extra_shapes: Sequence[str], extra_colours: Sequence[str],
                  exclude: Iterable[str] = (), seed: int = NOVEL_SEED) -> dict[str, list[str]]:
    """Per set of `NOVEL_SETS`: `n` prompts of the extended validation split (canonical captions, and the typed
    phrasings of the same scenes) that name a new shape or colour and are none of the captions in `exclude`
    (a training folder's)."""
    excluded = {caption.strip().lower() for caption in exclude}
    data = ShapesValidation(num_samples=20 * n + 64, seed=seed, extra_shapes=extra_shapes,
                            extra_colours=extra_colours)
    sets: dict[str, list[str]] = {name: [] for name in NOVEL_SETS}
    for index in range(len(data)):
        if all(len(captions) >= n for captions in sets.values()):
            break
        item = data[index]
        for name, key in zip(NOVEL_SETS, ("caption", "typed_caption")):
            caption = item[key]
            if len(sets[name]) < n and caption.lower() not in excluded and states_new_attribute(caption):
                sets[name].append(caption)
    return sets


def folder_captions(root: Optional[str]) -> list[str]:
    """The ``.txt`` captions under a training folder (none for no folder)."""
    return [p.read_text(encoding="utf-8").strip() for p in sorted(Path(root).rglob("*.txt"))] if root else []


@torch.no_grad()
def novel_match(classifier: AttributeClassifier, images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """`prompt_match`'s figures of `images` against their `captions` read by an extended `classifier`, plus
    ``novel_share``: the share of images whose every new shape and colour the caption states is read on its
    object (a missing object counts as not drawn)."""
    predicted = classifier.predict(images)
    read = torch.as_tensor(predicted["attributes"]).cpu()
    target = align_unordered(read, caption_targets(captions))
    stated = target["attributes"]
    new = torch.zeros_like(stated, dtype=torch.bool)
    new[..., 0] = stated[..., 0] >= len(SHAPES)
    new[..., 1] = stated[..., 1] >= len(COLOURS)
    drawn = ((read == stated) | ~new).flatten(1).all(1)
    return {**attribute_accuracy(predicted, target), "novel_share": float(drawn[new.flatten(1).any(1)].float().mean())}


class NewWordsProbe(PromptFollowingProbe):
    """`PromptFollowingProbe` on the original prompts plus the new words' held-out prompts (module docstring).

    `novel_classifier_path` is the extended judge's directory; `extra_shapes` / `extra_colours` the new attributes;
    `n_novel` prompts per novel set; `train_folder` the fine-tuning folder, whose captions are left out of them."""

    columns = (*PromptFollowingProbe.columns, "novel_share")

    def __init__(self, novel_classifier_path: str, extra_shapes: Sequence[str] = (),
                 extra_colours: Sequence[str] = (), n_novel: int = 128, train_folder: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.novel_classifier_path = novel_classifier_path
        self.extra_shapes, self.extra_colours = list(extra_shapes), list(extra_colours)
        self.n_novel, self.train_folder = n_novel, train_folder
        self.novel_classifier: Optional[AttributeClassifier] = None
        self._novel_sets: Optional[dict[str, list[str]]] = None

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        from ldm.inference import text_to_image

        rows = {split: {**values, "novel_share": math.nan} for split, values in super().measure(pl_module).items()}
        if self.novel_classifier is None:
            self.novel_classifier = load_attribute_classifier(self.novel_classifier_path, device=pl_module.device)
        if self._novel_sets is None:
            self._novel_sets = novel_prompts(self.n_novel, self.extra_shapes, self.extra_colours,
                                             exclude=folder_captions(self.train_folder))
        device = self.novel_classifier.head.weight.device
        with pl_module.ema_scope():
            for name, captions in self._novel_sets.items():
                images = torch.cat([
                    text_to_image(pl_module, captions[s:s + self.batch_size], scale=self.scale, sampler=self.sampler,
                                  steps=self.steps, seed=self.seed + s, progress=False)
                    for s in range(0, len(captions), self.batch_size)])
                match = novel_match(self.novel_classifier, images.to(device), captions)
                rows[name] = {**{f"match_{c}": match[c] for c in MATCH_COLUMNS}, "fid": math.nan,
                              "novel_share": match["novel_share"]}
        return rows
