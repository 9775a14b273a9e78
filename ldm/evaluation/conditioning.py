"""How well images follow a spatial condition, read by the attribute classifier (the judge, never a training
signal): per object of the scene the condition came from, is its shape / colour / position read back?

Used for semantic synthesis (the label map fixes every object's region, shape and colour) and layout-to-image
(the boxes fix position, shape and colour) in bench/conditioning_tasks.py, and for super-resolution
(`image_quality`: PSNR and SSIM against the high-resolution original).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldm.data.shapes import ATTRIBUTE_NAMES, Scene, scene_attributes
from ldm.evaluation.attribute_classifier import AttributeClassifier


@torch.no_grad()
def object_agreement(classifier: AttributeClassifier, images: torch.Tensor, scenes: Sequence[Scene],
                     attributes: Sequence[str] = ("shape", "colour", "position")) -> dict[str, float]:
    """Share of the scenes' objects whose every one of `attributes` the classifier reads in `images` (NCHW in
    [-1, 1], one per scene) as in the scene (``objects``), and per attribute. An object the classifier does not
    see (a second object read as absent) counts as wrong."""
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; give one image per scene")
    unknown = sorted(set(attributes) - set(ATTRIBUTE_NAMES))
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; choose from {ATTRIBUTE_NAMES}")
    read = classifier.predict(images.to(classifier.head.weight.device))["attributes"].cpu()
    target = torch.stack([torch.as_tensor(scene_attributes(scene)) for scene in scenes])
    present = target[..., 0] >= 0
    columns = [ATTRIBUTE_NAMES.index(name) for name in attributes]
    right = read[..., columns] == target[..., columns]  # (N, objects, len(attributes))
    result = {name: float(right[..., i][present].float().mean()) for i, name in enumerate(attributes)}
    result["objects"] = float(right.all(dim=-1)[present].float().mean())
    return result


@torch.no_grad()
def image_quality(images: torch.Tensor, originals: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of `images` against `originals` (NCHW in [-1, 1]), on the [0, 1] scale."""
    x, y = (images.float().clamp(-1, 1) + 1) / 2, (originals.float() + 1) / 2
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    return {"psnr": float(psnr), "ssim": float(structural_similarity_index_measure(x, y, data_range=1.0))}
