"""New shapes and colours of the built-in data (a heart, white; issue 26): only where asked for, every default item,
caption and vocabulary unchanged, and a judge, a folder and a grammar that know them."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ldm.data.captions import caption_vocabulary
from ldm.data.shape_attributes import ALL_COLOURS, ALL_SHAPES, COLOURS, SHAPES
from ldm.data.shapes import ShapesTest, ShapesTrain, ShapesValidation, caption_to_attributes, novel_pairs
from ldm.data.shapes_folder import write_shapes_folder
from ldm.evaluation.attribute_classifier import AttributeClassifier, load_attribute_classifier, save_attribute_classifier
from ldm.evaluation.new_words_probe import novel_match, novel_prompts

# Hashes of the default data and vocabulary taken before the new attributes existed.
DEFAULT_ITEMS_SHA256 = "9945403ff686f335583cfdb93db80a4f6a733763ee6dd491f4d38025a727236b"
DEFAULT_VOCABULARY_SHA256 = "795c1c767615724dcb8c71e7f555de7d8c7312ed7456916cf5773297ffb5038e"
EXTRAS = {"extra_shapes": ["heart"], "extra_colours": ["white"]}


def test_default_items_and_vocabulary_are_unchanged():
    digest = hashlib.sha256()
    for cls in (ShapesTrain, ShapesValidation, ShapesTest):
        for style in ("canonical", "typed"):
            data = cls(num_samples=64, caption_style=style, with_mask=True)
            for i in range(64):
                item = data[i]
                for key in ("image", "attributes", "mask"):
                    digest.update(np.ascontiguousarray(item[key]).tobytes())
                digest.update(f"{item['caption']}|{item['typed_caption']}|{item['class_label']}|{item['human_label']}|"
                              f"{item['num_objects']}".encode())
    assert digest.hexdigest() == DEFAULT_ITEMS_SHA256
    assert hashlib.sha256(" ".join(caption_vocabulary()).encode()).hexdigest() == DEFAULT_VOCABULARY_SHA256
    assert set(caption_vocabulary(extended=True)) - set(caption_vocabulary()) == {"heart", "hearts", "white"}


def test_extended_items_hold_a_new_shape_or_colour_and_read_back():
    heart, white = ALL_SHAPES.index("heart"), ALL_COLOURS.index("white")
    assert (heart, white) == (len(SHAPES), len(COLOURS))  # after the default ones: default labels keep their values
    data = ShapesTrain(num_samples=64, **EXTRAS)
    for i in range(64):
        item = data[i]
        attributes = item["attributes"]
        assert ((attributes[:, 0] == heart) | (attributes[:, 1] == white)).any()
        np.testing.assert_array_equal(caption_to_attributes(item["caption"])["attributes"], attributes)
        assert item["class_label"] == (-1 if attributes[0, 0] == heart or attributes[0, 1] == white
                                       else attributes[0, 0] * len(COLOURS) + attributes[0, 1])
        assert item["human_label"] == f"{ALL_COLOURS[attributes[0, 1]]} {ALL_SHAPES[attributes[0, 0]]}"
    assert len(novel_pairs(["heart"], [])) == len(COLOURS) and len(novel_pairs(["heart"], ["white"])) == 13
    with pytest.raises(ValueError, match="extra_shapes must be a list of names from"):
        ShapesTrain(num_samples=4, extra_shapes=["hexagon"])


def test_the_folder_is_a_captioned_image_folder(tmp_path):
    from ldm.data.folder import ImageFolderDataset

    captions = write_shapes_folder(tmp_path / "f", 6, **EXTRAS)
    folder = ImageFolderDataset(root=str(tmp_path / "f"), size=32)
    assert [folder[i]["caption"] for i in range(6)] == captions
    assert write_shapes_folder(tmp_path / "f", 6, **EXTRAS) == captions  # the same settings: kept
    with pytest.raises(FileExistsError, match="made with"):
        write_shapes_folder(tmp_path / "f", 7, **EXTRAS)


def test_the_extended_judge_saves_loads_and_scores_new_words(tmp_path):
    model = AttributeClassifier(channels=(8, 8), bottleneck=4, hidden=16, **EXTRAS).eval()
    assert model.head_sizes["shape"] == len(SHAPES) + 1 and model.head_sizes["colour"] == len(COLOURS) + 1
    assert "extra_shapes" not in AttributeClassifier(channels=(8, 8), bottleneck=4, hidden=16).config
    loaded = load_attribute_classifier(save_attribute_classifier(model, tmp_path))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(images)["shape"], model(images)["shape"])
    captions = ["a white circle", "a red heart on the left", "a small white heart above a blue square"]
    figures = novel_match(loaded, images, captions)
    assert 0.0 <= figures["novel_share"] <= 1.0 and "all" in figures
    assert load_attribute_classifier().head_sizes["shape"] == len(SHAPES)  # the shipped judge: default labels


def test_novel_prompts_leave_the_folder_out():
    sets = novel_prompts(8, ["heart"], ["white"])
    assert all(len(captions) == 8 for captions in sets.values())
    held_out = novel_prompts(8, ["heart"], ["white"], exclude=sets["novel"][:2])
    assert not set(sets["novel"][:2]) & set(held_out["novel"])
