"""The attributes of a built-in shapes scene: what its images show, its labels index and its captions name.

Labels are indices into these tuples (``ldm.data.shapes`` module docstring gives the label format).

`EXTRA_SHAPES` and `EXTRA_COLOURS` are attributes the shipped models never saw, for teaching a trained model new
words (issue 26). They appear only where a dataset asks for them (``ShapesDataset(extra_shapes=[...],
extra_colours=[...])``) and index after the default ones (`ALL_SHAPES`, `ALL_COLOURS`), so every default label, caption
and vocabulary stays what it was.
"""

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTE_NAMES = ("shape", "colour", "size", "position")
MAX_OBJECTS = 2
EXTRA_SHAPES = ("heart",)
EXTRA_COLOURS = ("white",)
ALL_SHAPES = SHAPES + EXTRA_SHAPES
ALL_COLOURS = COLOURS + EXTRA_COLOURS
