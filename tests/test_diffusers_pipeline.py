"""The diffusers bridge beyond the U-Net (tests/test_diffusers_unet.py): the KL autoencoder, the BERT text
encoder, the DDIM scheduler config, and the whole LDMTextToImagePipeline both ways.

Weights are random (zero-initialised layers would hide mapping errors). The pipeline test compares images
sampled by diffusers' own LDMTextToImagePipeline code with ours on the same seeds: they must agree to
1e-4 in [0, 1] (float32 operations in a different order), not merely look alike.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ldm.diffusers_bridge import autoencoder, scheduler, text_encoder
from ldm.diffusers_bridge.pipeline import export_pipeline
from ldm.inference import load_model, text_to_image
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.spacing import make_ddim_timesteps
from ldm.modules.diffusionmodules.schedule import NoiseSchedule
from ldm.modules.encoders.modules import BERTEmbedder
from tests.helpers import load_script
from tests.unet_fixtures import randomize_

import diffusers  # noqa: E402  (the test extra installs it)

REPO = Path(__file__).resolve().parents[1]
SHAPES_VOCAB = REPO / "models/ldm/txt2img-shapes/shapes_vocab.txt"
DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def random_autoencoder(embed_dim: int = 4, **changes) -> AutoencoderKL:
    model = AutoencoderKL(ddconfig=dict(DDCONFIG, **changes), lossconfig=autoencoder.IDENTITY_LOSS, embed_dim=embed_dim)
    return randomize_(model).eval()


def assert_same_state(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


# --------------------------------------------------------------------------------------------- autoencoder


def test_autoencoder_same_outputs_and_exact_round_trip():
    ours = random_autoencoder()
    theirs = autoencoder.to_diffusers(ours, scaling_factor=0.5)
    assert theirs.config.scaling_factor == 0.5 and not theirs.training
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior, latent_dist = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(latent_dist.mean, posterior.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(latent_dist.logvar, posterior.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.decode(posterior.mean).sample, ours.decode(posterior.mean), rtol=0, atol=1e-5)
    back, scaling_factor = autoencoder.from_diffusers(theirs)
    assert scaling_factor == 0.5 and back.ddconfig == ours.ddconfig
    assert_same_state(back.state_dict(), ours.state_dict())


@pytest.mark.parametrize("changes, embed_dim, named", [
    ({"attn_resolutions": [8]}, 4, "attn_resolutions"),
    ({"ch_mult": [2, 2]}, 4, "ch_mult"),
    ({}, 3, "z_channels=4 with embed_dim=3"),
])
def test_autoencoder_without_diffusers_equivalent_names_the_param(changes, embed_dim, named):
    with pytest.raises(ValueError, match=named):
        autoencoder.diffusers_vae_config(dict(DDCONFIG, **changes), embed_dim, 1.0)


# -------------------------------------------------------------------------------------------- text encoder


@pytest.mark.parametrize("max_seq_len", [77, 16])
def test_text_encoder_same_embeddings_and_exact_round_trip(max_seq_len):
    ours = randomize_(BERTEmbedder(n_embed=32, n_layer=2, vocab_size=66, max_seq_len=max_seq_len, heads=2,
                                   dim_head=16, tokenizer_path=str(SHAPES_VOCAB))).eval()
    theirs = text_encoder.to_diffusers(ours)
    # The pipeline pads to 77 tokens: the position table has 77 rows whatever the trained length.
    assert theirs.config.max_position_embeddings == 77 and theirs.config.ldm_max_seq_len == max_seq_len
    ids = ours.tknz_fn(["a big red circle on the left", "two small blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids)[0], ours(ids), rtol=0, atol=1e-5)
    back = text_encoder.from_ldmbert_state_dict(theirs.state_dict(), theirs.config.to_dict())
    assert_same_state(back, ours.state_dict())


# ------------------------------------------------------------------------------------------------ scheduler


def schedule_model(beta_schedule: str, zero_terminal_snr: bool, parameterization: str) -> SimpleNamespace:
    """What ddim_scheduler_config reads of a LatentDiffusion."""
    start, end = (0.00085, 0.012) if beta_schedule != "sqrt" else (1e-4, 2e-2)
    schedule = NoiseSchedule.from_config(beta_schedule=beta_schedule, timesteps=1000, linear_start=start,
                                         linear_end=end, zero_terminal_snr=zero_terminal_snr)
    return SimpleNamespace(schedule=schedule, process=SimpleNamespace(discrete=True, name="discrete_vp"),
                           parameterization=parameterization, linear_start=start, linear_end=end)


@pytest.mark.parametrize("beta_schedule, zero_terminal_snr, parameterization", [
    ("linear", False, "eps"), ("sqrt_linear", False, "v"), ("cosine", False, "eps"), ("linear", True, "v"),
    ("sqrt", False, "x0"),
])
def test_scheduler_has_our_noise_levels_timesteps_and_target(beta_schedule, zero_terminal_snr, parameterization):
    model = schedule_model(beta_schedule, zero_terminal_snr, parameterization)
    config = scheduler.ddim_scheduler_config(model)
    ddim = diffusers.DDIMScheduler.from_config(config)
    torch.testing.assert_close(ddim.alphas_cumprod, model.schedule.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    ddim.set_timesteps(10)
    spacing = "trailing" if zero_terminal_snr else "uniform"
    assert ddim.timesteps.tolist() == make_ddim_timesteps(spacing, 10, 1000)[::-1].tolist()
    assert ("trained_betas" in config) == (beta_schedule == "sqrt")  # diffusers has no name for that one
    params = scheduler.schedule_params_from_scheduler(ddim.config)
    assert params["parameterization"] == parameterization
    if beta_schedule != "sqrt":
        assert (params["beta_schedule"], params["zero_terminal_snr"]) == (beta_schedule, zero_terminal_snr)


def test_scheduler_refuses_a_continuous_noise_process():
    model = schedule_model("linear", False, "eps")
    model.process = SimpleNamespace(discrete=False, name="edm")
    with pytest.raises(ValueError, match="discrete DDPM table.*edm"):
        scheduler.ddim_scheduler_config(model)


# ------------------------------------------------------------------------------------------------- pipeline


def test_exported_pipeline_reproduces_our_images_and_import_gives_back_our_weights(tiny_txt2img_model, tmp_path):
    script = load_script("convert_diffusers")
    script.main(["--to-diffusers", str(tiny_txt2img_model), "--outdir", str(tmp_path / "pipe")])
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "LDMTextToImagePipeline"
    assert {index[part][1] for part in ("vqvae", "bert", "unet", "scheduler")} == {
        "AutoencoderKL", "LDMBertModel", "UNet2DConditionModel", "DDIMScheduler"}

    model = load_model(tiny_txt2img_model)
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe", low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle", "two small blue squares at the top"], [3, 4]
    ours = text_to_image(model, prompts, scale=3.0, sampler="ddim", steps=4, seed=seeds, progress=False)
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert theirs.shape == ours.shape  # the default height gives the trained latent size (see pipeline.py)
    torch.testing.assert_close(theirs, ((ours + 1) / 2).clamp(0, 1), rtol=0, atol=1e-4)

    script.main(["--from-diffusers", str(tmp_path / "pipe"), "--outdir", str(tmp_path / "imported")])
    original, imported = load_file(tiny_txt2img_model / "model.safetensors"), load_file(tmp_path / "imported" /
                                                                                         "model.safetensors")
    # scale_factor is a config value of the imported model (scale_by_std is a training-time measurement).
    assert set(original) - set(imported) == {"scale_factor"} and set(imported) <= set(original)
    assert_same_state(imported, {k: original[k] for k in imported})
    again = text_to_image(load_model(tmp_path / "imported"), prompts, scale=3.0, sampler="ddim", steps=4, seed=seeds,
                          progress=False)
    assert torch.equal(again, ours)


def test_models_the_pipeline_cannot_hold_are_refused_by_name(tiny_class_model, tmp_path):
    with pytest.raises(ValueError, match="the text encoder is ClassEmbedder"):
        export_pipeline(load_model(tiny_class_model), tmp_path / "pipe")
    with pytest.raises(SystemExit, match="error: .*ClassEmbedder"):
        load_script("convert_diffusers").main(["--to-diffusers", str(tiny_class_model), "--outdir", str(tmp_path)])
