"""Random inpainting masks: axis-aligned boxes and free-form brush strokes.

Masks follow the inpainting convention of the reference (``masked_image = (1 - mask) * image``):
1 marks the region the model must fill, 0 the region it keeps. Every mask is a pure function of the
random generator it is given, and its geometry is drawn in normalised [0, 1] canvas coordinates before
it is rasterised, so the same seed gives the same mask at every resolution (only sharper).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Union

import numpy as np

SeedLike = Union[int, np.random.Generator]

# Box side lengths, as fractions of the canvas side.
BOX_SIDE_RANGE = (0.3, 0.7)
# Brush strokes (in the spirit of DeepFill v2's free-form masks): a few random walks of thick segments.
STROKES_RANGE = (1, 4)  # strokes per mask, inclusive
VERTICES_RANGE = (2, 5)  # segments per stroke, inclusive
SEGMENT_LENGTH_RANGE = (0.15, 0.35)
BRUSH_WIDTH_RANGE = (0.1, 0.22)


@lru_cache(maxsize=8)
def pixel_centres(size: int) -> np.ndarray:
    """Normalised [0, 1] coordinates of the pixel centres of a ``size``-pixel axis (read-only, cached)."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    coords.flags.writeable = False
    return coords


def box_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One random axis-aligned rectangle; returns an (size, size) float32 array of 0/1."""
    width, height = rng.uniform(*BOX_SIDE_RANGE, size=2)
    left = rng.uniform(0.0, 1.0 - width)
    top = rng.uniform(0.0, 1.0 - height)
    coords = pixel_centres(size)
    inside_x = (coords >= left) & (coords < left + width)
    inside_y = (coords >= top) & (coords < top + height)
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def brush_stroke_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Free-form strokes: each is a random walk of thick line segments (capsules); (size, size) 0/1."""
    starts, ends, half_widths = [], [], []
    for _ in range(rng.integers(STROKES_RANGE[0], STROKES_RANGE[1] + 1)):
        point = rng.uniform(0.1, 0.9, size=2)
        half_width = 0.5 * rng.uniform(*BRUSH_WIDTH_RANGE)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        for _ in range(rng.integers(VERTICES_RANGE[0], VERTICES_RANGE[1] + 1)):
            # Turn by up to ~100 degrees per segment so strokes curve instead of zig-zagging.
            angle += rng.uniform(-1.75, 1.75)
            length = rng.uniform(*SEGMENT_LENGTH_RANGE)
            end = np.clip(point + length * np.array([np.cos(angle), np.sin(angle)]), 0.0, 1.0)
            starts.append(point)
            ends.append(end)
            half_widths.append(half_width)
            point = end
    distance = _segment_distances(pixel_centres(size), np.array(starts), np.array(ends))
    return (distance <= np.array(half_widths)[:, None, None]).any(axis=0).astype(np.float32)


def _segment_distances(coords: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(K, H, W) distance from every pixel centre to each of K segments (projection clamped to it)."""
    direction = (ends - starts)[:, :, None, None]  # (K, 2, 1, 1)
    rel_x = coords[None, None, :] - starts[:, 0, None, None]  # (K, 1, W)
    rel_y = coords[None, :, None] - starts[:, 1, None, None]  # (K, H, 1)
    length_sq = np.maximum(direction[:, 0] ** 2 + direction[:, 1] ** 2, 1e-12)  # zero-length -> a disc
    t = np.clip((rel_x * direction[:, 0] + rel_y * direction[:, 1]) / length_sq, 0.0, 1.0)
    return np.hypot(rel_x - t * direction[:, 0], rel_y - t * direction[:, 1])


def random_inpainting_mask(seed: SeedLike, size: int, box_prob: float = 0.5) -> np.ndarray:
    """A box (probability ``box_prob``) or brush-stroke mask as an HW1 float32 array (1 = fill).

    ``seed`` is an int or a ``numpy.random.Generator`` (used as is, so callers can derive it from their
    own per-item seed). The mask is never empty: at least one pixel is always marked.
    """
    if size < 1:
        raise ValueError(f"mask size must be a positive number of pixels, got {size}")
    if not 0.0 <= box_prob <= 1.0:
        raise ValueError(f"box_prob must be a probability in [0, 1], got {box_prob}")
    rng = np.random.default_rng(seed)
    mask = box_mask(rng, size) if rng.random() < box_prob else brush_stroke_mask(rng, size)
    if not mask.any():
        # Only possible at tiny sizes, where a thin stroke can miss every pixel centre; an empty mask
        # would make the inpainting target trivial, so mark the centre pixel.
        mask[size // 2, size // 2] = 1.0
    return mask[:, :, None]
