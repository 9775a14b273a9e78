"""Layouts (boxes with class labels) as token sequences, for layout-to-image synthesis (LDM paper, sec. 4.3.1).

The reference's layout2img encodes each object as three tokens for a transformer (taming-transformers'
``ObjectsBoundingBoxConditionalBuilder``): its class, the grid cell of its top-left corner and the grid cell
of its bottom-right corner. The same here, with two differences stated: the grid is `GRID` × `GRID` cells
(16 × 16, as fine as a 32-pixel image needs; the reference quantises to a larger grid for 256 pixels), and
token ids are laid out as ``0`` padding, ``1..36`` the built-in classes, then the grid cells (row-major),
`LAYOUT_VOCAB_SIZE` = 293 in all. Objects come in the built-in slot order (left/upper object first), and
the sequence is padded to ``MAX_OBJECTS × 3`` tokens.

A layout file (scripts/layout2img.py) is JSON: a list of objects, each
``{"shape": "circle", "colour": "red", "box": [x0, y0, x1, y1]}`` with the box in [0, 1] image coordinates
(x to the right, y down).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from ldm.data.shapes import (CLASS_NAMES, COLOUR_RGB, COLOURS, EXTENT, MAX_OBJECTS, NUM_CLASSES, SHAPES, Scene,
                             ShapesDataset)

GRID = 16
PAD_TOKEN = 0
CLASS_TOKEN_OFFSET = 1
CELL_TOKEN_OFFSET = CLASS_TOKEN_OFFSET + NUM_CLASSES
LAYOUT_VOCAB_SIZE = CELL_TOKEN_OFFSET + GRID * GRID
TOKENS_PER_OBJECT = 3
LAYOUT_LENGTH = MAX_OBJECTS * TOKENS_PER_OBJECT

Box = tuple[float, float, float, float]


def scene_layout(scene: Scene) -> list[tuple[int, Box]]:
    """(class label, box) of each object of `scene` in slot order; the box is the object's extent."""
    layout = []
    for obj in scene.objects:
        half = EXTENT * obj.radius
        box = (obj.centre_x - half, obj.centre_y - half, obj.centre_x + half, obj.centre_y + half)
        layout.append((obj.shape * len(COLOURS) + obj.colour, tuple(float(np.clip(v, 0.0, 1.0)) for v in box)))
    return layout


def _cell(x: float, y: float) -> int:
    column, row = (min(int(v * GRID), GRID - 1) for v in (x, y))
    return CELL_TOKEN_OFFSET + row * GRID + column


def layout_tokens(layout: Sequence[tuple[int, Box]]) -> np.ndarray:
    """(LAYOUT_LENGTH,) int64: class, top-left cell, bottom-right cell per object, then padding."""
    if len(layout) > MAX_OBJECTS:
        raise ValueError(f"a layout holds at most {MAX_OBJECTS} objects, got {len(layout)}")
    tokens = np.full(LAYOUT_LENGTH, PAD_TOKEN, dtype=np.int64)
    for i, (label, (x0, y0, x1, y1)) in enumerate(layout):
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"class label {label} is not one of the {NUM_CLASSES} built-in classes")
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"box {[x0, y0, x1, y1]} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and "
                             "0 <= y0 < y1 <= 1")
        tokens[i * 3: i * 3 + 3] = (CLASS_TOKEN_OFFSET + label, _cell(x0, y0), _cell(x1, y1))
    return tokens


def tokens_to_layout(tokens: Sequence[int]) -> list[tuple[int, Box]]:
    """The layout a token sequence encodes, boxes at grid-cell resolution (cell corners)."""
    layout = []
    for i in range(0, len(tokens), TOKENS_PER_OBJECT):
        label, start, end = (int(t) for t in tokens[i: i + TOKENS_PER_OBJECT])
        if label == PAD_TOKEN:
            continue
        (r0, c0), (r1, c1) = divmod(start - CELL_TOKEN_OFFSET, GRID), divmod(end - CELL_TOKEN_OFFSET, GRID)
        layout.append((label - CLASS_TOKEN_OFFSET, (c0 / GRID, r0 / GRID, (c1 + 1) / GRID, (r1 + 1) / GRID)))
    return layout


def drawable_layout(layout: Sequence[tuple[int, Box]]) -> list[tuple[str, Box, tuple[float, float, float]]]:
    """Each object as (its shape's name, its box, its colour's RGB), as `ldm.visualization.render_boxes` draws it."""
    drawn = []
    for label, box in layout:
        colour, shape = CLASS_NAMES[label].split()
        drawn.append((shape, box, COLOUR_RGB[colour]))
    return drawn


def read_layout_file(path: Union[str, Path]) -> list[tuple[int, Box]]:
    """A layout JSON file (see the module docstring) as (class label, box) pairs in slot order."""
    try:
        objects = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(objects, list) or not objects:
        raise ValueError(f"{path}: expected a non-empty JSON list of objects")
    layout = []
    for obj in objects:
        if not isinstance(obj, dict) or set(obj) != {"shape", "colour", "box"}:
            raise ValueError(f"{path}: each object needs exactly the keys shape, colour and box, got {obj!r}")
        if obj["shape"] not in SHAPES or obj["colour"] not in COLOURS:
            raise ValueError(f"{path}: unknown shape or colour in {obj!r} (shapes: {', '.join(SHAPES)}; "
                             f"colours: {', '.join(COLOURS)})")
        box = obj["box"]
        if not (isinstance(box, list) and len(box) == 4):
            raise ValueError(f"{path}: box must be [x0, y0, x1, y1], got {box!r}")
        layout.append((SHAPES.index(obj["shape"]) * len(COLOURS) + COLOURS.index(obj["colour"]),
                       tuple(float(v) for v in box)))
    if len(layout) == 2:  # slot order: the left object of a side-by-side pair, the upper of a stacked one
        (_, a), (_, b) = layout
        dx, dy = (b[0] + b[2]) - (a[0] + a[2]), (b[1] + b[3]) - (a[1] + a[3])
        if (dx if abs(dx) >= abs(dy) else dy) < 0:
            layout.reverse()
    layout_tokens(layout)  # validates
    return layout


class ShapesLayout(ShapesDataset):
    """Built-in scenes with ``objects_bbox`` (the layout tokens, LAYOUT_LENGTH int64) and ``boxes``
    (MAX_OBJECTS, 4) float32 (-1 for an absent object); other keys as ShapesDataset."""

    def _make_item(self, index: int) -> dict[str, Any]:
        item = super()._make_item(index)
        layout = scene_layout(self.scene(index))
        item["objects_bbox"] = layout_tokens(layout)
        boxes = np.full((MAX_OBJECTS, 4), -1.0, dtype=np.float32)
        for slot, (_, box) in enumerate(layout):
            boxes[slot] = box
        item["boxes"] = boxes
        return item
