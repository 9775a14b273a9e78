"""The sampling API (ldm/inference.py), the inpainting model and the weights export, on tiny models."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.checkpoint import save_safetensors
from ldm.data.shapes import ShapesTrain, write_caption_vocabulary
from ldm.inference import (SAMPLERS, ModelNotFound, encode_images, generate, image_to_image, inpaint, latent_shape,
                           load_model, sample_latents, text_condition, text_to_image)
from ldm.models.diffusion.samplers import (EditedDenoiser, keep_known, run_sampler, sample_dpmpp_2m,
                                           sample_euler_ancestral, sample_heun, sampler_sigmas, start_state)
from ldm.models.diffusion.spacing import karras_sigmas
from ldm.util import instantiate_from_config
from tests.tiny_models import txt2img_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # divides the tiny models' 16 timesteps, as DDIM's uniform spacing needs


@pytest.fixture(scope="module")
def txt2img(tiny_txt2img_model):
    return load_model(tiny_txt2img_model)


@pytest.fixture(scope="module")
def images():
    data = ShapesTrain(size=32, num_samples=4, with_mask=True)
    items = [data[i] for i in range(4)]
    to_nchw = lambda key: torch.stack([torch.from_numpy(item[key]).permute(2, 0, 1) for item in items])
    return to_nchw("image"), to_nchw("mask")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_is_seeded_and_guidance_scale_one_is_the_conditional_model(txt2img, sampler):
    cond, uncond = text_condition(txt2img, ["a red circle", "a blue star"], scale=3.0)
    run = lambda **kw: sample_latents(txt2img, 2, cond, sampler=sampler, steps=STEPS, seed=3, progress=False, **kw)
    plain = run()
    assert plain.shape == (2, 4, 8, 8) and torch.isfinite(plain).all()
    assert torch.equal(run(), plain)
    assert torch.equal(run(uncond=uncond, scale=1.0), plain)
    assert not torch.allclose(run(uncond=uncond, scale=3.0), plain)


@pytest.mark.parametrize("sample_fn", [sample_euler_ancestral, sample_heun, sample_dpmpp_2m])
def test_known_latents_are_kept_by_the_k_samplers_themselves(txt2img, sample_fn):
    """No paste at the end: the known region reaches the known latents through the sampler's own steps."""
    torch.manual_seed(0)
    cond = txt2img.get_learned_conditioning(["a red circle"] * 2)
    known = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0
    discrete = txt2img.sigma_denoiser(cond)
    sigmas = karras_sigmas(6, discrete.sigma_min, discrete.sigma_max)
    with torch.no_grad():
        z = sample_fn(keep_known(discrete, known, mask), torch.randn(2, 4, 8, 8) * sigmas[0], sigmas, disable=True)
    assert torch.allclose(z[..., :4], known[..., :4], atol=1e-5)
    assert (z[..., 4:] - known[..., 4:]).abs().mean() > 0.1


def test_ancestral_sampler_keeps_the_known_latents_themselves(txt2img):
    """No paste at the end: DDPM's last step lands on x̂_0, which is the given x0 on the known region."""
    torch.manual_seed(0)
    cond = txt2img.get_learned_conditioning(["a red circle"] * 2)
    known = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0
    info, denoiser = SAMPLERS["ddpm"], txt2img.sigma_denoiser(cond)
    sigmas = sampler_sigmas(info, txt2img.process, 1)
    raw = []
    with torch.no_grad():
        denoiser_spy = EditedDenoiser(denoiser, lambda x0: raw.append(x0) or x0)
        z = run_sampler(info, denoiser_spy, start_state(info, denoiser, torch.randn(2, 4, 8, 8), sigmas[0]), sigmas,
                        known=known, known_mask=mask, paste_known=False, disable=True)
    assert torch.equal(z[:, :, :4], known[:, :, :4])
    assert not torch.allclose(raw[-1][:, :, :4], known[:, :, :4])  # the model alone would not give them


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_with_a_text_model_keeps_the_known_pixels(txt2img, images, sampler):
    image, mask = images
    out = inpaint(txt2img, image, mask, ["a red circle"] * 4, scale=2.0, sampler=sampler, steps=STEPS, seed=0,
                  progress=False)
    assert out.shape == image.shape
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    assert (out - image).abs().mul(mask).sum() > 0  # the hole was generated, not copied


def test_inpainting_model_is_conditioned_on_masked_image_and_mask(tiny_inpainting_model, images):
    model = load_model(tiny_inpainting_model)
    image, mask = images
    cond = model.get_learned_conditioning(torch.cat([image * (1 - mask), mask], dim=1))
    assert cond.shape == (4, 5, 8, 8)
    # Nearest-neighbour resize of the mask to the latent grid, as the reference's inpaint.py.
    assert torch.equal(cond[:, 4:], torch.nn.functional.interpolate(mask, size=(8, 8)))
    assert torch.allclose(cond[:, :4], encode_images(model, image * (1 - mask)))
    out = inpaint(model, image, mask, steps=STEPS, seed=0, progress=False)
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    other = image.flip(0)
    assert not torch.allclose(out, inpaint(model, other, mask, steps=STEPS, seed=0, progress=False))
    with pytest.raises(ValueError, match="each image needs a mask of its size"):
        inpaint(model, image, mask[:, :, :16], steps=STEPS, progress=False)


def test_inpainting_model_trains_from_a_masked_batch(images):
    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs/latent-diffusion/inpainting.yaml"), resolve=True)
    params = config["model"]["params"]
    params["first_stage_config"]["params"].pop("ckpt_path")
    params["unet_config"]["params"]["channel_mult"] = [1, 2]
    model = instantiate_from_config(config["model"])
    image, mask = images
    batch = {"image": image.permute(0, 2, 3, 1), "mask": mask.permute(0, 2, 3, 1),
             "masked_image": (image * (1 - mask)).permute(0, 2, 3, 1),
             "index": torch.arange(image.shape[0])}  # the key cache_latents (on in the config) needs
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.model.diffusion_model.out[-1].weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="with_mask: true"):
        model.shared_step({"image": batch["image"], "index": batch["index"]})


def test_text_to_image_larger_than_training_and_bad_sizes(txt2img):
    out = text_to_image(txt2img, ["a red circle"], steps=STEPS, height=64, width=48, seed=0, progress=False)
    assert out.shape == (1, 3, 64, 48) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="multiple of the first stage's downsampling factor 4"):
        latent_shape(txt2img, 30, 32)
    with pytest.raises(ValueError, match="unknown sampler 'ddpn'"):
        text_to_image(txt2img, ["a"], sampler="ddpn", progress=False)
    with pytest.raises(TypeError, match="prompts must be strings"):
        text_to_image(txt2img, [3], progress=False)


def test_plain_string_prompts_and_several_images_per_prompt(txt2img):
    kwargs = dict(steps=STEPS, seed=0, progress=False)
    one = text_to_image(txt2img, "a red circle", **kwargs)
    assert torch.equal(one, text_to_image(txt2img, ["a red circle"], **kwargs))
    # Each prompt's images side by side, as diffusers orders them; the same seed gives the same batch.
    batch = text_to_image(txt2img, ["a red circle", "a blue square"], num_images_per_prompt=3, **kwargs)
    same_prompts = ["a red circle"] * 3 + ["a blue square"] * 3
    assert torch.equal(batch, text_to_image(txt2img, same_prompts, **kwargs))
    negatives = text_to_image(txt2img, ["a red circle", "a blue square"], num_images_per_prompt=2,
                              negative_prompt=["red", "blue"], **kwargs)
    assert torch.equal(negatives, text_to_image(txt2img, ["a red circle"] * 2 + ["a blue square"] * 2,
                                                negative_prompt=["red", "red", "blue", "blue"], **kwargs))
    with pytest.raises(ValueError, match="num_images_per_prompt must be at least 1"):
        text_to_image(txt2img, "a red circle", num_images_per_prompt=0, **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m", "euler_a"])
def test_image_to_image_strength(txt2img, images, sampler):
    image, _ = images
    prompts = ["a red circle"] * 4
    light = image_to_image(txt2img, image, prompts, strength=0.25, steps=8, sampler=sampler, seed=0, progress=False)
    full = image_to_image(txt2img, image, prompts, strength=1.0, steps=8, sampler=sampler, seed=0, progress=False)
    assert light.shape == image.shape
    # Less strength keeps more of the input (measured against its reconstruction through the first stage).
    recon = txt2img.decode_first_stage(encode_images(txt2img, image)).clamp(-1, 1)
    assert (light - recon).abs().mean() < (full - recon).abs().mean()
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        image_to_image(txt2img, image, prompts, strength=0.0, progress=False)
    # Every sampler can start midway, DDPM's ancestral one on the tail of its T levels too.
    assert image_to_image(txt2img, image, prompts, sampler="ddpm", strength=0.25, seed=0,
                          progress=False).shape == image.shape


def test_class_conditional_generation_with_guidance(tiny_class_model):
    model = load_model(tiny_class_model)
    out = generate(model, 5, class_labels=[0, 1, 2, 3, 4], scale=3.0, steps=STEPS, batch_size=2, seed=0,
                   progress=False)
    assert out.shape == (5, 3, 32, 32)
    with pytest.raises(ValueError, match="give class_labels"):
        generate(model, 2, progress=False)


def test_bf16_autocast_is_close_to_fp32_and_fp16_needs_a_gpu(tiny_txt2img_model):
    fp32 = text_to_image(load_model(tiny_txt2img_model), ["a red circle"], steps=STEPS, seed=0, progress=False)
    bf16 = text_to_image(load_model(tiny_txt2img_model, precision="bf16"), ["a red circle"], steps=STEPS, seed=0,
                         progress=False)
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().mean() < 0.05
    with pytest.raises(ValueError, match="fp16 autocast needs a GPU"):
        load_model(tiny_txt2img_model, precision="fp16", device="cpu")


def test_missing_models_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setattr("ldm.model_files.BUILTIN_MODELS", {"txt2img": tmp_path / "absent"})
    with pytest.raises(ModelNotFound, match=r"bash scripts/demo.sh(.|\n)*main.py --base configs/latent-diffusion/txt2img.yaml"):
        load_model("txt2img")
    with pytest.raises(ModelNotFound, match="no model config"):
        load_model(tmp_path / "nothing")


def _fake_run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A run directory as main.py writes it, whose first stage lives in its own file and EMA differs."""
    config = txt2img_config()
    torch.manual_seed(0)
    model = instantiate_from_config(config["model"])
    first_stage = save_safetensors(model.first_stage_model.state_dict(), tmp_path / "first_stage.safetensors")
    config["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = str(first_stage)
    config["model"]["params"]["cond_stage_config"]["params"]["tokenizer_path"] = "ldm/data/shapes_vocab.txt"
    with torch.no_grad():
        for name, buffer in model.model_ema.named_buffers():
            if name not in ("decay", "num_updates"):
                buffer.add_(0.01 * torch.randn_like(buffer))
    run = tmp_path / "logs" / "run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create(config), run / "configs" / "t-project.yaml")
    torch.save({"state_dict": model.state_dict(), "global_step": 7}, run / "checkpoints" / "last.ckpt")
    return run, model


def test_export_model_dir_is_self_contained_and_holds_the_ema_weights(tmp_path):
    run, model = _fake_run(tmp_path)
    # A run that started from other weights (main.py ... model.params.ckpt_path=... ignore_keys=[...]): the export
    # neither needs that file nor keeps the settings.
    project = OmegaConf.load(run / "configs" / "t-project.yaml")
    project.model.params.ckpt_path = str(tmp_path / "start-gone.safetensors")
    project.model.params.ignore_keys = ["first_stage_model."]
    OmegaConf.save(project, run / "configs" / "t-project.yaml")
    shared = tmp_path / "shared"
    subprocess.run([sys.executable, "scripts/export_weights.py", str(run / "checkpoints" / "last.ckpt"),
                    "--model-dir", str(shared), "--share-first-stage"], cwd=REPO, check=True, capture_output=True)
    assert not any(k.startswith(("first_stage_model.", "model_ema.")) for k in load_file(shared / "model.safetensors"))
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "scripts/export_weights.py", str(run / "checkpoints" / "last.ckpt"),
                    "--model-dir", str(out), "--dtype", "fp16"], cwd=REPO, check=True, capture_output=True)
    state = load_file(out / "model.safetensors")
    assert any(k.startswith("first_stage_model.") for k in state) and not any(k.startswith("model_ema.") for k in state)
    assert (out / "shapes_vocab.txt").is_file()  # the caption vocabulary travels with the model
    assert not {"ckpt_path", "ignore_keys"} & set(OmegaConf.load(out / "config.yaml").model.params)
    assert OmegaConf.load(out / "config.yaml").model.params.cond_stage_config.params.tokenizer_path == "shapes_vocab.txt"
    card = (out / "README.md").read_text()
    assert "7 optimizer steps" in card and "ldm-txt2img --config" in card
    assert card.startswith("---\nlicense: mit\nlibrary_name: ldm\npipeline_tag: text-to-image\n") and "## Limitations" in card
    # Copied anywhere, without the first stage's own file, it loads and samples the same.
    (tmp_path / "first_stage.safetensors").rename(tmp_path / "moved.safetensors")
    shutil.copytree(out, tmp_path / "elsewhere" / "copy")
    assert torch.equal(text_to_image(load_model(out), ["a red circle"], steps=STEPS, seed=0, progress=False),
                       text_to_image(load_model(tmp_path / "elsewhere" / "copy"), ["a red circle"], steps=STEPS,
                                     seed=0, progress=False))
    (tmp_path / "moved.safetensors").rename(tmp_path / "first_stage.safetensors")
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert state["alphas_cumprod"].dtype == torch.float32  # buffers keep their precision
    # The export, the training checkpoint (EMA used) and the EMA weights all sample the same.
    model.model_ema.copy_to(model.model)
    model.eval()
    from_ckpt = load_model(run / "configs" / "t-project.yaml", run / "checkpoints" / "last.ckpt")
    exported = load_model(out)
    for name, param in model.model.named_parameters():
        assert torch.equal(dict(from_ckpt.model.named_parameters())[name], param)
        assert torch.allclose(dict(exported.model.named_parameters())[name], param, atol=1e-3, rtol=1e-3)
    a = text_to_image(from_ckpt, ["a red circle"], steps=STEPS, seed=0, progress=False)
    b = text_to_image(exported, ["a red circle"], steps=STEPS, seed=0, progress=False)
    assert (a - b).abs().max() < 0.02

    # A broken checkpoint is a one-line error, and the model directory already there is left as it was.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (run / "checkpoints" / "broken.ckpt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "scripts/export_weights.py", str(run / "checkpoints" / "broken.ckpt"),
                           "--model-dir", str(out), "--overwrite"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read") and "broken.ckpt" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shipped_vocabulary_is_what_the_code_writes(tmp_path):
    write_caption_vocabulary(str(tmp_path / "vocab.txt"))
    assert (tmp_path / "vocab.txt").read_text() == (REPO / "ldm" / "data" / "shapes_vocab.txt").read_text()


def test_negative_prompt_takes_the_place_of_the_empty_prompt(txt2img, images):
    run = lambda **kw: text_to_image(txt2img, ["a red circle", "a blue star"], steps=STEPS, seed=0,  # noqa: E731
                                     progress=False, **kw)
    plain = run(scale=3.0)
    assert torch.equal(run(scale=3.0, negative_prompt=""), plain)
    assert torch.equal(run(scale=3.0, negative_prompt=["", ""]), plain)
    away = run(scale=3.0, negative_prompt="a green square")
    assert not torch.allclose(away, plain)
    assert torch.equal(run(scale=3.0, negative_prompt=["a green square"] * 2), away)
    # Without guidance there is no second pass for it to stand in.
    assert torch.equal(run(scale=1.0, negative_prompt="a green square"), run(scale=1.0))
    with pytest.raises(ValueError, match="2 negative prompts for 3 images"):
        text_to_image(txt2img, ["a", "b", "c"], negative_prompt=["x", "y"], progress=False)
    image, mask = images
    for edit in (lambda **kw: image_to_image(txt2img, image, ["a red circle"] * 4, steps=STEPS, seed=0,
                                             progress=False, **kw),
                 lambda **kw: inpaint(txt2img, image, mask, ["a red circle"] * 4, scale=3.0, steps=STEPS, seed=0,
                                      progress=False, **kw)):
        assert not torch.allclose(edit(negative_prompt="a green square"), edit())


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a", "dpmpp_2m_sde"])
def test_per_image_seeds_give_the_same_image_whatever_the_batch(txt2img, sampler):
    """One seed (or generator) per image: image i comes from its own noise, alone or beside others, also for
    samplers that add noise at every step."""
    kwargs = dict(steps=STEPS, sampler=sampler, eta=1.0 if sampler == "ddim" else 0.0, progress=False)
    batch = text_to_image(txt2img, ["a red circle", "a blue square", "a green star"], seed=[7, 8, 9], **kwargs)
    alone = text_to_image(txt2img, ["a blue square"], seed=[8], **kwargs)
    assert torch.allclose(batch[1:2], alone, atol=1e-4)
    other_batch = text_to_image(txt2img, ["a blue square", "a yellow cross"], seed=[8, 3], **kwargs)
    assert torch.allclose(other_batch[:1], alone, atol=1e-4)
    generators = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    assert torch.equal(text_to_image(txt2img, ["a red circle", "a blue square", "a green star"],
                                     generator=generators, **kwargs), batch)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        text_to_image(txt2img, ["a", "b", "c"], seed=[1, 2], **kwargs)


def test_load_model_names_a_first_stage_directory_as_such():
    """load_model is for diffusion models; given the shipped first stage's directory it says what to use instead."""
    with pytest.raises(ValueError, match=r"is a first stage \(ldm.models.autoencoder.AutoencoderKL\), not a diffusion model.*ldm-reconstruct"):
        load_model("models/first_stage_models/kl-f4-shapes")
