"""Prompt following: does an image show what its caption asked for, as the attribute classifier reads it?

Captions are parsed back into labels with the dataset's own grammar (``caption_to_attributes``), so a
caption that leaves a word out (no size, no position) constrains only what it states, and the
classifier's reading of the image is scored against those labels (``attribute_accuracy``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.data.shapes import caption_to_attributes
from ldm.evaluation.attribute_classifier import AttributeClassifier, attribute_accuracy


def caption_targets(captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Labels stated by each caption: ``attributes`` int64 (N, MAX_OBJECTS, 4), -1 where unstated,
    and ``num_objects`` (N,), in the classifier's format."""
    if isinstance(captions, str) or len(captions) == 0:
        raise ValueError("captions must be a non-empty sequence of caption strings (not one string)")
    parsed = [caption_to_attributes(caption) for caption in captions]
    return {
        "attributes": torch.stack([torch.as_tensor(p["attributes"]) for p in parsed]),
        "num_objects": torch.tensor([p["num_objects"] for p in parsed]),
    }


@torch.no_grad()
def prompt_match(classifier: AttributeClassifier, images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """Share of `images` (NCHW in [-1, 1]) whose attributes match their caption: per attribute
    (``shape``, ``colour``, ``size``, ``position``, ``num_objects``) and ``all`` (every stated label right).
    See ``attribute_accuracy`` for how missing objects and unstated words count."""
    if images.shape[0] != len(captions):
        raise ValueError(f"got {images.shape[0]} images for {len(captions)} captions; pass one caption per image")
    return attribute_accuracy(classifier.predict(images), caption_targets(captions))
