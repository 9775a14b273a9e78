"""The built-in captions' grammar: typed phrasings say only what is true, vary as people write, and read back."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.captions import (ARRANGEMENTS, PLACEMENTS, RELATIONS, SIZE_WORDS, caption_to_attributes,
                               caption_vocabulary, labelled_objects, normalise_prompt, typed_caption)
from ldm.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapesTest, ShapesTrain, ShapesValidation
from ldm.evaluation.prompt_following import align_unordered, caption_targets
from ldm.modules.encoders.modules import BERTTokenizer
from tests.test_main import REPO

SHIPPED_VOCAB = REPO / "ldm" / "data" / "shapes_vocab.txt"


def _states_only_truth(caption: str, attributes: np.ndarray, num_objects: int) -> bool:
    """Every label `caption` states is the item's (either way round where the caption allows it)."""
    parsed = caption_to_attributes(caption)
    if parsed["num_objects"] != num_objects:
        return False
    stated = parsed["attributes"]
    candidates = [stated]
    if not parsed["ordered"]:
        swapped = stated.copy()
        swapped[:, :3] = stated[::-1, :3]
        candidates.append(swapped)
    return any(((c < 0) | (c == attributes)).all() for c in candidates)


@pytest.mark.parametrize("dataset", [ShapesTrain, ShapesValidation, ShapesTest])
def test_typed_captions_state_only_what_the_image_shows(dataset):
    data = dataset(size=8, num_samples=1500, caption_style="typed")
    for index in range(1500):
        item = data[index]
        for caption in (item["caption"], item["typed_caption"]):
            assert _states_only_truth(caption, item["attributes"], item["num_objects"]), (caption, item["attributes"])


def test_typed_captions_use_the_variety_people_write():
    data = ShapesTrain(size=8, num_samples=3000, caption_style="typed")
    captions = [data[i]["caption"] for i in range(3000)]
    words = Counter(w for c in captions for w in normalise_prompt(c).split())
    for word in ("big", "tiny", "little", "middle", "centre", "over", "beneath", "under", "two", "one", "the", "and",
                 "next", "shape", "circles", "picture"):
        assert words[word] > 0, word
    text = "\n".join(normalise_prompt(c) for c in captions)
    for phrase in ("on top of", "side by side", "left of a", "one above the other"):
        assert phrase in text, phrase
    assert any(c[0].isupper() for c in captions) and any(c.isupper() for c in captions)
    assert any(c.endswith(".") for c in captions) and any("\u201c" in c for c in captions)
    parsed = [caption_to_attributes(c) for c in captions]
    single = [p["attributes"][0] for p in parsed if p["num_objects"] == 1]
    for column, name in enumerate(("shape", "colour", "size", "position")):  # each attribute is sometimes left out
        unstated = sum(row[column] < 0 for row in single) / len(single)
        assert 0.03 < unstated < 0.6, (name, unstated)
    assert any(not re.match(r"^\W*(a|an|the|one)\b", normalise_prompt(c)) for c in captions)  # no article


def test_held_out_splits_keep_canonical_captions_and_typed_forms_are_fixed():
    first, second = ShapesValidation(size=8, num_samples=50), ShapesValidation(size=8, num_samples=50)
    for index in range(50):
        a, b = first[index], second[index]
        assert a["caption"] == b["caption"] and a["typed_caption"] == b["typed_caption"]
        parsed = caption_to_attributes(a["caption"])["attributes"]
        assert (parsed == a["attributes"]).all()  # the canonical caption states everything
        assert re.fullmatch(r"(a|an) (small|large) .*", a["caption"])


def test_training_captions_are_drawn_anew_at_each_read():
    data = ShapesTrain(size=8, num_samples=200, caption_style="typed", keep_items=True)
    first = [data[i]["caption"] for i in range(200)]
    second = [data[i]["caption"] for i in range(200)]
    assert sum(a != b for a, b in zip(first, second)) > 100
    assert all(np.array_equal(data[i]["attributes"], data[i]["attributes"]) for i in range(5))
    canonical = ShapesTrain(size=8, num_samples=20)
    assert all(canonical[i]["caption"] == canonical[i]["caption"] for i in range(20))
    with pytest.raises(ValueError, match="caption_style.*canonical"):
        ShapesTrain(caption_style="fancy")


def test_typed_caption_is_reproducible_from_its_generator():
    objects = labelled_objects(ShapesTrain(size=8, num_samples=5)[3]["attributes"])
    draw = lambda seed: [typed_caption(objects, np.random.default_rng(seed)) for _ in range(1)]  # noqa: E731
    assert draw(7) == draw(7)


@pytest.mark.parametrize("prompt, attributes, num_objects, ordered", [
    ("Two red circles side by side.", [[0, 0, -1, 0], [0, 0, -1, 1]], 2, True),
    ("two big stars one above the other", [[3, -1, 1, 2], [3, -1, 1, 3]], 2, True),
    ("a red circle and a blue square", [[0, 0, -1, -1], [1, 4, -1, -1]], 2, False),
    ("the purple cross next to one orange diamond", [[5, 5, -1, 0], [4, 1, -1, 1]], 2, False),
    ("A BIG blue star beneath the tiny yellow diamond!", [[4, 2, 0, 2], [3, 4, 1, 3]], 2, True),
    ("\u201cgreen triangle in the middle\u201d", [[2, 3, -1, 4], [-1, -1, -1, -1]], 1, True),
    ("an image of a little shape on top", [[-1, -1, 0, 2], [-1, -1, -1, -1]], 1, True),
    ("a red circle on top of a blue square", [[0, 0, -1, 2], [1, 4, -1, 3]], 2, True),
    ("orange square left of a star", [[1, 1, -1, 0], [3, -1, -1, 1]], 2, True),
    ("a small red circle to the right of a large blue square", [[1, 4, 1, 0], [0, 0, 0, 1]], 2, True),
])
def test_prompts_read_back_into_what_they_state(prompt, attributes, num_objects, ordered):
    parsed = caption_to_attributes(prompt)
    assert parsed["attributes"].tolist() == attributes
    assert parsed["num_objects"] == num_objects and parsed["ordered"] == ordered


def test_unparseable_prompt_names_the_grammar():
    with pytest.raises(ValueError, match="cannot parse caption 'a pink elephant'.*<object>"):
        caption_to_attributes("a pink elephant")


def test_judge_matches_an_unordered_caption_either_way_round():
    target = caption_targets(["a red circle and a blue square", "a red circle above a blue square"])
    # The classifier saw the square in slot 0 (upper) and the circle below: fine for "and", wrong for "above".
    predicted = torch.tensor([[[1, 4, 0, 2], [0, 0, 0, 3]]] * 2)
    aligned = align_unordered(predicted, target)["attributes"]
    assert aligned[0, :, :2].tolist() == [[1, 4], [0, 0]]
    assert aligned[1, :, :2].tolist() == [[0, 0], [1, 4]]


def test_vocabulary_reads_every_typed_caption_within_the_configs_length():
    """The shipped vocabulary is the grammar's, every typed caption reads without [UNK] and fits max_seq_len."""
    config = OmegaConf.load(REPO / "configs/latent-diffusion/txt2img.yaml").model.params.cond_stage_config.params
    tokenizer = BERTTokenizer(vq_interface=False, max_length=64, tokenizer_path=str(SHIPPED_VOCAB))
    tokenizer.eval()
    data = ShapesTrain(size=8, num_samples=2000, caption_style="typed")
    ids = tokenizer([data[i]["caption"] for i in range(2000)])
    assert not (ids == tokenizer.tokenizer.unk_token_id).any()
    assert int((ids != tokenizer.tokenizer.pad_token_id).sum(1).max()) <= config.max_seq_len
    assert config.vocab_size == len(tokenizer.tokenizer) == 5 + len(caption_vocabulary())
    every_word = {w for table in (SIZE_WORDS, PLACEMENTS, RELATIONS, ARRANGEMENTS) for ps in table.values()
                  for p in ps for w in p.split()} | set(SHAPES) | set(COLOURS)
    assert every_word <= set(caption_vocabulary())
    assert set(SIZES) | {p for p in POSITIONS if p != "center"} <= set(caption_vocabulary())
