"""Captions of the built-in shapes: one grammar that phrases a scene and reads a phrase back into labels.

A scene can be phrased two ways:

- `canonical_caption`: the template of the validation and test captions, every attribute stated
  ("a small red circle above a large blue square"). The probes measure on it, so figures stay comparable.
- `typed_caption`: the scene phrased as people type prompts, drawn at random each time: any attribute may
  be left out (a prompt that leaves a word out constrains only what it states; the model draws the rest from
  the data), synonyms ("big", "tiny", "in the middle", "over", "beneath", "left of"), articles or none,
  counts and plurals ("two red circles side by side"), either object named first with the matching
  relation or none ("a red circle and a blue square"), a "picture of" prefix, any case, punctuation.
  Training on these is what makes a text model follow prompts as they are written (issue 25).

`caption_to_attributes` reads any prompt of the grammar back into the labels it states (-1 where it says
nothing), which is how the prompt-following judge scores samples. The grammar, after `normalise_prompt`
(lower case, punctuation dropped, unicode quotes and dashes folded)::

    prompt    := [prefix] ( object [placement] | object relation object | "two" [size] [colour] plural [arrangement] )
    object    := [a | an | the | one] [size] [colour] noun
    noun      := circle | square | ... | shape | object        (a shape left out reads "shape" or "object")

Every word is listed once, in the tables below; `caption_vocabulary` is their union. The words of the extra shapes
and colours (`ldm.data.shape_attributes.EXTRA_SHAPES`, `EXTRA_COLOURS`) are phrased and read back like the others,
but belong to the vocabulary only when asked (``caption_vocabulary(extended=True)``): the default captions, and the
vocabulary the shipped models read, are those of the default attributes alone.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np

from ldm.data.shape_attributes import (ALL_COLOURS, ALL_SHAPES, ATTRIBUTE_NAMES, COLOURS, EXTRA_COLOURS,
                                       EXTRA_SHAPES, MAX_OBJECTS, POSITIONS, SHAPES, SIZES)
from ldm.modules.encoders.caption_vocabulary import write_vocabulary
from ldm.modules.encoders.tokenization import fold_unicode

# Words per meaning; the first of each is the canonical caption's.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
EXTRA_PLURALS = {"heart": "hearts"}  # of EXTRA_SHAPES: kept apart so that the default vocabulary stays as it was
assert tuple(EXTRA_PLURALS) == EXTRA_SHAPES
_ALL_PLURALS = {**PLURALS, **EXTRA_PLURALS}
GENERIC_NOUNS = {"shape": "shapes", "object": "objects"}  # the noun of an object whose shape is left out
ARTICLES = ("a", "an", "the", "one")
PREFIXES = ("a picture of", "an image of", "a drawing of")
# A lone object's region.
PLACEMENTS = {
    "left": ("on the left", "to the left", "at the left", "on the left side"),
    "right": ("on the right", "to the right", "at the right", "on the right side"),
    "top": ("at the top", "on top", "near the top"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom"),
    "center": ("in the center", "in the centre", "in the middle", "at the center"),
}
# Relation of a pair, keyed by the position of the object named first (the other is on the opposite side).
RELATIONS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "top": ("above", "over", "on top of"),
    "bottom": ("below", "under", "beneath", "underneath"),
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# Relations that say which axis a pair lies on (or nothing) but not which object is where.
SIDE_BY_SIDE = ("next to", "beside")
AND = "and"
# Arrangements of "two ..." (slot 0 is the left / upper object).
ARRANGEMENTS = {"horizontal": ("side by side", "next to each other"), "vertical": ("one above the other",)}
COUNT_WORD = "two"

# How often `typed_caption` states each attribute of an object, and the other choices it draws. Colour and shape
# are what a prompt is about, so they are left out rarely; size and position often, as people write.
STATE_PROB = {"shape": 0.9, "colour": 0.9, "size": 0.55, "position": 0.75}
CANONICAL_PROB = 0.2  # the canonical caption itself, so that its exact phrasing stays well learned
ARTICLE_PROBS = {"a": 0.55, "the": 0.15, "one": 0.1, "": 0.2}
COUNT_PROB = 0.5  # a pair of one shape is said "two <shape>s" this often
PREFIX_PROB = 0.05
SIDE_BY_SIDE_PROB = 0.5  # of horizontal pairs whose positions are left out: "next to" rather than "and"
CASES = {"lower": 0.6, "sentence": 0.3, "upper": 0.05, "title": 0.05}
ENDINGS = {"": 0.6, ".": 0.3, "!": 0.05, "...": 0.05}
QUOTES = {"": 0.94, "straight": 0.03, "curly": 0.03}  # a prompt pasted in quotes
QUOTE_MARKS = {"": ("", ""), "straight": ('"', '"'), "curly": ("\u201c", "\u201d")}


class DescribedObject(Protocol):
    """An object as the grammar sees it: indices into SHAPES, COLOURS, SIZES and POSITIONS."""

    shape: int
    colour: int
    size: int
    position: int


class ObjectLabels(NamedTuple):
    shape: int
    colour: int
    size: int
    position: int


def labelled_objects(attributes: np.ndarray) -> list[ObjectLabels]:
    """The objects of a scene's label array (MAX_OBJECTS, 4), in slot order (absent slots are all -1)."""
    return [ObjectLabels(*(int(v) for v in row)) for row in attributes if row[0] >= 0]


# ----------------------------------------------------------------------------------------------
# Phrasing
# ----------------------------------------------------------------------------------------------


def _with_article(article: str, words: str) -> str:
    if article == "a" and words[0] in "aeiou":
        article = "an"
    return f"{article} {words}" if article else words


def canonical_caption(objects: Sequence[DescribedObject], name_slot0_first: bool = True) -> str:
    """The template caption: "a <size> <colour> <shape> <placement>" or "<object> <relation> <object>"."""
    def phrase(obj: DescribedObject) -> str:
        return f"a {SIZES[obj.size]} {ALL_COLOURS[obj.colour]} {ALL_SHAPES[obj.shape]}"

    if len(objects) == 1:
        return f"{phrase(objects[0])} {PLACEMENTS[POSITIONS[objects[0].position]][0]}"
    first, second = objects if name_slot0_first else objects[::-1]
    return f"{phrase(first)} {RELATIONS[POSITIONS[first.position]][0]} {phrase(second)}"


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _weighted(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    return keys[int(rng.choice(len(keys), p=np.asarray(list(probs.values())) / sum(probs.values())))]


def _descriptors(rng: np.random.Generator, obj: DescribedObject, stated: dict[str, bool]) -> str:
    """ "[size] [colour]" words of an object, the stated ones only."""
    words = []
    if stated["size"]:
        words.append(_choice(rng, SIZE_WORDS[SIZES[obj.size]]))
    if stated["colour"]:
        words.append(ALL_COLOURS[obj.colour])
    return " ".join(words)


def _object_words(rng: np.random.Generator, obj: DescribedObject, stated: dict[str, bool]) -> str:
    noun = ALL_SHAPES[obj.shape] if stated["shape"] else _choice(rng, tuple(GENERIC_NOUNS))
    descriptors = _descriptors(rng, obj, stated)
    return _with_article(_weighted(rng, ARTICLE_PROBS), f"{descriptors} {noun}" if descriptors else noun)


def _draw_stated(rng: np.random.Generator) -> dict[str, bool]:
    return {name: bool(rng.uniform() < STATE_PROB[name]) for name in ATTRIBUTE_NAMES}


def _typed_words(rng: np.random.Generator, objects: Sequence[DescribedObject]) -> str:
    """The words of a typed caption, lower case and unpunctuated."""
    if len(objects) == 1:
        obj, stated = objects[0], _draw_stated(rng)
        words = _object_words(rng, obj, stated)
        return f"{words} {_choice(rng, PLACEMENTS[POSITIONS[obj.position]])}" if stated["position"] else words
    first, second = objects
    stated = [_draw_stated(rng), _draw_stated(rng)]
    horizontal = POSITIONS[first.position] == "left"
    if first.shape == second.shape and rng.uniform() < COUNT_PROB:
        # "two [size] [colour] <shape>s [arrangement]": what both objects share, as stated for the first.
        shared = {"size": stated[0]["size"] and first.size == second.size,
                  "colour": stated[0]["colour"] and first.colour == second.colour}
        descriptors = _descriptors(rng, first, shared)
        noun = _ALL_PLURALS[ALL_SHAPES[first.shape]] if stated[0]["shape"] else _choice(rng, tuple(GENERIC_NOUNS.values()))
        words = f"{COUNT_WORD} {descriptors} {noun}" if descriptors else f"{COUNT_WORD} {noun}"
        if stated[0]["position"]:
            words += " " + _choice(rng, ARRANGEMENTS["horizontal" if horizontal else "vertical"])
        return words
    order = (0, 1) if rng.uniform() < 0.5 else (1, 0)
    named_first = objects[order[0]]
    if stated[0]["position"]:
        relation = _choice(rng, RELATIONS[POSITIONS[named_first.position]])
    elif horizontal and rng.uniform() < SIDE_BY_SIDE_PROB:
        relation = _choice(rng, SIDE_BY_SIDE)
    else:
        relation = AND
    return " ".join((_object_words(rng, named_first, stated[0]), relation,
                     _object_words(rng, objects[order[1]], stated[1])))


def _typeset(rng: np.random.Generator, words: str) -> str:
    """Case, closing punctuation and quotes as people type them."""
    case = _weighted(rng, CASES)
    if case == "sentence":
        words = words[0].upper() + words[1:]
    elif case == "upper":
        words = words.upper()
    elif case == "title":
        words = words.title()
    words += _weighted(rng, ENDINGS)
    opening, closing = QUOTE_MARKS[_weighted(rng, QUOTES)]
    return f"{opening}{words}{closing}"


def typed_caption(objects: Sequence[DescribedObject], rng: np.random.Generator,
                  name_slot0_first: bool = True) -> str:
    """A caption of `objects` as a person might type it (module docstring), drawn with `rng`."""
    if rng.uniform() < CANONICAL_PROB:
        return canonical_caption(objects, name_slot0_first)
    words = _typed_words(rng, objects)
    if rng.uniform() < PREFIX_PROB:
        words = f"{_choice(rng, PREFIXES)} {words}"
    return _typeset(rng, words)


# ----------------------------------------------------------------------------------------------
# Reading prompts back
# ----------------------------------------------------------------------------------------------

def normalise_prompt(prompt: str) -> str:
    """Lower case, unicode folded, punctuation dropped, single spaces: the words the grammar reads."""
    return " ".join(re.sub(r"[^\w\s]", " ", fold_unicode(prompt).lower()).split())


def _alternatives(phrases: Any) -> str:
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_SIZE_OF = {word: size for size, words in SIZE_WORDS.items() for word in words}
_PLACEMENT_OF = {phrase: name for name, phrases in PLACEMENTS.items() for phrase in phrases}
_RELATION_OF = {phrase: name for name, phrases in RELATIONS.items() for phrase in phrases}
_ARRANGEMENT_OF = {phrase: axis for axis, phrases in ARRANGEMENTS.items() for phrase in phrases}
_PLURAL_OF = {plural: shape for shape, plural in _ALL_PLURALS.items()}
_DESCRIPTORS = (rf"(?:(?P<size{{i}}>{_alternatives(_SIZE_OF)}) )?"
                rf"(?:(?P<colour{{i}}>{_alternatives(ALL_COLOURS)}) )?")
_OBJECT = (rf"(?:(?:{_alternatives(ARTICLES)}) )?{_DESCRIPTORS}"
           rf"(?P<noun{{i}}>{_alternatives((*ALL_SHAPES, *GENERIC_NOUNS))})")
_PREFIX = rf"(?:(?:{_alternatives(PREFIXES)}) )?"
_SINGLE_RE = re.compile(rf"{_PREFIX}{_OBJECT.format(i=0)}(?: (?P<placement>{_alternatives(_PLACEMENT_OF)}))?")
_PAIR_RE = re.compile(rf"{_PREFIX}{_OBJECT.format(i=0)} "
                      rf"(?P<relation>{_alternatives((*_RELATION_OF, *SIDE_BY_SIDE, AND))}) {_OBJECT.format(i=1)}")
_COUNT_RE = re.compile(rf"{_PREFIX}{COUNT_WORD} {_DESCRIPTORS.format(i=0)}"
                       rf"(?P<plural>{_alternatives((*_PLURAL_OF, *GENERIC_NOUNS.values()))})"
                       rf"(?: (?P<arrangement>{_alternatives(_ARRANGEMENT_OF)}))?")


def _identity(match: re.Match, group: int, noun: Optional[str]) -> list[int]:
    """[shape, colour, size] indices stated by object `group` of `match`, -1 where unstated."""
    size, colour = match[f"size{group}"], match[f"colour{group}"]
    return [ALL_SHAPES.index(noun) if noun in ALL_SHAPES else -1,
            ALL_COLOURS.index(colour) if colour else -1,
            SIZES.index(_SIZE_OF[size]) if size else -1]


def _position(name: Optional[str]) -> int:
    return POSITIONS.index(name) if name else -1


def _grammar_summary() -> str:
    return (f"expected '<object> [{' | '.join(p[0] for p in PLACEMENTS.values())} | ...]', "
            f"'<object> <{' | '.join(r[0] for r in RELATIONS.values())} | next to | and | ...> <object>' or "
            f"'two [size] [colour] <shape>s [side by side | one above the other]', where <object> is "
            f"'[a|the|one] [{'|'.join(_SIZE_OF)}] [{'|'.join(COLOURS)}] <{'|'.join((*SHAPES, *GENERIC_NOUNS))}>'")


def caption_to_attributes(caption: str) -> dict[str, Any]:
    """Parse a prompt of this grammar into the labels it states.

    Returns ``attributes`` (int64, (MAX_OBJECTS, 4), canonical slot order: slot 0 is the only, left or upper
    object; -1 where the prompt says nothing), ``num_objects``, ``class_label`` (`default_class_label`) and
    ``ordered``: False when the prompt does not say which object is which slot ("a red circle and a blue square",
    "... next to ..."), so a judge may match its two objects either way round (their positions, if stated, stay
    with the slots)."""
    text = normalise_prompt(caption)
    attributes = np.full((MAX_OBJECTS, len(ATTRIBUTE_NAMES)), -1, dtype=np.int64)
    ordered = True
    if pair := _PAIR_RE.fullmatch(text):
        relation = pair["relation"]
        first, second = _identity(pair, 0, pair["noun0"]), _identity(pair, 1, pair["noun1"])
        if relation in _RELATION_OF:
            named_first = _RELATION_OF[relation]
            first_slot = 0 if named_first in ("left", "top") else 1  # slot 0 is the left / upper object
            attributes[first_slot] = [*first, _position(named_first)]
            attributes[1 - first_slot] = [*second, _position(OPPOSITE[named_first])]
        else:
            ordered = False
            sides = ("left", "right") if relation in SIDE_BY_SIDE else (None, None)
            attributes[0], attributes[1] = [*first, _position(sides[0])], [*second, _position(sides[1])]
        num_objects = 2
    elif count := _COUNT_RE.fullmatch(text):
        identity = _identity(count, 0, _PLURAL_OF.get(count["plural"]))
        axis = _ARRANGEMENT_OF.get(count["arrangement"])
        sides = {"horizontal": ("left", "right"), "vertical": ("top", "bottom"), None: (None, None)}[axis]
        attributes[0], attributes[1] = [*identity, _position(sides[0])], [*identity, _position(sides[1])]
        num_objects = 2
    elif single := _SINGLE_RE.fullmatch(text):
        placement = single["placement"]
        attributes[0] = [*_identity(single, 0, single["noun0"]), _position(_PLACEMENT_OF.get(placement))]
        num_objects = 1
    else:
        raise ValueError(f"cannot parse caption {caption!r}: {_grammar_summary()}")
    return {"attributes": attributes, "num_objects": num_objects, "class_label": default_class_label(attributes),
            "ordered": ordered}


def default_class_label(attributes: np.ndarray) -> int:
    """``shape * len(COLOURS) + colour`` of slot 0 of a label array, or -1 if either is unknown or an extra one
    (`EXTRA_SHAPES`, `EXTRA_COLOURS`): the class labels are the default pairs', and an extra index would collide."""
    shape, colour = int(attributes[0, 0]), int(attributes[0, 1])
    return shape * len(COLOURS) + colour if 0 <= shape < len(SHAPES) and 0 <= colour < len(COLOURS) else -1


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

def caption_vocabulary(extended: bool = False) -> list[str]:
    """Every word of the grammar, sorted: what a small text encoder for these captions needs (and reads
    without [UNK]); `write_caption_vocabulary` turns it into a WordPiece vocab.txt. `extended` adds the words of
    the extra shapes and colours (the shipped models' vocabulary is the default one)."""
    phrases = [*SHAPES, *COLOURS, *PLURALS.values(), *GENERIC_NOUNS, *GENERIC_NOUNS.values(), *ARTICLES,
               *PREFIXES, *_SIZE_OF, *_PLACEMENT_OF, *_RELATION_OF, *SIDE_BY_SIDE, AND, *_ARRANGEMENT_OF, COUNT_WORD]
    if extended:
        phrases += [*EXTRA_SHAPES, *EXTRA_COLOURS, *EXTRA_PLURALS.values()]
    return sorted({word for phrase in phrases for word in phrase.split()})


def write_caption_vocabulary(path: str) -> None:
    """A BERT WordPiece vocab.txt (special tokens first) holding `caption_vocabulary()`."""
    write_vocabulary(caption_vocabulary(), Path(path))
