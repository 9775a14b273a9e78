"""The attributes of a built-in shapes scene: what its images show, its labels index and its captions name.

Labels are indices into these tuples (``ldm.data.shapes`` module docstring gives the label format).
"""

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTE_NAMES = ("shape", "colour", "size", "position")
MAX_OBJECTS = 2
