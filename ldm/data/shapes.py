"""Built-in captioned dataset: anti-aliased coloured shapes on plain or textured backgrounds.

Everything is made by code, nothing is downloaded. Item ``index`` of split ``split`` with seed ``seed``
(all but a ``typed``-style caption) is a pure function of ``(seed, split, index)`` (its own ``numpy.random.Generator``, no global RNG), so
an item is identical whichever worker, process or order produces it. A scene is drawn in normalised
[0, 1] canvas coordinates and then rasterised, so the same item at ``size=64`` is the ``size=32`` scene
drawn sharper.

Scenes hold one or two objects. Each object has a shape, a colour, a size and a position. Captions
(``ldm.data.captions``) come in two styles: ``canonical`` names all four in one template, e.g.::

    a small red circle on the left
    a large blue square above a small yellow triangle
    a large green star to the right of a small red circle

and ``typed`` phrases the scene as people type prompts, drawn anew each time an item is read (the text
models train on it)::

    Two purple triangles side by side.
    the big green star beneath a square
    a red circle and a tiny blue cross

Every item also carries ``typed_caption``, one typed phrasing fixed per item (the probes measure on it).

Labels (``attributes``, int64, shape ``(MAX_OBJECTS, 4)`` = per slot ``[shape, colour, size,
position]``, indices into ``SHAPES``, ``COLOURS``, ``SIZES``, ``POSITIONS``; the absent second slot of a
one-object scene is all -1):

- Slot order is canonical *in the image*, not in the caption, so a classifier can read it from pixels:
  slot 0 is the only object, or the left object of a side-by-side pair, or the upper object of a
  stacked pair. A caption may name either object of a pair first ("A to the right of B" puts B in
  slot 0).
- ``position`` of a single object is its region: left / right / top / bottom / center. In a pair it is
  the object's side within the pair, which is also where it is in the image: slot 0 is "left" (pair
  side by side) or "top" (stacked), slot 1 is "right" or "bottom". The pairs are laid out so the
  separation along the relation axis always exceeds the offset across it, so the relation is never
  ambiguous.
- ``class_label`` = ``shape * len(COLOURS) + colour`` of slot 0 (``CLASS_NAMES[k]`` reads it back);
  ``NUM_CLASSES`` = 36.

Compositional split: the colour-shape pairs in ``HELD_OUT_PAIRS`` never occur in ``train`` or
``validation``; every ``test`` image contains at least one of them, so a text-conditional model can be
asked to compose words it never saw together. Splits draw from disjoint random streams.

New shapes and colours (``extra_shapes=["heart"]``, ``extra_colours=["white"]``; `EXTRA_SHAPES`, `EXTRA_COLOURS`):
attributes the shipped models never saw, for teaching a trained model new words. They index after the default ones
(heart is shape 6, white colour 6) and appear only in a dataset that asks for them; there every image holds at least
one object of a new shape or colour (`novel_pairs`), the other object of a pair comes from the split's usual pairs
or the new ones, and ``class_label`` is -1 for an image whose slot 0 is new (the 36 classes are the default pairs).
A dataset that names none draws exactly the default items.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset, get_worker_info

from ldm.data.captions import (  # noqa: F401 (caption_to_attributes and the vocabulary are read from here too)
    canonical_caption,
    default_class_label,
    caption_to_attributes,
    caption_vocabulary,
    labelled_objects,
    typed_caption,
    write_caption_vocabulary,
)
from ldm.data.masks import pixel_centres, random_inpainting_mask
from ldm.data.shape_attributes import (ALL_COLOURS, ALL_SHAPES, ATTRIBUTE_NAMES, COLOURS, EXTRA_COLOURS,
                                       EXTRA_SHAPES, MAX_OBJECTS, POSITIONS, SHAPES, SIZES)

# (shape, colour) pairs that never appear in train/validation; each shape and colour still appears
# in training with other partners, so the words themselves are known.
HELD_OUT_PAIRS = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "blue"),
    ("star", "green"),
)

NUM_CLASSES = len(SHAPES) * len(COLOURS)
CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)

SPLITS = ("train", "validation", "test")
CAPTION_STYLES = ("canonical", "typed")
DEFAULT_NUM_SAMPLES = {"train": 100_000, "validation": 2_000, "test": 2_000}

# Saturated object colours (RGB in [0, 1]); backgrounds are desaturated (see _sample_background), so
# hue and saturation separate objects from background on every texture.
COLOUR_RGB = {
    "red": (0.86, 0.12, 0.12),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (0.95, 0.86, 0.1),
    "green": (0.1, 0.68, 0.2),
    "blue": (0.12, 0.3, 0.92),
    "purple": (0.6, 0.16, 0.76),
    # EXTRA_COLOURS: brighter than any background (value <= 0.75, plus at most 0.1 of texture), as the others are
    # more saturated than any.
    "white": (0.97, 0.97, 0.97),
}
assert tuple(COLOUR_RGB) == ALL_COLOURS
COLOUR_JITTER = 0.04  # per channel, so models cannot key on one exact RGB value

# Object radius R (normalised) per size, uniform in the range; the two ranges are far apart so size
# is readable for every shape. Every shape fits in a box of half-side EXTENT * R around its centre.
RADIUS_RANGE = {"small": (0.115, 0.13), "large": (0.18, 0.2)}
EXTENT = 1.1
MARGIN = 0.02  # keep objects this far from the canvas edge
PAIR_GAP = 0.03  # minimum gap between the boxes of the two objects of a pair
PAIR_ACROSS_JITTER = 0.1  # each object of a pair is within this of the canvas middle across the axis


@dataclass(frozen=True)
class PlacedObject:
    """One object of a scene. Coordinates are normalised, x to the right, y downwards."""

    shape: int
    colour: int
    size: int
    position: int
    centre_x: float
    centre_y: float
    radius: float
    rgb: tuple[float, float, float]


@dataclass(frozen=True)
class Background:
    """Background parameters, drawn before rasterisation so they do not depend on the image size."""

    kind: str  # "plain", "noise", "stripes" or "gradient"
    base_rgb: np.ndarray
    second_rgb: np.ndarray  # gradient end colour
    amplitude: float  # noise / stripe contrast
    angle: float  # stripe / gradient direction
    period: float  # stripe period
    phase: float  # stripe phase
    noise_grid: np.ndarray  # (g, g) low-resolution value noise in [-1, 1]


@dataclass(frozen=True)
class Scene:
    objects: tuple[PlacedObject, ...]  # canonical slot order (see module docstring)
    background: Background
    name_slot0_first: bool  # caption order for pairs


# ----------------------------------------------------------------------------------------------
# Signed distance functions (Inigo Quilez's exact 2-D SDFs), in units of the object radius R,
# with y pointing up. Negative inside. They give analytic anti-aliasing: pixel coverage is
# clip(0.5 - distance_in_pixels, 0, 1), i.e. a one-pixel-wide box filter across the edge.
# ----------------------------------------------------------------------------------------------


def _sdf_circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.hypot(x, y) - 1.0


def _sdf_box(x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    dx, dy = np.abs(x) - half, np.abs(y) - half
    return np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0)) + np.minimum(np.maximum(dx, dy), 0.0)


def _sdf_square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Half-side 0.82 R: about the area of the unit circle, so sizes look alike across shapes.
    return _sdf_box(x, y, 0.82)


def _sdf_triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Upward equilateral triangle of side 2, its bounding box centred on the origin."""
    k = np.sqrt(3.0)
    # The SDF is centred on the centroid; shift by half the centroid-to-box-centre offset so the
    # bounding box (height sqrt(3)) is centred, as for the other shapes.
    y = y + 1.0 / (2.0 * k)
    px = np.abs(x) - 1.0
    py = y + 1.0 / k
    fold = px + k * py > 0.0
    px, py = np.where(fold, (px - k * py) / 2.0, px), np.where(fold, (-k * px - py) / 2.0, py)
    px = px - np.clip(px, -2.0, 0.0)
    return -np.hypot(px, py) * np.sign(py)


def _sdf_star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Five-pointed star, outer radius 1.1, inner radius 0.53 (ratio 0.48)."""
    outer, inner_ratio = 1.1, 0.48
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px, py = np.abs(x), y
    d = np.maximum(k1x * px + k1y * py, 0.0)
    px, py = px - 2.0 * d * k1x, py - 2.0 * d * k1y
    d = np.maximum(k2x * px + k2y * py, 0.0)
    px, py = px - 2.0 * d * k2x, py - 2.0 * d * k2y
    px = np.abs(px)
    py = py - outer
    bax, bay = inner_ratio * -k1y, inner_ratio * k1x - 1.0
    h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0.0, outer)
    return np.hypot(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)


def _sdf_diamond(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rhombus, half-width 0.72, half-height 1.0 (taller than wide, unlike a rotated square)."""
    bx, by = 0.72, 1.0
    px, py = np.abs(x), np.abs(y)
    h = np.clip(((bx - 2.0 * px) * bx - (by - 2.0 * py) * by) / (bx * bx + by * by), -1.0, 1.0)
    d = np.hypot(px - 0.5 * bx * (1.0 - h), py - 0.5 * by * (1.0 + h))
    return d * np.sign(px * by + py * bx - bx * by)


def _sdf_cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Plus sign, arm half-length 0.95, arm half-thickness 0.32."""
    bx, by = 0.95, 0.32
    ax, ay = np.abs(x), np.abs(y)
    px, py = np.maximum(ax, ay), np.minimum(ax, ay)
    qx, qy = px - bx, py - by
    k = np.maximum(qx, qy)
    wx = np.where(k > 0.0, qx, by - px)
    wy = np.where(k > 0.0, qy, -k)
    return np.sign(k) * np.hypot(np.maximum(wx, 0.0), np.maximum(wy, 0.0))


def _sdf_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Heart (Quilez's), scaled 1.75 and centred: half-width 1.06, half-height 0.97, about the square's area."""
    scale = 1.75
    # Quilez's heart has its tip at the origin and its top at y = 1.104: shift it so its box is centred.
    px, py = np.abs(x) / scale, y / scale + 0.552
    lobe = np.hypot(px - 0.25, py - 0.75) - np.sqrt(2.0) / 4.0
    t = 0.5 * np.maximum(px + py, 0.0)
    body = np.sqrt(np.minimum(px ** 2 + (py - 1.0) ** 2, (px - t) ** 2 + (py - t) ** 2)) * np.sign(px - py)
    return np.where(px + py > 1.0, lobe, body) * scale


SHAPE_SDFS = {
    "circle": _sdf_circle,
    "square": _sdf_square,
    "triangle": _sdf_triangle,
    "star": _sdf_star,
    "diamond": _sdf_diamond,
    "cross": _sdf_cross,
}
assert tuple(SHAPE_SDFS) == SHAPES
EXTRA_SHAPE_SDFS = {"heart": _sdf_heart}
assert tuple(EXTRA_SHAPE_SDFS) == EXTRA_SHAPES
_ALL_SHAPE_SDFS = {**SHAPE_SDFS, **EXTRA_SHAPE_SDFS}


# ----------------------------------------------------------------------------------------------
# Scene sampling
# ----------------------------------------------------------------------------------------------


# (shape index, colour index) pairs.
ALL_PAIRS = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
UNSEEN_PAIRS = sorted((SHAPES.index(s), COLOURS.index(c)) for s, c in HELD_OUT_PAIRS)
SEEN_PAIRS = [pair for pair in ALL_PAIRS if pair not in UNSEEN_PAIRS]


def novel_pairs(extra_shapes: Sequence[str] = (), extra_colours: Sequence[str] = ()) -> list[tuple[int, int]]:
    """The (shape, colour) index pairs with a new shape or colour among `extra_shapes` and `extra_colours` (any
    other partner: default or new), sorted; ValueError for a name not in `EXTRA_SHAPES` / `EXTRA_COLOURS`."""
    for names, known, what in ((extra_shapes, EXTRA_SHAPES, "extra_shapes"), (extra_colours, EXTRA_COLOURS, "extra_colours")):
        unknown = [n for n in names if n not in known]
        if isinstance(names, str) or unknown:
            raise ValueError(f"{what} must be a list of names from {list(known)}, got {names!r}")
    shapes = [*range(len(SHAPES)), *(ALL_SHAPES.index(n) for n in extra_shapes)]
    colours = [*range(len(COLOURS)), *(ALL_COLOURS.index(n) for n in extra_colours)]
    return sorted({(s, c) for s in shapes for c in colours if s >= len(SHAPES) or c >= len(COLOURS)})


def _sample_identities(rng: np.random.Generator, split: str, num_objects: int,
                       new_pairs: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """(shape, colour) of each object: seen pairs only, or (test) at least one held-out pair; with `new_pairs` (the
    extra attributes'), one object of those and any other of the split's pairs or those."""
    if new_pairs:
        # A separate branch, so that the default items' draws stay exactly what they were.
        pool = [*(SEEN_PAIRS if split != "test" else ALL_PAIRS), *new_pairs]
        forced = rng.integers(num_objects)
        return [new_pairs[rng.integers(len(new_pairs))] if slot == forced else pool[rng.integers(len(pool))]
                for slot in range(num_objects)]
    if split != "test":
        return [SEEN_PAIRS[rng.integers(len(SEEN_PAIRS))] for _ in range(num_objects)]
    forced = rng.integers(num_objects)
    return [
        UNSEEN_PAIRS[rng.integers(len(UNSEEN_PAIRS))] if slot == forced else ALL_PAIRS[rng.integers(len(ALL_PAIRS))]
        for slot in range(num_objects)
    ]


def _object_rgb(rng: np.random.Generator, colour: int) -> tuple[float, float, float]:
    rgb = np.asarray(COLOUR_RGB[ALL_COLOURS[colour]]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
    return tuple(float(v) for v in np.clip(rgb, 0.0, 1.0))


def _single_centre(rng: np.random.Generator, position: str, extent: float) -> tuple[float, float]:
    """Centre of a lone object in its named region; regions are separated by a few pixels at 32x32."""
    side = rng.uniform(MARGIN + extent, 0.32)  # distance from the named edge
    across = rng.uniform(0.42, 0.58)
    if position == "left":
        return side, across
    if position == "right":
        return 1.0 - side, across
    if position == "top":
        return across, side
    if position == "bottom":
        return across, 1.0 - side
    return rng.uniform(0.44, 0.56), rng.uniform(0.44, 0.56)


def _pair_centres(rng: np.random.Generator, extents: tuple[float, float], horizontal: bool) -> list[tuple[float, float]]:
    """Centres of slot 0 (left / upper) and slot 1 with their boxes PAIR_GAP apart along the axis."""
    first_low = MARGIN + extents[0]
    second_high = 1.0 - MARGIN - extents[1]
    min_separation = extents[0] + extents[1] + PAIR_GAP
    first = first_low + rng.uniform() * (second_high - min_separation - first_low)
    second = first + min_separation + rng.uniform() * (second_high - first - min_separation)
    across = 0.5 + rng.uniform(-PAIR_ACROSS_JITTER, PAIR_ACROSS_JITTER, size=2)
    if horizontal:
        return [(first, across[0]), (second, across[1])]
    return [(across[0], first), (across[1], second)]


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    channel = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return value - value * saturation * np.clip(np.minimum(channel, 4.0 - channel), 0.0, 1.0)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    # Low saturation keeps backgrounds apart from the saturated object colours.
    return _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.15, 0.75))


def _sample_background(rng: np.random.Generator, textured_prob: float) -> Background:
    kind = "plain"
    if rng.uniform() < textured_prob:
        kind = ("noise", "stripes", "gradient")[rng.integers(3)]
    grid_size = int(rng.integers(3, 7))
    return Background(
        kind=kind,
        base_rgb=_muted_colour(rng),
        second_rgb=_muted_colour(rng),
        amplitude=float(rng.uniform(0.04, 0.1)),
        angle=float(rng.uniform(0.0, np.pi)),
        period=float(rng.uniform(0.12, 0.3)),
        phase=float(rng.uniform(0.0, 2.0 * np.pi)),
        noise_grid=rng.uniform(-1.0, 1.0, size=(grid_size, grid_size)),
    )


def sample_scene(rng: np.random.Generator, split: str, textured_prob: float, two_object_prob: float,
                 new_pairs: Sequence[tuple[int, int]] = ()) -> Scene:
    """Draw a scene; every draw happens here, so rendering at any size shows the same scene. `new_pairs`
    (`novel_pairs`): every scene holds one of them."""
    num_objects = 2 if rng.uniform() < two_object_prob else 1
    identities = _sample_identities(rng, split, num_objects, new_pairs)
    sizes = [int(rng.integers(len(SIZES))) for _ in range(num_objects)]
    radii = [float(rng.uniform(*RADIUS_RANGE[SIZES[s]])) for s in sizes]
    extents = [EXTENT * r for r in radii]
    if num_objects == 1:
        position_names = [POSITIONS[rng.integers(len(POSITIONS))]]
        centres = [_single_centre(rng, position_names[0], extents[0])]
    else:
        horizontal = bool(rng.integers(2))
        position_names = ["left", "right"] if horizontal else ["top", "bottom"]
        centres = _pair_centres(rng, (extents[0], extents[1]), horizontal)
    objects = tuple(
        PlacedObject(
            shape=shape,
            colour=colour,
            size=size,
            position=POSITIONS.index(position),
            centre_x=float(cx),
            centre_y=float(cy),
            radius=radius,
            rgb=_object_rgb(rng, colour),
        )
        for (shape, colour), size, position, (cx, cy), radius in zip(identities, sizes, position_names, centres, radii)
    )
    background = _sample_background(rng, textured_prob)
    return Scene(objects=objects, background=background, name_slot0_first=bool(rng.integers(2)))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _bilinear_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) weights that bilinearly sample a grid whose nodes span the canvas edge to edge."""
    position = pixel_centres(size) * (grid - 1)
    low = np.minimum(np.floor(position).astype(int), grid - 2)
    frac = position - low
    weights = np.zeros((size, grid))
    weights[np.arange(size), low] = 1.0 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


def render_background(background: Background, size: int) -> np.ndarray:
    """(size, size, 3) float64 RGB in [0, 1]."""
    coords = pixel_centres(size)
    base = np.broadcast_to(background.base_rgb, (size, size, 3))
    if background.kind == "plain":
        return base.copy()
    if background.kind == "noise":
        # Low-frequency value noise: a coarse random grid, bilinearly upsampled (luminance only).
        weights = _bilinear_matrix(size, background.noise_grid.shape[0])
        field = weights @ background.noise_grid @ weights.T
        return np.clip(base + background.amplitude * field[:, :, None], 0.0, 1.0)
    along = np.cos(background.angle) * coords[None, :] + np.sin(background.angle) * coords[:, None]
    if background.kind == "stripes":
        wave = np.sin(2.0 * np.pi * along / background.period + background.phase)
        return np.clip(base + background.amplitude * wave[:, :, None], 0.0, 1.0)
    if background.kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-8)
        return base * (1.0 - t[:, :, None]) + background.second_rgb * t[:, :, None]
    raise ValueError(f"unknown background kind {background.kind!r}")


def _paint_object(canvas: np.ndarray, obj: PlacedObject) -> None:
    """Alpha-composite one object onto ``canvas`` in place, evaluating its SDF only in its box."""
    size = canvas.shape[0]
    coords = pixel_centres(size)
    half = EXTENT * obj.radius + 1.0 / size  # one spare pixel for the anti-aliased edge
    x0, x1 = np.searchsorted(coords, [obj.centre_x - half, obj.centre_x + half])
    y0, y1 = np.searchsorted(coords, [obj.centre_y - half, obj.centre_y + half])
    local_x = (coords[x0:x1][None, :] - obj.centre_x) / obj.radius
    local_y = (obj.centre_y - coords[y0:y1][:, None]) / obj.radius  # y up for the SDFs
    distance_px = _ALL_SHAPE_SDFS[ALL_SHAPES[obj.shape]](local_x, local_y) * obj.radius * size
    coverage = np.clip(0.5 - distance_px, 0.0, 1.0)[:, :, None]
    patch = canvas[y0:y1, x0:x1]
    patch += coverage * (np.asarray(obj.rgb) - patch)


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """(size, size, 3) float32 RGB in [-1, 1]."""
    canvas = render_background(scene.background, size)
    for obj in scene.objects:
        _paint_object(canvas, obj)
    return (canvas * 2.0 - 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Captions and labels
# ----------------------------------------------------------------------------------------------


def scene_caption(scene: Scene) -> str:
    """The scene's canonical caption (`ldm.data.captions.canonical_caption`)."""
    return canonical_caption(scene.objects, scene.name_slot0_first)


def scene_attributes(scene: Scene) -> np.ndarray:
    attributes = np.full((MAX_OBJECTS, len(ATTRIBUTE_NAMES)), -1, dtype=np.int64)
    for slot, obj in enumerate(scene.objects):
        attributes[slot] = (obj.shape, obj.colour, obj.size, obj.position)
    return attributes


def class_label_of(attributes: np.ndarray) -> int:
    """``shape * len(COLOURS) + colour`` of slot 0, or -1 if either is unknown or new (`default_class_label`)."""
    return default_class_label(attributes)


def human_label_of(attributes: np.ndarray) -> str:
    """"<colour> <shape>" of slot 0: the class name, also for a new shape or colour (which has no class)."""
    return f"{ALL_COLOURS[int(attributes[0, 1])]} {ALL_SHAPES[int(attributes[0, 0])]}"


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class ShapesDataset(Dataset):
    """Captioned shapes, generated on the fly (see the module docstring for the label format).

    Item keys: ``image`` (size, size, 3) float32 in [-1, 1]; ``caption`` str (`caption_style` ``canonical``:
    the template; ``typed``: a fresh typed phrasing at every read, see the module docstring);
    ``typed_caption`` str (one typed phrasing, fixed per item); ``class_label`` int;
    ``attributes`` int64 (MAX_OBJECTS, 4); ``num_objects`` int; ``index`` int (the item's index: with the
    dataset's config a stable key, e.g. for `cache_latents`); with ``with_mask`` also ``mask``
    (size, size, 1) float32, 1 = region to fill, and ``masked_image`` (the image, 0 inside the mask).

    `keep_items` keeps every item after it is first made, so a finite pool reused every epoch (what
    `cache_latents` trains on) costs nothing to draw again: making a 32×32 item takes about 0.3 ms, 10 ms a
    batch of 32, a tenth of the txt2img U-Net step (bench/results/training_step.md). The items are the
    same either way; the memory is about 12 KiB per 32×32 item (240 MiB for a pool of 20,000).

    `extra_shapes` / `extra_colours` (names from `EXTRA_SHAPES` / `EXTRA_COLOURS`): every image then holds a new
    shape or colour (module docstring); without them the items are the default ones, byte for byte.
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        num_samples: Optional[int] = None,
        seed: int = 0,
        with_mask: bool = False,
        textured_prob: float = 0.5,
        two_object_prob: float = 0.5,
        mask_box_prob: float = 0.5,
        keep_items: bool = False,
        caption_style: str = "canonical",
        extra_shapes: Sequence[str] = (),
        extra_colours: Sequence[str] = (),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels for shapes to be recognisable, got {size}")
        for name, prob in (("textured_prob", textured_prob), ("two_object_prob", two_object_prob), ("mask_box_prob", mask_box_prob)):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {prob}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be positive (or null for the split default), got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if caption_style not in CAPTION_STYLES:
            raise ValueError(f"unknown caption_style {caption_style!r}: use one of {CAPTION_STYLES}")
        self.split = split
        self.size = size
        self.num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples
        self.seed = seed
        self.with_mask = with_mask
        self.textured_prob = textured_prob
        self.two_object_prob = two_object_prob
        self.mask_box_prob = mask_box_prob
        self._split_code = SPLITS.index(split)
        self.caption_style = caption_style
        # The new attributes' pairs (module docstring); none: the default items exactly.
        self.new_pairs = novel_pairs(extra_shapes or (), extra_colours or ())
        self._kept: Optional[dict[int, dict[str, Any]]] = {} if keep_items else None
        self._caption_rng: Optional[tuple[int, np.random.Generator]] = None  # (worker seed, its stream)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> Scene:
        """The scene behind item ``index`` (pure function of seed, split and index)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a {self.split} split of {self.num_samples} items")
        rng = np.random.default_rng([self.seed, self._split_code, index])
        return sample_scene(rng, self.split, self.textured_prob, self.two_object_prob, self.new_pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._kept is not None:
            if index not in self._kept:
                self._kept[index] = self._make_item(index)
            item = dict(self._kept[index])  # a shallow copy: a caller's edits do not reach the kept item
        else:
            item = self._make_item(index)
        if self.caption_style == "typed":
            item["caption"] = typed_caption(labelled_objects(item["attributes"]), self._fresh_caption_rng())
        return item

    def _fresh_caption_rng(self) -> np.random.Generator:
        """The stream of fresh typed captions: its own per DataLoader worker (whose seed differs per worker and
        per epoch), so workers do not repeat each other's phrasings and an epoch does not repeat the last."""
        info = get_worker_info()
        worker_seed = 0 if info is None else int(info.seed)
        if self._caption_rng is None or self._caption_rng[0] != worker_seed:
            self._caption_rng = (worker_seed, np.random.default_rng([self.seed, self._split_code, 2, worker_seed]))
        return self._caption_rng[1]

    def _make_item(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        attributes = scene_attributes(scene)
        item = {
            "image": render_scene(scene, self.size),
            "caption": scene_caption(scene),
            # Its own stream (fourth entropy word 3), so the scene and mask streams are unchanged.
            "typed_caption": typed_caption(scene.objects, np.random.default_rng([self.seed, self._split_code, index, 3]),
                                           scene.name_slot0_first),
            "class_label": class_label_of(attributes),
            "human_label": human_label_of(attributes),  # the reference's key for class names
            "attributes": attributes,
            "num_objects": len(scene.objects),
            "index": index,
        }
        if self.with_mask:
            # A separate stream (fourth entropy word) so enabling masks leaves the scene unchanged.
            mask_rng = np.random.default_rng([self.seed, self._split_code, index, 1])
            mask = random_inpainting_mask(mask_rng, self.size, self.mask_box_prob)
            item["mask"] = mask
            item["masked_image"] = item["image"] * (1.0 - mask)
        return item


class ShapesTrain(ShapesDataset):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="train", **kwargs)


class ShapesValidation(ShapesDataset):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="validation", **kwargs)


class ShapesTest(ShapesDataset):
    """Compositional test split: every image holds at least one pair from HELD_OUT_PAIRS."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(split="test", **kwargs)
