import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.shapes import ATTRIBUTE_NAMES, ShapesDataset, caption_to_attributes
from ldm.evaluation.attribute_classifier import (
    CONFIG_FILE,
    DEFAULT_DIR,
    WEIGHTS_FILE,
    AttributeClassifier,
    attribute_accuracy,
    attribute_loss,
    load_attribute_classifier,
    save_attribute_classifier,
)

# A dataset seed the training script never uses (it trains on seeds >= 1_000_000, reports on seed 0).
FRESH_SEED = 987


@pytest.fixture(scope="module")
def shipped() -> AttributeClassifier:
    return load_attribute_classifier()


def _held_out(split: str, size: int = 32, num: int = 300) -> tuple[torch.Tensor, dict]:
    batch = next(iter(DataLoader(ShapesDataset(split, size=size, num_samples=num, seed=FRESH_SEED), batch_size=num)))
    return batch["image"].permute(0, 3, 1, 2), {"attributes": batch["attributes"], "num_objects": batch["num_objects"]}


@pytest.mark.parametrize("split", ["validation", "test"])
def test_shipped_weights_read_held_out_images(shipped, split):
    images, target = _held_out(split)
    accuracy = attribute_accuracy(shipped.predict(images), target)
    for name in (*ATTRIBUTE_NAMES, "num_objects"):
        assert accuracy[name] >= 0.98, (split, accuracy)


def test_larger_images_are_resized(shipped):
    images, target = _held_out("validation", size=64, num=200)
    accuracy = attribute_accuracy(shipped.predict(images), target)
    assert min(accuracy[name] for name in ATTRIBUTE_NAMES) >= 0.97, accuracy


def test_shipped_files_are_small_and_described():
    weights = DEFAULT_DIR / WEIGHTS_FILE
    assert weights.stat().st_size < 1_000_000
    config = json.loads((DEFAULT_DIR / CONFIG_FILE).read_text())
    assert set(config["model"]) == {"channels", "bottleneck", "hidden", "input_size"}


def test_prediction_format_and_features(shipped):
    images, target = _held_out("train", num=16)
    pred = shipped.predict(images)
    assert pred["attributes"].shape == (16, 2, 4) and pred["attributes"].dtype == torch.int64
    single = pred["num_objects"] == 1
    assert (pred["attributes"][single, 1] == -1).all() and (pred["attributes"][~single, 1] >= 0).all()
    features = shipped.features(images)
    assert features.shape == (16, shipped.config["hidden"])
    with pytest.raises(ValueError, match="permute"):
        shipped.predict(images.permute(0, 2, 3, 1))


def _prompt_targets(captions: list[str]) -> dict[str, np.ndarray]:
    parsed = [caption_to_attributes(c) for c in captions]
    return {key: np.stack([np.asarray(p[key]) for p in parsed]) for key in ("attributes", "num_objects")}


def test_checks_prompts(shipped):
    # How generated images are scored: labels parsed from the prompt, words it leaves out not scored.
    images, _ = _held_out("validation", num=60)
    captions = [ShapesDataset("validation", num_samples=60, seed=FRESH_SEED)[i]["caption"] for i in range(60)]
    pred = shipped.predict(images)
    sizeless = [c.replace("small ", "").replace("large ", "") for c in captions]
    accuracy = attribute_accuracy(pred, _prompt_targets(sizeless))
    assert np.isnan(accuracy["size"]) and accuracy["all"] >= 0.95
    # A prompt the images do not follow scores low.
    recoloured = [c.replace("red", "TMP").replace("blue", "red").replace("TMP", "blue") for c in captions]
    changed = [r != c for r, c in zip(recoloured, captions)]
    wrong = attribute_accuracy(pred, _prompt_targets(recoloured))
    assert wrong["all"] <= 1.0 - 0.9 * np.mean(changed)


def test_attribute_accuracy_semantics():
    target = {"attributes": torch.tensor([[[0, 1, 0, 4], [-1, -1, -1, -1]],
                                          [[2, 3, 1, 0], [1, 1, 0, 1]],
                                          [[5, 5, -1, -1], [-1, -1, -1, -1]]]),
              "num_objects": torch.tensor([1, 2, 1])}
    pred = {"attributes": torch.tensor([[[0, 1, 0, 4], [-1, -1, -1, -1]],
                                        [[2, 0, 1, 0], [-1, -1, -1, -1]],  # wrong colour, missed slot 1
                                        [[5, 5, 1, 2], [-1, -1, -1, -1]]]),  # size/position unstated
            "num_objects": torch.tensor([1, 1, 1])}
    accuracy = attribute_accuracy(pred, target)
    assert accuracy["shape"] == pytest.approx(3 / 4)  # 4 stated objects, slot 1 of image 2 missed
    assert accuracy["colour"] == pytest.approx(2 / 4)
    assert accuracy["size"] == pytest.approx(2 / 3) and accuracy["position"] == pytest.approx(2 / 3)
    assert accuracy["num_objects"] == pytest.approx(2 / 3) and accuracy["all"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        attribute_accuracy({"attributes": torch.zeros(3, 1, 4), "num_objects": torch.ones(3)}, target)


def test_save_load_round_trip_and_missing_files(tmp_path):
    torch.manual_seed(0)
    model = AttributeClassifier(channels=(8, 8), bottleneck=4, hidden=16, input_size=32).eval()
    save_attribute_classifier(model, tmp_path / "clf")
    loaded = load_attribute_classifier(tmp_path / "clf" / WEIGHTS_FILE)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.features(images), model.features(images))
    with pytest.raises(FileNotFoundError, match="train_attribute_classifier.py"):
        load_attribute_classifier(tmp_path / "missing")


def test_loss_ignores_absent_slots_and_trains():
    torch.manual_seed(0)
    model = AttributeClassifier(channels=(8, 8), bottleneck=4, hidden=32)
    batch = next(iter(DataLoader(ShapesDataset("train", num_samples=32), batch_size=32)))
    images = batch["image"].permute(0, 3, 1, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = attribute_loss(model(images), batch["attributes"], batch["num_objects"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
