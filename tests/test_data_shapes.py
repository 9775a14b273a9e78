import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.masks import random_inpainting_mask
from ldm.data.shapes import (
    CLASS_NAMES,
    COLOURS,
    HELD_OUT_PAIRS,
    NUM_CLASSES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    ShapesTest,
    ShapesTrain,
    ShapesValidation,
    caption_to_attributes,
)
from ldm.util import instantiate_from_config

HELD = {(SHAPES.index(s), COLOURS.index(c)) for s, c in HELD_OUT_PAIRS}


def _pairs(attributes: np.ndarray) -> set[tuple[int, int]]:
    return {(int(s), int(c)) for s, c, _, _ in attributes if s >= 0}


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_items_are_pure_functions_of_seed_split_and_index():
    first = ShapesDataset("train", num_samples=50, seed=3, with_mask=True)
    second = ShapesDataset("train", num_samples=50, seed=3, with_mask=True)
    for index in (7, 0, 49, 7):  # any order, any instance
        _assert_items_equal(first[index], second[index])
    other_seed = ShapesDataset("train", num_samples=50, seed=4)
    assert not np.array_equal(first[7]["image"], other_seed[7]["image"])


def test_items_identical_across_dataloader_workers():
    dataset = ShapesDataset("validation", num_samples=12)
    in_process = next(iter(DataLoader(dataset, batch_size=12, num_workers=0)))
    # Two workers build interleaved halves of the batch in other processes.
    batches = list(DataLoader(dataset, batch_size=3, num_workers=2))
    images = torch.cat([b["image"] for b in batches])
    assert torch.equal(images, in_process["image"])
    assert sum((b["caption"] for b in batches), []) == in_process["caption"]


def test_batches_collate_to_fixed_size_labels():
    batch = next(iter(DataLoader(ShapesDataset("train", num_samples=16), batch_size=16)))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == torch.float32
    assert batch["attributes"].shape == (16, 2, 4) and batch["attributes"].dtype == torch.int64
    assert batch["num_objects"].dtype == torch.int64 and set(batch["num_objects"].tolist()) <= {1, 2}
    assert batch["class_label"].dtype == torch.int64 and len(batch["caption"]) == 16


@pytest.mark.parametrize("size", [32, 64])
def test_image_range_shape_dtype(size):
    dataset = ShapesDataset("train", size=size, num_samples=40)
    for index in range(40):
        image = dataset[index]["image"]
        assert image.shape == (size, size, 3) and image.dtype == np.float32
        assert image.min() >= -1.0 and image.max() <= 1.0


def test_larger_sizes_draw_the_same_scene():
    small = ShapesDataset("train", size=32, num_samples=20)
    large = ShapesDataset("train", size=64, num_samples=20)
    for index in range(20):
        downsampled = large[index]["image"].reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        # Analytic coverage at 32 vs 2x2 box-filtered 64: equal away from edges, close on them.
        assert np.abs(downsampled - small[index]["image"]).mean() < 0.02
        assert large[index]["caption"] == small[index]["caption"]


def test_held_out_pairs_never_in_train_or_validation_and_always_in_test():
    for split in ("train", "validation"):
        dataset = ShapesDataset(split, num_samples=500)
        seen = set()
        for index in range(500):
            pairs = _pairs(dataset[index]["attributes"])
            assert not pairs & HELD, (split, index, dataset[index]["caption"])
            seen |= pairs
        # Every shape and every colour still occurs (with other partners).
        assert {s for s, _ in seen} == set(range(len(SHAPES)))
        assert {c for _, c in seen} == set(range(len(COLOURS)))
    test = ShapesTest(num_samples=300)
    for index in range(300):
        assert _pairs(test[index]["attributes"]) & HELD, test[index]["caption"]


def test_validation_and_test_differ_from_train():
    train, validation, test = ShapesTrain(num_samples=20), ShapesValidation(num_samples=20), ShapesTest(num_samples=20)
    assert (train.split, validation.split, test.split) == ("train", "validation", "test")
    for index in range(20):
        assert not np.array_equal(train[index]["image"], validation[index]["image"])
        assert not np.array_equal(train[index]["image"], test[index]["image"])


def test_caption_round_trip():
    for split in ("train", "validation", "test"):
        dataset = ShapesDataset(split, num_samples=300)
        for index in range(300):
            item = dataset[index]
            parsed = caption_to_attributes(item["caption"])
            np.testing.assert_array_equal(parsed["attributes"], item["attributes"], err_msg=item["caption"])
            assert parsed["num_objects"] == item["num_objects"]
            assert parsed["class_label"] == item["class_label"]


def test_label_semantics():
    dataset = ShapesDataset("train", num_samples=400)
    num_pairs = 0
    for index in range(400):
        item, scene = dataset[index], dataset.scene(index)
        attributes = item["attributes"]
        assert item["class_label"] == attributes[0, 0] * len(COLOURS) + attributes[0, 1]
        assert CLASS_NAMES[item["class_label"]] == f"{COLOURS[attributes[0, 1]]} {SHAPES[attributes[0, 0]]}"
        assert f"{SIZES[attributes[0, 2]]} {COLOURS[attributes[0, 1]]} {SHAPES[attributes[0, 0]]}" in item["caption"]
        if item["num_objects"] == 1:
            assert (attributes[1] == -1).all()
            continue
        num_pairs += 1
        first, second = scene.objects
        # Slot 0 is the left object of a side-by-side pair or the upper one of a stacked pair.
        if POSITIONS[attributes[0, 3]] == "left":
            assert POSITIONS[attributes[1, 3]] == "right" and first.centre_x < second.centre_x
            assert abs(first.centre_x - second.centre_x) > abs(first.centre_y - second.centre_y)
        else:
            assert (POSITIONS[attributes[0, 3]], POSITIONS[attributes[1, 3]]) == ("top", "bottom")
            assert first.centre_y < second.centre_y
            assert abs(first.centre_y - second.centre_y) > abs(first.centre_x - second.centre_x)
    assert 100 < num_pairs < 300
    assert NUM_CLASSES == ShapesDataset.num_classes == len(CLASS_NAMES) == 36


def test_caption_parser_reads_user_prompts():
    parsed = caption_to_attributes("A red circle.")
    assert parsed["num_objects"] == 1 and parsed["class_label"] == SHAPES.index("circle") * 6 + COLOURS.index("red")
    assert parsed["attributes"][0].tolist() == [SHAPES.index("circle"), COLOURS.index("red"), -1, -1]
    # Naming the right-hand object first still puts the left one in slot 0.
    parsed = caption_to_attributes("an orange star to the right of a large blue square")
    assert parsed["attributes"].tolist() == [
        [SHAPES.index("square"), COLOURS.index("blue"), SIZES.index("large"), POSITIONS.index("left")],
        [SHAPES.index("star"), COLOURS.index("orange"), -1, POSITIONS.index("right")],
    ]
    parsed = caption_to_attributes("a small green cross  below a yellow diamond")
    assert parsed["attributes"][:, 3].tolist() == [POSITIONS.index("top"), POSITIONS.index("bottom")]
    assert parsed["attributes"][0, 0] == SHAPES.index("diamond")
    assert caption_to_attributes("a large purple triangle in the centre")["attributes"][0, 3] == POSITIONS.index("center")
    with pytest.raises(ValueError, match="cannot parse caption 'a pink elephant'.*<object>"):
        caption_to_attributes("a pink elephant")


def test_mask_items():
    dataset = ShapesDataset("train", num_samples=60, with_mask=True)
    plain = ShapesDataset("train", num_samples=60)
    coverages = []
    for index in range(60):
        item = dataset[index]
        mask = item["mask"]
        assert mask.shape == (32, 32, 1) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0} and mask.any()
        np.testing.assert_array_equal(item["masked_image"][mask[..., 0] == 1], 0.0)
        np.testing.assert_array_equal(item["masked_image"], item["image"] * (1 - mask))
        # Turning masks on leaves the scene unchanged.
        np.testing.assert_array_equal(item["image"], plain[index]["image"])
        coverages.append(mask.mean())
    assert 0.1 < np.mean(coverages) < 0.5


def _is_filled_rectangle(mask: np.ndarray) -> bool:
    rows, cols = np.nonzero(mask[..., 0])
    return bool(mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())


def test_masks_deterministic_both_kinds_and_resolution_independent():
    np.testing.assert_array_equal(random_inpainting_mask(5, 32), random_inpainting_mask(5, 32))
    assert not np.array_equal(random_inpainting_mask(5, 32), random_inpainting_mask(6, 32))
    assert all(_is_filled_rectangle(random_inpainting_mask(seed, 48, box_prob=1.0)) for seed in range(10))
    strokes = [random_inpainting_mask(seed, 48, box_prob=0.0) for seed in range(10)]
    assert all(s.any() for s in strokes) and not any(_is_filled_rectangle(s) for s in strokes)
    fine = random_inpainting_mask(3, 64, box_prob=0.0)[..., 0].reshape(32, 2, 32, 2).mean(axis=(1, 3))
    coarse = random_inpainting_mask(3, 32, box_prob=0.0)[..., 0]
    assert np.abs(fine - coarse).mean() < 0.1
    with pytest.raises(ValueError, match="box_prob"):
        random_inpainting_mask(0, 32, box_prob=2.0)


def test_generation_is_fast():
    dataset = ShapesDataset("train", num_samples=300)
    start = time.perf_counter()
    for index in range(300):
        dataset[index]
    # ~0.4 ms per item on one core; a generous bound that still catches a slow (per-pixel) renderer.
    assert time.perf_counter() - start < 3.0


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        ShapesDataset("val")
    with pytest.raises(ValueError, match="textured_prob"):
        ShapesDataset(textured_prob=1.5)
    with pytest.raises(ValueError, match="size must be at least 8"):
        ShapesDataset(size=4)
    with pytest.raises(IndexError):
        ShapesDataset(num_samples=5)[5]


def test_builds_from_config():
    dataset = instantiate_from_config({"target": "ldm.data.shapes.ShapesValidation",
                                       "params": {"size": 64, "num_samples": 10, "with_mask": True}})
    item = dataset[0]
    assert item["image"].shape == (64, 64, 3) and item["mask"].shape == (64, 64, 1)


def test_keep_items_makes_each_item_once_and_changes_nothing(monkeypatch):
    kept, fresh = ShapesTrain(size=32, num_samples=20, keep_items=True), ShapesTrain(size=32, num_samples=20)
    made = []
    make = kept._make_item
    monkeypatch.setattr(kept, "_make_item", lambda index: made.append(index) or make(index))
    for _ in range(3):
        for index in (3, 7, 3):
            item, expected = kept[index], fresh[index]
            assert np.array_equal(item["image"], expected["image"]) and item["caption"] == expected["caption"]
            assert np.array_equal(item["attributes"], expected["attributes"])
    assert made == [3, 7]
    kept[3]["caption"] = "changed"  # a caller's edit of its copy does not reach the kept item
    assert kept[3]["caption"] == fresh[3]["caption"]
