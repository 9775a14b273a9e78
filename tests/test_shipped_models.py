"""The models shipped in models/ (made by scripts/train_builtin.sh) load, fit the size budget and do what is asked.

The prompt-following check generates from held-out validation captions and reads the images with the
shipped attribute classifier; the bars sit well above chance and below what the shipped models measured
(bench/results/sampling.md has the full figures), so a broken sampler, guidance or checkpoint fails them.
"""
from pathlib import Path

import pytest
import torch

from ldm.data.shapes import ShapesTest, ShapesValidation
from ldm.evaluation.attribute_classifier import load_attribute_classifier
from ldm.evaluation.prompt_following import prompt_match
from ldm.inference import BUILTIN_MODELS, inpaint, load_model, text_to_image

REPO = Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS = [
    REPO / "models/first_stage_models/kl-f4-shapes/model.safetensors",
    *(REPO / path / "model.safetensors" for path in BUILTIN_MODELS.values()),
    REPO / "models/attribute_classifier/attribute_classifier.safetensors",
]


def _items(dataset, n):
    items = [dataset[i] for i in range(n)]
    to_nchw = lambda key: torch.stack([torch.from_numpy(item[key]).permute(2, 0, 1) for item in items])
    return items, to_nchw


def test_shipped_weights_fit_in_10_mb():
    for path in SHIPPED_WEIGHTS:
        assert path.is_file(), f"{path} is missing: make it with BUILTIN_MODELS_DIR=models bash scripts/train_builtin.sh"
    total = sum(path.stat().st_size for path in SHIPPED_WEIGHTS)
    # About 10 MB, in fp16: the text-conditioned inpainting model carries its own (fine-tuned) text encoder.
    assert total <= 11_000_000, f"shipped weights take {total / 1e6:.2f} MB"


@pytest.fixture(scope="module")
def classifier():
    return load_attribute_classifier()


def test_shipped_txt2img_follows_prompts(classifier):
    model = load_model("txt2img")
    items, _ = _items(ShapesValidation(size=32), 64)
    captions = [item["caption"] for item in items]
    images = text_to_image(model, captions, scale=3.0, sampler="dpmpp_2m", steps=20, seed=0, progress=False)
    scores = prompt_match(classifier, images, captions)
    # Chance, measured: the same images against other items' captions.
    chance = prompt_match(classifier, images, captions[1:] + captions[:1])
    # Shape is not in the list: the shipped model does not draw it yet (bench/results/convergence.md).
    for attribute, margin in (("colour", 0.3), ("size", 0.15), ("position", 0.3), ("num_objects", 0.15)):
        assert scores[attribute] >= chance[attribute] + margin, (attribute, scores, chance)


def test_shipped_inpainting_fills_the_hole_and_keeps_the_rest():
    model = load_model("inpainting")
    items, to_nchw = _items(ShapesTest(size=32, with_mask=True), 64)
    image, mask = to_nchw("image"), to_nchw("mask")
    captions = [item["caption"] for item in items]
    out = inpaint(model, image, mask, captions, sampler="ddim", steps=20, seed=0, progress=False)
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    error_inside = ((out - image).abs() * mask).sum() / (3 * mask.sum())
    # Filling the hole with each image's mean known colour is the baseline the model must beat (measured
    # on 128 images: hole MAE 0.045 against 0.064 on the [0, 1] scale, bench/results/sampling.md).
    known = (1 - mask)
    mean_colour = (image * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True)
    fill_error = ((mean_colour - image).abs() * mask).sum() / (3 * mask.sum())
    assert error_inside < 0.85 * fill_error, (float(error_inside), float(fill_error))
