"""Per-pixel semantic label maps for semantic image synthesis (LDM paper, sec. 4.3.2, "semantic synthesis").

Label 0 is the background; an object of class k (``shape * len(COLOURS) + colour``, the built-in class
labels) is label k + 1, so there are `NUM_SEMANTIC_CLASSES` = 37 labels. A pixel belongs to an object when
the object covers at least half of it (the scene's exact signed distance, at the image's resolution); a
later object covers an earlier one, as when the image is painted.

Datasets give ``segmentation`` as a one-hot (H, W, num_classes) float32 map (the reference's key and
layout for its semantic-synthesis data), which `SpatialRescaler` brings to the latent size, and
``label_map`` (H, W) int64, for display and for measuring agreement.

- `ShapesSemantic`: the built-in scenes with their exact maps (split "train", "validation" or "test").
- `SemanticFolder`: your own images with label PNGs beside them (``images/x.png`` + ``labels/x.png``, the
  label PNG's pixel values are class indices, as in ADE20K or COCO-Stuff's PNGs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.masks import pixel_centres
from ldm.data.shapes import COLOUR_RGB, COLOURS, EXTENT, NUM_CLASSES, SHAPE_SDFS, SHAPES, Scene, ShapesDataset

NUM_SEMANTIC_CLASSES = NUM_CLASSES + 1
BACKGROUND = 0


def semantic_label_map(scene: Scene, size: int) -> np.ndarray:
    """(size, size) int64 labels of `scene`: 0 background, 1 + class label inside each object."""
    labels = np.zeros((size, size), dtype=np.int64)
    coords = pixel_centres(size)
    for obj in scene.objects:
        local_x = (coords[None, :] - obj.centre_x) / obj.radius
        local_y = (obj.centre_y - coords[:, None]) / obj.radius
        inside = SHAPE_SDFS[SHAPES[obj.shape]](local_x, local_y) * obj.radius * size <= 0.0
        # Only pixels within the object's box can be inside it; the SDF is exact there.
        inside &= (np.abs(local_x) <= EXTENT) & (np.abs(local_y) <= EXTENT)
        labels[inside] = 1 + obj.shape * len(COLOURS) + obj.colour
    return labels


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) int labels -> (H, W, num_classes) float32 one-hot; ValueError for labels out of range."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"label map values must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return np.eye(num_classes, dtype=np.float32)[labels]


def label_palette(num_classes: int = NUM_SEMANTIC_CLASSES) -> np.ndarray:
    """(num_classes, 3) RGB in [0, 1] to draw label maps: grey background, each built-in class in its colour
    with a brightness per shape; other label sets get evenly spread hues."""
    if num_classes == NUM_SEMANTIC_CLASSES:
        palette = [np.full(3, 0.5)]
        for shape in range(len(SHAPES)):
            for colour in COLOURS:
                palette.append(np.asarray(COLOUR_RGB[colour]) * (1.0 - 0.1 * shape))
        return np.stack(palette)
    hues = np.arange(num_classes) / max(num_classes, 1)
    return np.stack([0.5 + 0.5 * np.cos(2 * np.pi * (hues + offset)) for offset in (0.0, 1 / 3, 2 / 3)], axis=1)


LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel PNG modes that hold class indices


def read_label_png(path: Union[str, Path], size: Optional[int] = None) -> np.ndarray:
    """A label map PNG as (H, W) int64 class indices, resized with nearest neighbour to `size` when given;
    ValueError for a file that is not a single-channel image of indices."""
    try:
        labels = Image.open(path)
        labels.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    if labels.mode not in LABEL_MODES:
        raise ValueError(f"{path}: a label map must be a single-channel PNG of class indices, got mode {labels.mode}")
    if size is not None:
        labels = labels.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(labels, dtype=np.int64)


class ShapesSemantic(ShapesDataset):
    """Built-in scenes with ``segmentation`` (one-hot, 37 labels) and ``label_map``; other keys as ShapesDataset."""

    num_semantic_classes = NUM_SEMANTIC_CLASSES

    def _make_item(self, index: int) -> dict[str, Any]:
        item = super()._make_item(index)
        labels = semantic_label_map(self.scene(index), self.size)
        item["label_map"] = labels
        item["segmentation"] = one_hot(labels, NUM_SEMANTIC_CLASSES)
        return item


class SemanticFolder(Dataset):
    """Your own images with label maps: ``root/images/<name>.<ext>`` and ``root/labels/<name>.png`` (pixel
    value = class index, 0..num_classes-1). Both are resized to `size` (labels with nearest neighbour)."""

    def __init__(self, root: Union[str, Path], num_classes: int, size: Optional[int] = 32,
                 images_dir: str = "images", labels_dir: str = "labels") -> None:
        self.root = Path(root).expanduser()
        image_root, label_root = self.root / images_dir, self.root / labels_dir
        for folder in (image_root, label_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"SemanticFolder: {folder} does not exist (expected {images_dir}/ and "
                                        f"{labels_dir}/ under {self.root})")
        images = sorted(p for p in image_root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        missing = [p.name for p in images if not (label_root / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"SemanticFolder: no label PNG in {label_root} for {', '.join(missing[:5])}"
                                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if not images:
            raise FileNotFoundError(f"SemanticFolder: no images in {image_root}")
        self.pairs = [(p, label_root / f"{p.stem}.png") for p in images]
        self.num_classes = num_classes
        self.size = size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = Image.open(image_path).convert("RGB")
        if self.size is not None:
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        label_map = read_label_png(label_path, self.size)
        try:
            segmentation = one_hot(label_map, self.num_classes)
        except ValueError as e:
            raise ValueError(f"{label_path}: {e} (set num_classes to cover every label)") from e
        return {"image": np.asarray(image, dtype=np.float32) / 127.5 - 1, "label_map": label_map,
                "segmentation": segmentation, "index": index}
