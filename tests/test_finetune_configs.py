"""Fine-tuning a trained model (ldm/finetune.py, configs/latent-diffusion/txt2img_lora.yaml and
txt2img_finetune.yaml): `model.params.init_from` brings the base model's architecture and weights, a LoRA run
checkpoints its adapter alone, resumes, and exports it alone or merged (ldm-export --lora / --merge-lora)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from ldm.checkpoint import CheckpointError, load_checkpoint_file
from ldm.config import ConfigError, load_configs
from ldm.finetune import apply_init_from
from ldm.inference import load_model
from ldm.lora import trained_adapter
from ldm.model_files import ModelNotFound
from ldm.util import instantiate_from_config
from tests.test_lora import denoiser_output
from tests.test_main import only_run, run_main
from tests.tiny_models import txt2img_config

REPO = Path(__file__).resolve().parents[1]
LORA = REPO / "configs/latent-diffusion/txt2img_lora.yaml"
FULL = REPO / "configs/latent-diffusion/txt2img_finetune.yaml"


def test_the_lora_config_is_the_builtin_model_with_its_own_data_and_settings(tiny_txt2img_model):
    config = load_configs([LORA])
    apply_init_from(config)
    shipped = OmegaConf.load(REPO / "models/ldm/txt2img-shapes/config.yaml").model.params
    params = config.model.params
    assert params.unet_config == shipped.unet_config and params.cond_stage_config.target == shipped.cond_stage_config.target
    assert Path(params.cond_stage_config.params.tokenizer_path).is_file()  # the base's vocabulary, found beside it
    assert params.lora_config.rank == 8 and params.use_ema is False and params.init_from == "txt2img"
    assert config.data.params.train.target == "ldm.data.folder.ImageFolderDataset"
    assert "quality_probe" not in config.lightning.callbacks  # the base's data and lightning sections stay out
    overridden = load_configs([LORA], overrides=[f"model.params.init_from={tiny_txt2img_model}"])
    apply_init_from(overridden)
    assert overridden.model.params.unet_config.params.model_channels == 32  # the tiny model's


def test_full_fine_tuning_starts_from_the_trained_weights_with_the_ema_restarted(tiny_txt2img_model):
    config = load_configs([FULL], overrides=[f"model.params.init_from={tiny_txt2img_model}"])
    apply_init_from(config)
    model = instantiate_from_config(config.model).eval()
    assert all(p.requires_grad for p in model.model.parameters()) and model.lora_settings is None
    assert torch.equal(denoiser_output(model), denoiser_output(load_model(tiny_txt2img_model, device="cpu")))
    for name, param in model.model.named_parameters():
        assert torch.equal(model.model_ema._buffers[name.replace(".", "")], param)
    assert model.restarted_from_ckpt  # the base's scale_factor is not measured again


def test_a_run_checkpoint_as_base_gives_its_averaged_weights(tmp_path):
    torch.manual_seed(0)
    base = instantiate_from_config(txt2img_config()["model"])
    with torch.no_grad():
        for shadow in base.model_ema.buffers():
            if shadow.is_floating_point() and shadow.ndim:
                shadow.normal_()
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create(txt2img_config()), run / "configs" / "2026-01-01T00-00-00-project.yaml")
    torch.save({"state_dict": base.state_dict(), "global_step": 5}, run / "checkpoints" / "last.ckpt")
    for init_from in (run, run / "checkpoints" / "last.ckpt"):
        config = OmegaConf.create({"model": {"params": {"init_from": str(init_from)}}})
        apply_init_from(config)
        model = instantiate_from_config(config.model)
        for name, param in model.model.named_parameters():
            assert torch.equal(param, base.model_ema._buffers[name.replace(".", "")]), name


def test_starting_points_that_cannot_work_are_named(tiny_txt2img_model, tmp_path):
    both = OmegaConf.create({"model": {"params": {"init_from": "txt2img", "ckpt_path": "x.safetensors"}}})
    with pytest.raises(ConfigError, match="ckpt_path.*init_from both name starting weights"):
        apply_init_from(both)
    with pytest.raises(ModelNotFound):
        apply_init_from(OmegaConf.create({"model": {"params": {"init_from": str(tmp_path / "no_such_model")}}}))


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 4)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
            (root / split / f"{i}.txt").write_text("a red circle" if i % 2 else "two small blue squares")
    return root


def export(monkeypatch, *args: str) -> None:
    from ldm.cli import export_weights

    monkeypatch.setattr(sys, "argv", ["export_weights.py", *args])
    export_weights.cli()


def test_a_lora_run_checkpoints_the_adapter_alone_resumes_and_exports(tiny_txt2img_model, tmp_path, monkeypatch):
    data = image_folder(tmp_path / "images")
    run_main(["--base", str(LORA), "-t", "--no-test", "--max_steps", "2", f"model.params.init_from={tiny_txt2img_model}",
              f"data.params.train.params.root={data / 'train'}", f"data.params.validation.params.root={data / 'validation'}",
              "data.params.batch_size=4", "lightning.callbacks.image_logger.params.batch_frequency=2",
              "lightning.callbacks.image_logger.params.max_images=2", "--limit_val_batches", "1",
              "--val_check_interval", "2", "--enable_model_summary", "false"], tmp_path)
    logdir = only_run(tmp_path)
    ckpt = logdir / "checkpoints" / "last.ckpt"
    assert list((logdir / "images" / "train").glob("samples_*.png"))

    # The checkpoint: the adapter and its optimizer state only.
    saved = load_checkpoint_file(ckpt)
    assert saved["state_dict"] and all(".lora_A.default." in k or ".lora_B.default." in k for k in saved["state_dict"])
    assert len(saved["optimizer_states"][0]["state"]) == len(saved["state_dict"])
    base = load_model(tiny_txt2img_model, device="cpu")
    unet_bytes = sum(p.numel() * 4 for p in base.model.diffusion_model.parameters())
    assert ckpt.stat().st_size < 0.25 * unet_bytes

    # Resumed as Lightning does it: the run's config (base weights from init_from), then the checkpoint's adapter.
    config = load_configs(sorted((logdir / "configs").glob("*-project.yaml")))
    apply_init_from(config)
    model = instantiate_from_config(config.model).eval()
    model.on_load_checkpoint(saved)
    model.load_state_dict(saved["state_dict"], strict=model.strict_loading)
    adapter = trained_adapter(model)
    assert all(torch.equal(w.down, saved["state_dict"][f"{path}.lora_A.default.weight"]) for path, w in adapter.items())
    with pytest.raises(CheckpointError, match="lacks .* of this LoRA's weights"):
        model.on_load_checkpoint({"state_dict": dict(list(saved["state_dict"].items())[2:])})

    # Exports: the adapter alone (as the run's own last.safetensors), or merged into the base weights.
    export(monkeypatch, str(ckpt), "--lora", "-o", str(tmp_path / "lora.safetensors"))
    export(monkeypatch, str(ckpt), "--merge-lora", "--model-dir", str(tmp_path / "merged"))
    lora_file = tmp_path / "lora.safetensors"
    own = load_file(logdir / "checkpoints" / "last.safetensors")
    assert own.keys() == load_file(lora_file).keys()
    unmerged = denoiser_output(model)
    torch.testing.assert_close(denoiser_output(load_model(tmp_path / "merged", device="cpu")), unmerged, rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(denoiser_output(load_model(tiny_txt2img_model, device="cpu", lora=[lora_file])),
                               unmerged, rtol=0, atol=1e-5)
    assert "lora_config" not in OmegaConf.load(tmp_path / "merged" / "config.yaml").model.params
    assert f"| fine-tuned from | `{tiny_txt2img_model}` (a LoRA, merged into its weights) |" in (
        tmp_path / "merged" / "README.md").read_text()
    with pytest.raises(SystemExit, match="holds a LoRA adapter alone"):
        export(monkeypatch, str(ckpt), "-o", str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="LoRA fine-tuning run's config"):
        load_model(sorted((logdir / "configs").glob("*-project.yaml"))[0], ckpt, device="cpu")
