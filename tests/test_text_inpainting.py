"""Text-conditioned inpainting (LatentInpaintDiffusion with conditioning_key hybrid), on tiny models."""
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.data.shapes import ShapesTrain
from ldm.image_logs import log_images
from ldm.inference import inpaint, load_model
from ldm.util import instantiate_from_config
from tests.tiny_models import text_inpainting_config, txt2img_config, write_model_dir

STEPS = 4


@pytest.fixture(scope="module")
def batch():
    data = ShapesTrain(size=32, num_samples=4, with_mask=True)
    items = [data[i] for i in range(4)]
    stack = lambda key: torch.stack([torch.from_numpy(item[key]) for item in items])  # noqa: E731
    return {"image": stack("image"), "mask": stack("mask"), "masked_image": stack("masked_image"),
            "caption": [item["caption"] for item in items], "index": torch.arange(4)}


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny_txt2img"), txt2img_config(), seed=1)


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory, text_model_dir):
    config = text_inpainting_config()
    config["model"]["params"]["init_from_text_model"] = str(text_model_dir / "model.safetensors")
    return load_model(write_model_dir(tmp_path_factory.mktemp("tiny_text_inpainting"), config, seed=2))


def nchw(batch, key):
    return batch[key].permute(0, 3, 1, 2)


def test_starts_as_the_text_model_it_was_made_from(text_model_dir, batch):
    """init_from_text_model: every weight as the text model's, the first convolution's added input channels at
    zero, so before any training the output is the text model's whatever the masked image."""
    config = text_inpainting_config()
    config["model"]["params"]["init_from_text_model"] = str(text_model_dir / "model.safetensors")
    model = instantiate_from_config(config["model"]).eval()
    text = load_model(text_model_dir)
    first_conv = model.model.diffusion_model.input_blocks[0][0].weight
    assert torch.equal(first_conv[:, :4], text.model.diffusion_model.input_blocks[0][0].weight)
    assert not first_conv[:, 4:].any()
    assert float(model.scale_factor) == float(text.scale_factor)  # not measured again on the first batch
    # The EMA starts from the text model's (folded) weights.
    assert torch.equal(model.model_ema.diffusion_modelinput_blocks00weight, first_conv)

    torch.manual_seed(0)
    z, t = torch.randn(4, 4, 8, 8), torch.tensor([1, 5, 9, 15])
    with torch.no_grad():
        raw = {"c_concat": torch.cat([nchw(batch, "masked_image"), nchw(batch, "mask")], dim=1),
               "c_crossattn": batch["caption"]}
        ours = model.apply_model(z, t, model.get_learned_conditioning(raw))
        theirs = text.apply_model(z, t, text.get_learned_conditioning(batch["caption"]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_text_model_that_does_not_fit_is_named(tmp_path):
    other = txt2img_config()
    other["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    directory = write_model_dir(tmp_path / "wide", other)
    config = text_inpainting_config()
    config["model"]["params"]["init_from_text_model"] = str(directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot be widened"):
        instantiate_from_config(config["model"])


def test_conditioning_keys_are_checked():
    config = text_inpainting_config()
    config["model"]["params"]["conditioning_key"] = "concat"
    with pytest.raises(ValueError, match="use conditioning_key 'hybrid' to add a text encoder"):
        instantiate_from_config(config["model"])
    config["model"]["params"].update(conditioning_key="hybrid", cond_stage_config="__is_first_stage__")
    with pytest.raises(ValueError, match="set cond_stage_config to a text encoder"):
        instantiate_from_config(config["model"])


def test_trains_on_captions_and_masks_and_logs_both(batch):
    model = instantiate_from_config(text_inpainting_config()["model"])
    with torch.no_grad():  # the zero-initialised output layers would stop every gradient before them
        for param in model.model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    loss, _ = model.shared_step(dict(batch))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.diffusion_model.input_blocks[0][0].weight.grad[:, 4:].abs().sum() > 0  # reads the image
    assert next(model.cond_stage_model.parameters()).grad is not None  # and trains the text encoder
    model.eval()
    log = log_images(model, dict(batch), N=2, n_row=2, sample=True, steps=2)
    assert log["conditioning"].shape[-2] > log["conditioning"].shape[-1]  # masked image above the caption
    assert any(key.startswith("samples_cfg_scale") for key in log)  # guidance drops the caption only


def test_inpaint_follows_the_prompt_and_keeps_the_known_pixels(inpainting_model, batch):
    image, mask = nchw(batch, "image"), nchw(batch, "mask")
    run = lambda prompts, scale=1.0: inpaint(inpainting_model, image, mask, prompts, scale=scale,  # noqa: E731
                                             sampler="dpmpp_2m", steps=STEPS, seed=0, progress=False)
    red, blue = run(["a red circle"] * 4), run(["a blue star"] * 4)
    for out in (red, blue, run(["a red circle"] * 4, scale=3.0)):
        assert torch.equal(out * (1 - mask), image * (1 - mask))
    assert not torch.allclose(red, blue)
    assert torch.equal(run(None), run([""] * 4))  # no prompt is the empty prompt
    guided = inpaint(inpainting_model, image, mask, ["a red circle"] * 4, scale=3.0, negative_prompt="a blue star",
                     sampler="dpmpp_2m", steps=STEPS, seed=0, progress=False)
    assert not torch.allclose(guided, run(["a red circle"] * 4, scale=3.0))
    assert torch.equal(guided * (1 - mask), image * (1 - mask))
    # A plain string is the prompt of every image (as diffusers broadcasts it).
    assert torch.equal(run("a red circle"), red)


def test_model_directory_loads_without_the_text_model(tmp_path, text_model_dir):
    """A model directory holds every weight: its config's init_from_text_model is not read when it loads."""
    config = text_inpainting_config()
    config["model"]["params"]["init_from_text_model"] = str(text_model_dir / "model.safetensors")
    directory = write_model_dir(tmp_path / "dir", config)
    config_file = directory / "config.yaml"
    config_file.write_text(config_file.read_text().replace(str(text_model_dir), str(tmp_path / "gone")))
    model = load_model(directory)
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight,
                       load_state_dict(directory / "model.safetensors")["model.diffusion_model.input_blocks.0.0.weight"])
