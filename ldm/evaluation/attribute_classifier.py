"""A small CNN that reads the shapes dataset's labels back from pixels.

It measures whether generated images show what their caption or class asked for (shape, colour, size
and position of each object, and whether there is a second object), and its penultimate features give a
Fréchet distance between sets of images of this domain (see ``ldm.evaluation.frechet``).

Labels follow ``ldm.data.shapes``: ``attributes`` int64 (N, MAX_OBJECTS, 4) = per slot ``[shape,
colour, size, position]`` in the canonical slot order (slot 0 = the only / left / upper object), -1 for
an absent slot, plus ``num_objects`` (N,).

Images are NCHW in [-1, 1]. The network sees 32x32: other sizes are resized to 32x32 first (area
averaging when shrinking, which is what rendering at 32x32 with box-filter anti-aliasing gives;
bilinear when enlarging). Non-square images are squashed to square, so pass square images.

A classifier for the extended label space (``AttributeClassifier(extra_shapes=["heart"], extra_colours=["white"])``,
the new shapes and colours of ``ldm.data.shape_attributes``) has one more output per new shape or colour; its labels
index `ALL_SHAPES` / `ALL_COLOURS` (the new ones after the default ones), so it reads default images with the
shipped one's labels. Its config records them; the shipped classifier's config, which names none, is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm import assets
from ldm.checkpoint import load_state_dict, load_weights, save_safetensors
from ldm.data.shapes import ATTRIBUTE_NAMES, COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, SIZES, novel_pairs

DEFAULT_DIR = assets.resolve("models/attribute_classifier")
WEIGHTS_FILE = "attribute_classifier.safetensors"
CONFIG_FILE = "config.json"
# Classes per attribute, in ATTRIBUTE_NAMES order (the default label space; see `head_sizes` for an extended one).
HEAD_SIZES = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES), "position": len(POSITIONS)}


def head_sizes(extra_shapes: Sequence[str] = (), extra_colours: Sequence[str] = ()) -> dict[str, int]:
    """Classes per attribute with the new shapes and colours (names from `EXTRA_SHAPES` / `EXTRA_COLOURS`) added."""
    novel_pairs(extra_shapes, extra_colours)  # ValueError naming an unknown one
    return {**HEAD_SIZES, "shape": len(SHAPES) + len(extra_shapes), "colour": len(COLOURS) + len(extra_colours)}

ArrayLike = Union[torch.Tensor, np.ndarray]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class AttributeClassifier(nn.Module):
    """Conv stages halve the resolution (32 -> 4); the 4x4 map is flattened, not pooled, because
    position and the left/right order of the two slots are spatial facts a global pool would lose."""

    def __init__(
        self,
        channels: Sequence[int] = (32, 48, 64),
        bottleneck: int = 32,
        hidden: int = 192,
        input_size: int = 32,
        extra_shapes: Sequence[str] = (),
        extra_colours: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if input_size % 2 ** len(channels) != 0:
            raise ValueError(f"input_size {input_size} must be divisible by 2**len(channels) = {2 ** len(channels)}")
        self.config = {"channels": list(channels), "bottleneck": bottleneck, "hidden": hidden, "input_size": input_size}
        # Named only when there are some, so that a default classifier's config stays what the shipped one holds.
        self.config.update({k: list(v) for k, v in (("extra_shapes", extra_shapes), ("extra_colours", extra_colours)) if v})
        self.head_sizes = head_sizes(extra_shapes, extra_colours)
        self.input_size = input_size
        stages: list[nn.Module] = []
        in_channels = 3
        for out_channels in channels:
            stages += [_conv_bn_relu(in_channels, out_channels, 1), _conv_bn_relu(out_channels, out_channels, 2)]
            in_channels = out_channels
        stages.append(_conv_bn_relu(in_channels, bottleneck, 1))
        self.trunk = nn.Sequential(*stages)
        final = input_size // 2 ** len(channels)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(bottleneck * final * final, hidden), nn.ReLU(inplace=True))
        # One linear layer emits every logit: per slot the four attributes, then one presence logit
        # for slot 1 (slot 0 is always present).
        self.per_slot = sum(self.head_sizes.values())
        self.head = nn.Linear(hidden, MAX_OBJECTS * self.per_slot + 1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check NCHW RGB input and resize it to input_size x input_size (see the module docstring)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected images of shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}; "
                "dataset items are HWC: use images.permute(0, 3, 1, 2)"
            )
        images = images.to(dtype=self.head.weight.dtype, device=self.head.weight.device)
        if images.shape[-2:] == (self.input_size, self.input_size):
            return images
        shrinking = min(images.shape[-2:]) > self.input_size
        size = (self.input_size, self.input_size)
        return F.interpolate(images, size=size, mode="area") if shrinking else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, hidden) penultimate activations, for Fréchet distances."""
        return self.embed(self.trunk(self.prepare(images)))

    def logits_from_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{attribute: (N, MAX_OBJECTS, classes)}`` plus ``presence`` (N,): logit that slot 1 exists."""
        out = self.head(features)
        slots = out[:, : MAX_OBJECTS * self.per_slot].reshape(-1, MAX_OBJECTS, self.per_slot)
        logits = dict(zip(self.head_sizes, slots.split(list(self.head_sizes.values()), dim=-1)))
        logits["presence"] = out[:, -1]
        return logits

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.logits_from_features(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Labels in the dataset's format: ``attributes`` (N, MAX_OBJECTS, 4), ``num_objects`` (N,)."""
        logits = self(images)
        attributes = torch.stack([logits[name].argmax(-1) for name in ATTRIBUTE_NAMES], dim=-1)
        second = logits["presence"] > 0
        attributes[~second, 1] = -1
        return {"attributes": attributes, "num_objects": 1 + second.long()}


def attribute_loss(logits: dict[str, torch.Tensor], attributes: torch.Tensor, num_objects: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over present slots, plus the presence BCE."""
    present = attributes[..., 0] >= 0  # (N, MAX_OBJECTS)
    loss = F.binary_cross_entropy_with_logits(logits["presence"], (num_objects > 1).to(logits["presence"].dtype))
    for column, name in enumerate(ATTRIBUTE_NAMES):
        loss = loss + F.cross_entropy(logits[name][present], attributes[..., column][present])
    return loss


def attribute_accuracy(pred: Mapping[str, ArrayLike], target: Mapping[str, ArrayLike]) -> dict[str, float]:
    """Per-attribute accuracy of predicted labels against targets (both in the dataset's format).

    Each attribute is scored over the objects the target has, and only where the target states it
    (-1 = unconstrained, as ``caption_to_attributes`` gives for words a prompt leaves out); a missed
    second object counts as wrong on all its attributes. Also ``num_objects`` and ``all`` (fraction of
    images whose every stated label is right).
    """
    pred_attr = torch.as_tensor(pred["attributes"]).cpu()
    target_attr = torch.as_tensor(target["attributes"]).cpu()
    if pred_attr.shape != target_attr.shape:
        raise ValueError(f"prediction and target attributes differ in shape: {tuple(pred_attr.shape)} vs {tuple(target_attr.shape)}")
    stated = target_attr >= 0
    correct = (pred_attr == target_attr) | ~stated
    pred_count = torch.as_tensor(pred["num_objects"]).cpu()
    target_count = torch.as_tensor(target["num_objects"]).cpu()
    count_correct = pred_count == target_count
    result = {}
    for column, name in enumerate(ATTRIBUTE_NAMES):
        scored = stated[..., column]
        result[name] = float(correct[..., column][scored].float().mean()) if scored.any() else float("nan")
    result["num_objects"] = float(count_correct.float().mean())
    result["all"] = float((correct.flatten(1).all(dim=1) & count_correct).float().mean())
    return result


def save_attribute_classifier(model: AttributeClassifier, directory: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``attribute_classifier.safetensors`` and ``config.json`` (constructor args + ``extra``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), directory / WEIGHTS_FILE, metadata={"config": model.config})
    (directory / CONFIG_FILE).write_text(json.dumps({"model": model.config, **(extra or {})}, indent=2) + "\n")
    return directory


def load_attribute_classifier(path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu") -> AttributeClassifier:
    """Load a trained classifier in eval mode: a directory holding ``attribute_classifier.safetensors``
    and ``config.json`` (default: the shipped ``models/attribute_classifier/``), or the weights file
    itself with ``config.json`` beside it."""
    path = DEFAULT_DIR if path is None else Path(path)
    directory = path if path.is_dir() else path.parent
    weights = directory / WEIGHTS_FILE if path.is_dir() else path
    config_path = directory / CONFIG_FILE
    for needed in (weights, config_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"attribute classifier file not found: {needed}. Train one with "
                "`python scripts/train_attribute_classifier.py --out DIR` or pass the directory that holds "
                f"{WEIGHTS_FILE} and {CONFIG_FILE}"
            )
    config = json.loads(config_path.read_text())["model"]
    model = AttributeClassifier(**config)
    load_weights(model, load_state_dict(weights), source=str(weights))
    return model.to(device).eval()
