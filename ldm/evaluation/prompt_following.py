"""Prompt following: does an image show what its caption asked for, as the attribute classifier reads it?

Captions are parsed back into labels with the dataset's own grammar (``caption_to_attributes``), so a
caption that leaves a word out (no size, no position) constrains only what it states, and the
classifier's reading of the image is scored against those labels (``attribute_accuracy``). A caption that
does not say which of its two objects is where ("a red circle and a blue square") is matched either way round.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.data.shapes import caption_to_attributes
from ldm.evaluation.attribute_classifier import AttributeClassifier, attribute_accuracy

IDENTITY_COLUMNS = slice(0, 3)  # shape, colour, size: what an unordered caption lets swap between the slots


def caption_targets(captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Labels stated by each caption: ``attributes`` int64 (N, MAX_OBJECTS, 4), -1 where unstated,
    ``num_objects`` (N,), in the classifier's format, and ``ordered`` (N,) bool (False: the two objects'
    identities may be matched to the slots either way)."""
    if isinstance(captions, str) or len(captions) == 0:
        raise ValueError("captions must be a non-empty sequence of caption strings (not one string)")
    parsed = [caption_to_attributes(caption) for caption in captions]
    return {
        "attributes": torch.stack([torch.as_tensor(p["attributes"]) for p in parsed]),
        "num_objects": torch.tensor([p["num_objects"] for p in parsed]),
        "ordered": torch.tensor([p["ordered"] for p in parsed]),
    }


def align_unordered(predicted: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`target` with the identities of each unordered caption's two objects swapped where that matches more of
    `predicted` (N, MAX_OBJECTS, 4) attributes: the best reading of a caption that allows either."""
    attributes = target["attributes"].clone()
    swapped = attributes.clone()
    swapped[:, :, IDENTITY_COLUMNS] = attributes[:, [1, 0], IDENTITY_COLUMNS]

    def matches(candidate: torch.Tensor) -> torch.Tensor:
        return ((candidate == predicted) & (candidate >= 0)).flatten(1).sum(1)

    use_swap = ~target["ordered"] & (matches(swapped) > matches(attributes))
    attributes[use_swap] = swapped[use_swap]
    return {**target, "attributes": attributes}


@torch.no_grad()
def prompt_match(classifier: AttributeClassifier, images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """Share of `images` (NCHW in [-1, 1]) whose attributes match their caption: per attribute
    (``shape``, ``colour``, ``size``, ``position``, ``num_objects``) and ``all`` (every stated label right).
    See ``attribute_accuracy`` for how missing objects and unstated words count."""
    if images.shape[0] != len(captions):
        raise ValueError(f"got {images.shape[0]} images for {len(captions)} captions; pass one caption per image")
    predicted = classifier.predict(images)
    target = align_unordered(torch.as_tensor(predicted["attributes"]).cpu(), caption_targets(captions))
    return attribute_accuracy(predicted, target)
