"""bench/sampling.py: its FID in the attribute classifier's feature space, its count of model evaluations,
its masked-region errors, and a --quick run on tiny random models."""
import csv
import json
import math

import pytest
import torch
from PIL import Image

from bench.sampling import (SAMPLERS, ClassifierFeatures, UNetCallCounter, classifier_fid, expected_unet_calls,
                            fid_against_real, main, masked_region_errors, mean_colour_fill, prompt_set)
from ldm.evaluation.attribute_classifier import load_attribute_classifier
from ldm.evaluation.frechet import frechet_distance
from ldm.inference import inpaint, load_model, text_to_image


@pytest.fixture(scope="module")
def classifier():
    return load_attribute_classifier()


def test_classifier_fid_matches_frechet_module(classifier):
    # More images than feature dimensions (192), so both covariances are full rank and well conditioned.
    real = prompt_set("seen", 0, 400).images
    fake = prompt_set("heldout", 0, 300).images
    metric = classifier_fid(classifier, real, batch_size=128)
    with torch.no_grad():
        expected = frechet_distance(classifier.features(real), classifier.features(fake))
    assert fid_against_real(metric, fake, batch_size=128) == pytest.approx(expected, rel=1e-3)
    # The real statistics survive the reset between sets of samples.
    assert fid_against_real(metric, real) == pytest.approx(0.0, abs=1e-6 * expected)
    # Brighter images drift further from the real statistics the larger the shift.
    shifted = [fid_against_real(metric, (real + shift).clamp(-1, 1)) for shift in (0.2, 0.4, 0.8)]
    assert 1e-3 * expected < shifted[0] < shifted[1] < shifted[2]


def test_classifier_features_accepts_torchmetrics_probe_and_uint8(classifier):
    features = ClassifierFeatures(classifier)
    # What torchmetrics feeds a feature module without `num_features`: one uint8 3x299x299 image.
    probe = torch.randint(0, 255, (1, 3, 299, 299), dtype=torch.uint8)
    assert features(probe).shape == (1, features.num_features)
    images = prompt_set("seen", 0, 4).images
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(features(as_uint8), features(as_uint8.float() / 127.5 - 1))
    features.train()
    assert not classifier.training  # BatchNorm keeps its running statistics


def test_mean_colour_fill_by_hand():
    images = torch.zeros(1, 3, 2, 2)
    images[0, :, 0, 0] = torch.tensor([0.3, -0.6, 0.9])  # known
    images[0, :, 0, 1] = torch.tensor([0.1, 0.2, -0.1])  # known
    images[0, :, 1, :] = 5.0  # the hole's true content must not leak into the fill
    masks = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    filled = mean_colour_fill(images, masks)
    assert torch.equal(filled[..., 0, :], images[..., 0, :])
    expected = torch.tensor([0.2, -0.2, 0.4])
    assert torch.allclose(filled[0, :, 1, 0], expected) and torch.allclose(filled[0, :, 1, 1], expected)


def test_masked_region_errors_by_hand():
    original = torch.zeros(2, 3, 4, 4)
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2] = 1
    completed = original + 0.2 * masks  # 0.1 on the [0, 1] scale inside the mask, unchanged outside
    errors = masked_region_errors(completed, original, masks)
    assert errors["mae_masked"] == pytest.approx(0.1)
    assert errors["psnr_masked"] == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.1^2)
    assert errors["known_max_abs_error"] == 0.0
    errors = masked_region_errors(completed + 0.5 * (1 - masks), original, masks)
    assert errors["known_max_abs_error"] == pytest.approx(0.5)


def test_expected_calls_follow_the_reference_spacing():
    assert [expected_unet_calls("ddim", s, 1000) for s in (5, 10, 20, 50, 200)] == [5, 10, 20, 50, 200]
    assert expected_unet_calls("ddim", 7, 1000) == 8  # every 142nd of 1000 steps visits 8 timesteps
    assert expected_unet_calls("plms", 10, 1000) == 11
    assert expected_unet_calls("heun", 10, 1000) == 19
    assert expected_unet_calls("ddpm", 10, 1000) == 1000
    assert expected_unet_calls("dpm2", 10, 1000) == 19 and expected_unet_calls("unipc", 10, 1000) == 10
    with pytest.raises(ValueError, match="unknown sampler"):
        expected_unet_calls("k_lms", 10, 1000)


# A timestep sampler, the ancestral reference, a multistep and a predictor-corrector σ sampler.
QUICK_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "unipc")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_unet_calls_are_counted_exactly(sampler, tiny_txt2img_model, tiny_inpainting_model):
    txt2img, inpainting = load_model(tiny_txt2img_model), load_model(tiny_inpainting_model)
    steps = 4  # divides the tiny models' 16 timesteps
    expected = expected_unet_calls(sampler, steps, txt2img.num_timesteps)
    for scale, rows_per_call in ((1.0, 3), (3.0, 6)):  # guidance runs both halves in one doubled batch
        with UNetCallCounter(txt2img) as counter:
            text_to_image(txt2img, ["a red circle", "a blue square", "a green star"], scale=scale, sampler=sampler,
                          steps=steps, seed=0, progress=False)
        assert (counter.calls, counter.rows) == (expected, expected * rows_per_call)
    images = torch.zeros(2, 3, 32, 32)
    masks = torch.zeros(2, 1, 32, 32)
    masks[..., 8:24, 8:24] = 1
    for model, prompts in ((inpainting, None), (txt2img, ["a red circle", "a blue square"])):
        with UNetCallCounter(model) as counter:
            inpaint(model, images, masks, prompts, sampler=sampler, steps=steps, seed=0, progress=False)
        assert (counter.calls, counter.rows) == (expected, 2 * expected)


def test_quick_run_writes_all_outputs(tmp_path, tiny_txt2img_model, tiny_inpainting_model):
    outdir = tmp_path / "results"
    rows = main(["--quick", "--config", str(tiny_txt2img_model), "--inpaint-config", str(tiny_inpainting_model),
                 "--device", "cpu", "--steps", "4", "8", "--samplers", *QUICK_SAMPLERS, "--scales", "1", "3",
                 "--n-real", "64", "--outdir", str(outdir)])
    with open(outdir / "sampling.csv") as f:
        table = list(csv.DictReader(f))
    # Real images of both splits; txt2img: 3 samplers x 2 steps + ddpm, 2 scales, 2 splits;
    # inpainting: the mean-colour fill, then the same 7 sampler runs for each of the two models.
    assert len(table) == len(rows) == 2 + 1 + 7 * 2 * 2 + 7 * 2
    for row in table:
        if row["task"] == "real":
            assert float(row["match_all"]) > 0.9  # the classifier reads real images correctly
            continue
        if row["task"] == "mean-colour-fill":
            assert float(row["known_max_abs_error"]) == 0.0 and float(row["mae_masked"]) > 0
            continue
        assert int(row["unet_calls"]) == expected_unet_calls(row["sampler"], int(row["steps"]), 16)
        guided = row["task"] == "txt2img" and float(row["scale"]) != 1
        assert float(row["unet_evaluations_per_sample"]) == int(row["unet_calls"]) * (2 if guided else 1)
        assert 0 <= float(row["match_all"]) <= 1 and math.isfinite(float(row["fid"]))
        if row["task"] != "txt2img":
            assert float(row["known_max_abs_error"]) == 0.0
            assert float(row["mae_masked"]) > 0
    markdown = (outdir / "sampling.md").read_text()
    assert "## Text to image" in markdown and "## Inpainting" in markdown and "(exact)" in markdown
    assert "| ddpm | 16 | 16 |" in markdown and "| mean-colour fill |" in markdown
    with Image.open(outdir / "sampling.png") as image:
        assert image.size[0] > 1000
    settings = json.loads((outdir / "sampling.json").read_text())
    assert settings["n"] == 4 and settings["num_timesteps"] == 16 and "torchmetrics" in settings["versions"]
    # --update re-measures one task and keeps the other task's rows from the csv.
    txt2img_rows = [r for r in table if r["task"] == "txt2img"]
    main(["--quick", "--config", str(tiny_txt2img_model), "--inpaint-config", str(tiny_inpainting_model),
          "--device", "cpu", "--steps", "4", "--samplers", "ddim", "--tasks", "inpainting", "--n-real", "64",
          "--update", "--outdir", str(outdir)])
    with open(outdir / "sampling.csv") as f:
        updated = list(csv.DictReader(f))
    assert [r for r in updated if r["task"] == "txt2img"] == txt2img_rows
    assert len([r for r in updated if r["task"] in ("inpainting", "txt2img-keep-known")]) == 2
    assert len([r for r in updated if r["task"] == "mean-colour-fill"]) == 1
