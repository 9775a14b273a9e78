"""Prior preservation (ldm/prior_preservation.py, ldm/prior_images.py, ldm/data/prior_mix.py): the base model's samples of its own prompts,
drawn once into the run directory, mixed one to one into the training batches with their own loss weight; and one
textual-inversion run with it through main.py (in-process), resumed and exported."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import load_checkpoint_file
from ldm.config import ConfigError
from ldm.data.prior_mix import PRIOR_KEY, PriorMixDataset
from ldm.inference import load_model
from ldm.prior_images import prepare_prior_preservation
from ldm.prior_preservation import PriorPreservation
from ldm.util import instantiate_from_config
from tests.test_finetune_configs import export, image_folder
from tests.tiny_models import txt2img_config

REPO = Path(__file__).resolve().parents[1]
TEXTUAL_INVERSION = REPO / "configs/latent-diffusion/txt2img_textual_inversion.yaml"
PROMPTS = ["a red circle", "two small blue squares"]


def folder_config(root: Path) -> dict:
    return {"target": "ldm.data.folder.ImageFolderDataset", "params": {"root": str(root), "size": 32, "flip_p": 0.0}}


@pytest.mark.parametrize("options, message", [
    ({"n_images": 4}, "needs prompts the base model draws"),
    ({"prompts": "a red circle"}, "prompts must be a list of prompts"),
    ({"prompts": PROMPTS, "n_images": 0}, "n_images must be an integer >= 1"),
    ({"prompts": PROMPTS, "weight": -1}, "weight must be a number >= 0"),
    ({"prompts": PROMPTS, "lambda": 1}, r"unknown key\(s\) \['lambda'\]"),
])
def test_settings_are_checked_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        PriorPreservation.from_config(options)


def test_the_mix_is_one_to_one_and_marks_the_prior_items(tmp_path):
    data = image_folder(tmp_path / "images")
    prior = image_folder(tmp_path / "prior") / "validation"  # 4 captioned images
    mix = PriorMixDataset(folder_config(data / "train"), str(prior), size=32)
    assert len(mix) == 16
    items = [mix[i] for i in range(len(mix))]
    assert [item[PRIOR_KEY] for item in items] == [0] * 8 + [1] * 8
    assert all(item["image"].shape == (32, 32, 3) and item["caption"] for item in items)
    assert all(8 <= item["index"] < 12 for item in items[8:])  # apart from the run's own images' keys
    batch = torch.utils.data.default_collate(items)
    config = txt2img_config()["model"]
    config["params"]["prior_preservation"] = {"prompts": PROMPTS, "weight": 0.25}
    model = instantiate_from_config(config)
    assert model.prior_example_weights(batch).tolist() == [1.0] * 8 + [0.25] * 8
    assert model.prior_example_weights({"image": batch["image"]}) is None


def test_example_weights_weight_each_examples_loss():
    torch.manual_seed(0)
    model = instantiate_from_config(txt2img_config()["model"])
    z, c = torch.randn(2, 4, 8, 8), model.get_learned_conditioning(PROMPTS)
    t, noise = torch.tensor([3, 9]), torch.randn(2, 4, 8, 8)
    each = [model.p_losses(z[i:i + 1], c[i:i + 1], t[i:i + 1], noise[i:i + 1])[0] for i in range(2)]
    weighted, _ = model.p_losses(z, c, t, noise, example_weights=torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(weighted, (each[0] + 0.5 * each[1]) / 2)


def test_a_bad_prior_folder_is_one_line(tmp_path):
    config = OmegaConf.create({"model": {"params": {"prior_preservation": {"folder": str(tmp_path / "nowhere")}}},
                               "data": {"params": {"train": folder_config(tmp_path)}}})
    with pytest.raises(ConfigError, match="folder.*image folder not found"):
        prepare_prior_preservation(config, None, tmp_path)
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(uncaptioned / "0.png")
    config.model.params.prior_preservation.folder = str(uncaptioned)
    with pytest.raises(ConfigError, match="have no captions: put each image's prompt beside it") as error:
        prepare_prior_preservation(config, None, tmp_path)
    assert "\n" not in str(error.value)


def run_main(*args: str) -> None:
    """main.py in this process, as a process of its own ends: its run's lock released (ldm/run_lock.py)."""
    from ldm import run_lock
    from ldm.cli.train import main

    try:
        assert main(list(args)) == 0
    finally:
        while run_lock._held:
            run_lock._held.pop().close()


def test_a_textual_inversion_run_with_prior_preservation_resumes_and_exports(tiny_txt2img_model, tmp_path,
                                                                            monkeypatch):
    monkeypatch.delenv("LDM_RUN_NOW", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the working directory first
    data = image_folder(tmp_path / "images")
    for caption in data.rglob("*.txt"):
        caption.write_text(caption.read_text().replace("circle", "zorb"))
    run_main("--base", str(TEXTUAL_INVERSION), "-t", "--no-test", "--max_steps", "2", "-l", str(tmp_path / "logs"),
             f"model.params.init_from={tiny_txt2img_model}", "model.params.new_words=[zorb=circle]",
             f"data.params.train.params.root={data / 'train'}",
             f"data.params.validation.params.root={data / 'validation'}", "data.params.batch_size=4",
             "lightning.callbacks.image_logger.params.batch_frequency=2", "--limit_val_batches", "1",
             "--val_check_interval", "2", "--enable_model_summary", "false",
             f"model.params.prior_preservation={{prompts: [{', '.join(PROMPTS)}], n_images: 4, steps: 2}}")
    (run,) = (tmp_path / "logs").iterdir()
    prior = sorted((run / "prior").iterdir())
    assert [p.name for p in prior] == [f"{i:05d}.{ext}" for i in range(4) for ext in ("png", "txt")]
    assert [p.read_text() for p in prior if p.suffix == ".txt"] == PROMPTS * 2
    saved = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    assert saved.data.params.train.target == "ldm.data.prior_mix.PriorMixDataset"
    assert (run / "vocab.txt").read_text().splitlines()[-1] == "zorb"
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert len(ckpt["optimizer_states"][0]["state"]) == 1  # the embedding table alone

    stamps = [p.stat().st_mtime_ns for p in prior]
    monkeypatch.delenv("LDM_RUN_NOW", raising=False)
    run_main("-r", str(run), "--max_steps", "3", "--enable_model_summary", "false")
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert [p.stat().st_mtime_ns for p in sorted((run / "prior").iterdir())] == stamps  # reused, not drawn again

    export(monkeypatch, str(run / "checkpoints" / "last.ckpt"), "--model-dir", str(tmp_path / "exported"))
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "| new words | `zorb` |" in card and "| `zorb` | `circle` |" in card
    assert (tmp_path / "exported" / "vocab.txt").read_text().splitlines()[-1] == "zorb"
    exported, base = load_model(tmp_path / "exported", device="cpu"), load_model(tiny_txt2img_model, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new word is no unknown word
        exported.get_learned_conditioning(["a zorb at the top"])
    unets = exported.model.state_dict(), base.model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(unets[0].values(), unets[1].values()))  # frozen
    grown, old = (m.cond_stage_model.transformer.token_emb.weight for m in (exported, base))
    assert torch.equal(grown[:-1], old)  # only zorb's row moved
