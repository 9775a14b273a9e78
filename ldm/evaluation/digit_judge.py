"""A digit classifier that judges class-conditional samples of a digits folder (scripts/prepare_digits.py).

    judge = train_digit_judge("data/digits/train")
    per_class_accuracy(judge, images, labels)     # images (N, 3, H, W) in [-1, 1], labels: class indices

The judge is an RBF support-vector classifier (scikit-learn's `SVC`, its defaults) on the images read back
at the data's own resolution: grey, area-averaged to 8x8 and scaled to 0..16 like `load_digits`. At that
resolution the upscaling's detail, which says nothing about which digit it is, is averaged away, and the
classifier fits in a tenth of a second; on the real validation images it reads about 98.6 % of the digits.
It is trained only on the real training images and is only ever used to measure: never a training signal.

Labels are class indices as ImageFolderDataset gives them (sorted sub-folder names: "0".."9" -> 0..9), the
same indices a class-conditional model trained on that folder is sampled with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.folder import ImageFolderDataset

FEATURE_SIZE = 8  # load_digits' resolution


def digit_features(images: torch.Tensor) -> np.ndarray:
    """(N, 64) features of (N, 3, H, W) images in [-1, 1]: grey, area-averaged to 8x8, on load_digits' 0..16 scale."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W) (or N1HW) in [-1, 1], got shape {tuple(images.shape)}")
    grey = (images.detach().float().cpu().mean(1, keepdim=True) + 1.0) / 2.0
    return (F.interpolate(grey, size=(FEATURE_SIZE, FEATURE_SIZE), mode="area").flatten(1) * 16.0).numpy()


def load_folder(root: Union[str, Path]) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(images (N, 3, H, W) in [-1, 1], class indices (N,), class names) of a class-folder split, read as
    training reads it (ImageFolderDataset at the stored size, no augmentation)."""
    dataset = ImageFolderDataset(str(root), size=None, class_from_subfolders=True, flip_p=0.0, caption_source="none")
    images = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(len(dataset))]).permute(0, 3, 1, 2)
    return images, np.asarray(dataset.labels), list(dataset.classes)


@dataclass
class DigitJudge:
    """A fitted classifier (anything with `predict(features)`) and the class names of its label indices."""

    classifier: Any
    classes: list[str]

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Class indices read from (N, 3, H, W) images in [-1, 1]."""
        return np.asarray(self.classifier.predict(digit_features(images)))


def train_digit_judge(train_root: Union[str, Path]) -> DigitJudge:
    """Fit the judge on the real images of a class folder (e.g. data/digits/train)."""
    return fit_digit_judge(*load_folder(train_root), source=train_root)


def fit_digit_judge(images: torch.Tensor, labels: np.ndarray, classes: list[str],
                    source: Union[str, Path] = "the training images") -> DigitJudge:
    """Fit the judge on a class folder already read with `load_folder` (`source` names it in errors)."""
    try:
        from sklearn.svm import SVC
    except ImportError:
        raise ImportError("the digit judge needs scikit-learn: pip install scikit-learn "
                          "(or pip install -e .[digits])") from None
    if len(classes) < 2:
        raise ValueError(f"{source} has {len(classes)} class sub-folder(s); the judge needs at least two")
    return DigitJudge(SVC().fit(digit_features(images), labels), classes)


def per_class_accuracy(judge: DigitJudge, images: torch.Tensor,
                       labels: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> dict[str, Any]:
    """How often the judge reads each image as its label.

    Returns {"per_class": {class name: accuracy of that class's images}, "mean": the unweighted mean over the
    classes present (each class counts once, however many images it has), "overall": share of all images
    read correctly, "n": number of images}.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(int)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"got {labels.size} labels for {images.shape[0]} images; give one class index per image")
    if labels.size == 0:
        raise ValueError("no images to judge")
    if labels.min() < 0 or labels.max() >= len(judge.classes):
        raise ValueError(f"labels must be class indices 0..{len(judge.classes) - 1} (the judge's classes "
                         f"{judge.classes}), got values from {labels.min()} to {labels.max()}")
    correct = judge.predict(images) == labels
    per_class = {judge.classes[c]: float(correct[labels == c].mean()) for c in np.unique(labels)}
    return {"per_class": per_class, "mean": float(np.mean(list(per_class.values()))),
            "overall": float(correct.mean()), "n": int(labels.size)}
