"""Fine-tuning a first stage's decoder and swapping first stages (issue 26's ceiling): configs/autoencoder/
decoder_finetune.yaml through main.py (the encoder, so the latent space, bit-identical; resumable), the mixed data it
trains on (ldm/data/mix.py), `--vae` / `load_model(vae=...)` / `model.params.vae` (ldm/vae.py) with the images'
metadata naming the VAE, and `ldm-export --vae` carrying it into a model directory."""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from ldm.checkpoint import load_state_dict, save_safetensors
from ldm.config import load_configs
from ldm.data.mix import FolderMixDataset, MixedDataset
from ldm.data.shapes import ShapesTrain
from ldm.data.shapes_folder import write_shapes_folder
from ldm.finetune import apply_init_from
from ldm.inference import load_model
from ldm.model_loading import build_model
from ldm.util import instantiate_from_config
from ldm.vae import VaeMismatch, swap_vae
from tests.helpers import load_script
from tests.test_main import only_run, run_main
from tests.tiny_models import txt2img_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/autoencoder/decoder_finetune.yaml"
SHIPPED = REPO / "models/first_stage_models/kl-f4-shapes"
STEPS = "4"  # DDIM steps dividing the tiny model's 16


def shipped_first_stage(weights: Path = SHIPPED / "model.safetensors") -> torch.nn.Module:
    return build_model(SHIPPED / "config.yaml", weights, device="cpu")


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory) -> Path:
    """A decoder fine-tune of the shipped first stage through main.py on a folder of hearts and white shapes: 2
    batches, then resumed with -r for 2 more."""
    root = tmp_path_factory.mktemp("decoder_finetune")
    for split, n in (("train", 8), ("validation", 4)):
        write_shapes_folder(root / "data" / split, n, split, extra_shapes=["heart"], extra_colours=["white"])
    common = ["-t", "--no-test", "data.params.batch_size=4", "lightning.trainer.val_check_interval=2",
              "lightning.callbacks.image_logger.params.batch_frequency=1"]
    run_main(["--base", str(CONFIG), "--max_steps", "4", *common,
              f"data.params.train.params.root={root / 'data' / 'train'}",
              f"data.params.validation.params.root={root / 'data' / 'validation'}"], root)
    run = only_run(root)
    run_main(["-r", str(run), "--max_steps", "8", *common], root)
    return run


def test_the_decoder_fine_tune_keeps_the_encoder_bit_identical_and_resumes(decoder_run):
    ckpt = torch.load(decoder_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8  # 4 batches, 2 of them after -r (an optimizer step each for AE and idle GAN)
    before, after = shipped_first_stage(), shipped_first_stage(decoder_run / "checkpoints" / "last.ckpt")
    images = torch.stack([torch.as_tensor(ShapesTrain(num_samples=4)[i]["image"]) for i in range(4)]).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.equal(before.encode(images).parameters, after.encode(images).parameters)
        z = before.encode(images).mode()
        assert not torch.equal(before.decode(z), after.decode(z))  # the decoder trained
    shipped = load_file(SHIPPED / "model.safetensors")
    trained = ckpt["state_dict"]
    assert all(torch.equal(shipped[k], trained[k]) for k in shipped if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(shipped[k], trained[k]) for k in shipped if k.startswith("decoder."))
    assert list((decoder_run / "images" / "train").glob("reconstructions*.png"))  # image logs of the run


def test_the_config_starts_from_the_shipped_first_stage_and_init_from_is_overridable(decoder_run):
    config = load_configs([CONFIG])
    apply_init_from(config)
    shipped = OmegaConf.load(SHIPPED / "config.yaml").model.params
    params = config.model.params
    assert params.ddconfig == shipped.ddconfig and params.embed_dim == shipped.embed_dim
    assert params.train_decoder_only and params.lossconfig.params.perceptual_weight == 0
    assert params.lossconfig.params.kl_weight == shipped.lossconfig.params.kl_weight  # the base's, merged
    model = instantiate_from_config(config.model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_file(SHIPPED / "model.safetensors").items())
    # A run as the start: its weights (what a second fine-tune on more images continues from).
    overridden = load_configs([CONFIG], overrides=[f"model.params.init_from={decoder_run}"])
    apply_init_from(overridden)
    model = instantiate_from_config(overridden.model)
    last = load_state_dict(decoder_run / "checkpoints" / "last.ckpt")
    assert torch.equal(model.decoder.conv_out.weight, last["decoder.conv_out.weight"])


def test_mixed_datasets_are_half_each_with_the_shared_keys(tmp_path):
    write_shapes_folder(tmp_path / "folder", 3, "train", extra_shapes=["heart"])
    shapes = {"target": "ldm.data.shapes.ShapesValidation", "params": {"size": 32, "num_samples": 5}}
    mix = FolderMixDataset(str(tmp_path / "folder"), shapes, size=32, keys=["image"], draw="in_order")
    assert len(mix) == 6 and all(set(mix[i]) == {"image"} and mix[i]["image"].shape == (32, 32, 3) for i in range(6))
    assert all(np.array_equal(mix[3 + i]["image"], mix.second[i]["image"]) for i in range(3))  # the same each time
    random = MixedDataset(mix.first, shapes)
    assert set(random[0]) == {"image", "caption", "class_label", "human_label", "index"}  # what both items have
    torch.manual_seed(0)
    assert all(random.draw(i)[1] in range(5) for i in range(3, 6)) and random.draw(0)[1] is None
    with pytest.raises(ValueError, match="keys \\['mask'\\] are not in the items of both"):
        MixedDataset(mix.first, shapes, keys=["mask"])
    with pytest.raises(ValueError, match="unknown draw"):
        MixedDataset(mix.first, shapes, draw="sometimes")


@pytest.fixture(scope="module")
def tiny_vae(tiny_txt2img_model, tmp_path_factory) -> Path:
    """The tiny model's first stage with another decoder, as a first stage's own .safetensors."""
    state = load_file(tiny_txt2img_model / "model.safetensors")
    vae = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 0.5
    return save_safetensors(vae, tmp_path_factory.mktemp("vae") / "vae.safetensors")


def test_load_model_swaps_the_first_stage_and_refuses_another_architecture(tiny_txt2img_model, tiny_vae, tmp_path):
    own = load_model(tiny_txt2img_model, device="cpu")
    swapped = load_model(tiny_txt2img_model, device="cpu", vae=tiny_vae)
    vae = load_file(tiny_vae)
    assert torch.equal(swapped.first_stage_model.decoder.conv_out.bias, vae["decoder.conv_out.bias"])
    assert torch.equal(swapped.model.diffusion_model.out[2].weight, own.model.diffusion_model.out[2].weight)
    # A training checkpoint: its EMA weights where it keeps them, its loss.* never.
    ema_bias = torch.full_like(vae["decoder.conv_out.bias"], 0.25)
    torch.save({"state_dict": {**vae, "loss.logvar": torch.zeros(()), "model_ema.decoderconv_outbias": ema_bias}},
               tmp_path / "last.ckpt")
    from_ckpt = load_model(tiny_txt2img_model, device="cpu", vae=tmp_path / "last.ckpt")
    assert torch.equal(from_ckpt.first_stage_model.decoder.conv_out.bias, ema_bias)
    with pytest.raises(VaeMismatch, match=r"^VAE .*kl-f4-shapes does not fit this model's first stage \(AutoencoderKL\): "
                                          r"decoder\.\S+ is \([\d, ]+\) in the file, \([\d, ]+\) in the model"):
        load_model(tiny_txt2img_model, device="cpu", vae=SHIPPED)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_model(tiny_txt2img_model, device="cpu", vae=tmp_path)


def test_a_vae_with_another_encoder_loads_with_a_warning(tiny_txt2img_model, tmp_path, caplog):
    model = load_model(tiny_txt2img_model, device="cpu")
    state = {k: v + 0.1 if k.startswith("encoder.") else v for k, v in model.first_stage_model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="ldm.vae"):
        swap_vae(model, save_safetensors(state, tmp_path / "other.safetensors"))
    assert "has another encoder than the model's first stage" in caplog.text


def test_txt2img_vae_decodes_with_it_and_the_images_name_it(tiny_txt2img_model, tiny_vae, tmp_path, capsys):
    txt2img = load_script("txt2img")
    common = ["--config", str(tiny_txt2img_model), "--steps", STEPS, "--n_samples", "1", "--prompt", "a red circle",
              "--skip_grid"]
    txt2img.main([*common, "--outdir", str(tmp_path / "own")])
    txt2img.main([*common, "--vae", str(tiny_vae), "--outdir", str(tmp_path / "vae")])
    own, swapped = (Image.open(tmp_path / d / "samples" / "00000.png") for d in ("own", "vae"))
    assert not np.array_equal(np.asarray(own), np.asarray(swapped))
    digest = hashlib.sha256(tiny_vae.read_bytes()).hexdigest()[:10]
    assert swapped.text["vae"] == str(tiny_vae) and swapped.text["vae_hash"] == digest and "vae" not in own.text
    assert f"Model: {tiny_txt2img_model}, VAE hash: {digest}, VAE: {tiny_vae}," in swapped.text["parameters"]
    with pytest.raises(SystemExit, match=r"^error: VAE \S+ does not fit this model's first stage"):
        txt2img.main([*common, "--vae", str(SHIPPED), "--outdir", str(tmp_path / "bad")])


def test_the_builtin_model_samples_through_a_fine_tuned_decoder_run(decoder_run):
    model = load_model("txt2img", device="cpu", vae=decoder_run)
    last = load_state_dict(decoder_run / "checkpoints" / "last.ckpt")
    assert torch.equal(model.first_stage_model.decoder.conv_out.weight, last["decoder.conv_out.weight"])


def test_a_run_config_vae_replaces_the_first_stage_after_the_other_weights(tiny_vae):
    config = txt2img_config()
    config["model"]["params"]["vae"] = str(tiny_vae)
    model = instantiate_from_config(config["model"])
    assert torch.equal(model.first_stage_model.decoder.conv_out.bias, load_file(tiny_vae)["decoder.conv_out.bias"])


def fake_run(model_dir: Path, root: Path) -> Path:
    """A training run as main.py writes it, of the model in `model_dir` (its config, its weights as the checkpoint)."""
    (root / "configs").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.load(model_dir / "config.yaml"), root / "configs" / "2026-01-01T00-00-00-project.yaml")
    torch.save({"state_dict": load_file(model_dir / "model.safetensors"), "global_step": 3},
               root / "checkpoints" / "last.ckpt")
    return root / "checkpoints" / "last.ckpt"


def export(monkeypatch, *args: str) -> None:
    from ldm.cli import export_weights

    monkeypatch.setattr(sys, "argv", ["export_weights.py", *args])
    export_weights.cli()


def test_export_carries_the_vae_into_the_model_directory(tiny_txt2img_model, tiny_vae, tmp_path, monkeypatch, capsys):
    ckpt = fake_run(tiny_txt2img_model, tmp_path / "run")
    export(monkeypatch, str(ckpt), "--model-dir", str(tmp_path / "with_vae"), "--vae", str(tiny_vae))
    exported = load_model(tmp_path / "with_vae", device="cpu")  # no --vae needed any more
    assert torch.equal(exported.first_stage_model.decoder.conv_out.bias, load_file(tiny_vae)["decoder.conv_out.bias"])
    card = (tmp_path / "with_vae" / "README.md").read_text()
    assert f"| first stage (VAE) | `{tiny_vae}` (VAE hash {hashlib.sha256(tiny_vae.read_bytes()).hexdigest()[:10]})" in card
    export(monkeypatch, str(ckpt), "--model-dir", str(tmp_path / "plain"))  # without --vae: the run's own
    plain = load_model(tmp_path / "plain", device="cpu")
    own = load_model(tiny_txt2img_model, device="cpu").first_stage_model.decoder.conv_out.bias
    assert torch.equal(plain.first_stage_model.decoder.conv_out.bias, own)
    assert "first stage (VAE)" not in (tmp_path / "plain" / "README.md").read_text()
    for args, message in ((["--share-first-stage"], "leave out --share-first-stage"),
                          (["--lora", "-o", str(tmp_path / "x.safetensors")], "a LoRA file holds the adapter alone")):
        with pytest.raises(SystemExit):
            export(monkeypatch, str(ckpt), *(["--model-dir", str(tmp_path / "no")] if args[0] != "--lora" else []),
                   "--vae", str(tiny_vae), *args)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: VAE .*no such file or folder"):
        export(monkeypatch, str(ckpt), "--model-dir", str(tmp_path / "missing"), "--vae", str(tmp_path / "nope"))
    assert not (tmp_path / "missing").exists()
