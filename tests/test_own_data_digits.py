"""The small class-folder example: scripts/prepare_digits.py, the folder32 configs, the digit judge and
bench/own_data_digits.py --quick end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.config import load_configs
from ldm.evaluation.digit_judge import DigitJudge, load_folder, per_class_accuracy, train_digit_judge
from ldm.util import instantiate_from_config
from tests.helpers import load_script as _script

REPO = Path(__file__).resolve().parents[1]
FS_FOLDER = REPO / "configs/autoencoder/autoencoder_kl_f4_folder32.yaml"
LDM_FOLDER = REPO / "configs/latent-diffusion/class2img_folder32.yaml"
FS_BUILTIN = REPO / "configs/autoencoder/autoencoder_kl_shapes_f4.yaml"
LDM_BUILTIN = REPO / "configs/latent-diffusion/class2img.yaml"



@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """All 1,797 digits at 32x32 (about a second)."""
    out = tmp_path_factory.mktemp("digits")
    _script("prepare_digits").prepare(out, size=32)
    return out


# ------------------------------------------------------------------------------------------ prepare_digits


def test_prepare_digits_writes_a_stratified_class_tree(tmp_path):
    prepare = _script("prepare_digits")
    prepare.main(["--outdir", str(tmp_path), "--size", "32", "--limit", "10"])
    for split, per_class in (("train", 8), ("validation", 2)):  # every 5th of the 10 per class to validation
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == [str(d) for d in range(10)]
        for digit in range(10):
            files = sorted((tmp_path / split / str(digit)).glob("*.png"))
            assert len(files) == per_class
    train = {p.name for p in (tmp_path / "train").rglob("*.png")}
    validation = {p.name for p in (tmp_path / "validation").rglob("*.png")}
    assert not train & validation  # each image in one split only
    image = Image.open(next((tmp_path / "train" / "0").iterdir()))
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all()  # grey stored as RGB
    assert pixels[0, 0, 0] < 30 and pixels.max() > 200  # white digit on a black background
    assert (tmp_path / ".gitignore").read_text() == "*\n"  # generated data stays out of git
    assert json.loads((tmp_path / "prepared.json").read_text()) == {"size": 32, "limit": 10, "train": 80,
                                                                      "validation": 20}
    # Deterministic, and a rerun with a smaller limit leaves no stale files behind.
    prepare.main(["--outdir", str(tmp_path), "--limit", "5"])
    assert len(list((tmp_path / "train").rglob("*.png"))) == 40
    assert len(list((tmp_path / "validation").rglob("*.png"))) == 10


def test_prepare_digits_names_the_fix_without_scikit_learn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"pip install scikit-learn.*pip install -e \.\[digits\]"):
        _script("prepare_digits").prepare(tmp_path)


def test_prepare_digits_default_split_sizes(digits):
    assert json.loads((digits / "prepared.json").read_text()) == {"size": 32, "limit": None, "train": 1442,
                                                                    "validation": 355}


# ------------------------------------------------------------------------------------------ judge


def test_judge_reads_real_validation_digits(digits):
    judge = train_digit_judge(digits / "train")
    assert judge.classes == [str(d) for d in range(10)]
    images, labels, _ = load_folder(digits / "validation")
    scores = per_class_accuracy(judge, images, labels)
    assert scores["n"] == 355 and set(scores["per_class"]) == set(judge.classes)
    assert scores["mean"] >= 0.90 and min(scores["per_class"].values()) >= 0.8


class _Fixed:
    """A stand-in classifier that answers a fixed list of predictions."""

    def __init__(self, predictions: list[int]) -> None:
        self.predictions = np.array(predictions)

    def predict(self, features: np.ndarray) -> np.ndarray:
        assert features.shape == (len(self.predictions), 64)
        return self.predictions


def test_per_class_accuracy_is_the_unweighted_mean_over_classes():
    # class 0: 3 images, 2 read right; class 1: 1 image, read right; class 2: none (absent from the means)
    judge = DigitJudge(_Fixed([0, 1, 0, 1]), ["zero", "one", "two"])
    scores = per_class_accuracy(judge, torch.zeros(4, 3, 32, 32), torch.tensor([0, 0, 0, 1]))
    assert scores["per_class"] == {"zero": pytest.approx(2 / 3), "one": 1.0}
    assert scores["mean"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert scores["overall"] == pytest.approx(3 / 4) and scores["n"] == 4
    with pytest.raises(ValueError, match="one class index per image"):
        per_class_accuracy(judge, torch.zeros(4, 3, 32, 32), [0, 1])
    with pytest.raises(ValueError, match="class indices 0..2"):
        per_class_accuracy(judge, torch.zeros(4, 3, 32, 32), [0, 1, 2, 3])


# ------------------------------------------------------------------------------------------ configs


def _plain(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def test_folder32_configs_carry_the_builtin_recipe():
    """Only the data block (and, for diffusion, the first stage's file and the class count) differ from the
    built-in recipe; the trainer adds validation across epochs, which a small folder needs."""
    for folder, builtin in ((FS_FOLDER, FS_BUILTIN), (LDM_FOLDER, LDM_BUILTIN)):
        mine, recipe = _plain(folder), _plain(builtin)
        if folder == LDM_FOLDER:
            params = mine["model"]["params"]
            assert params["first_stage_config"]["params"].pop("ckpt_path") == \
                "models/first_stage_models/my-kl-f4-32/model.safetensors"
            recipe["model"]["params"]["first_stage_config"]["params"].pop("ckpt_path")
            assert params["cond_stage_config"]["params"]["n_classes"] == 10
            params["cond_stage_config"]["params"]["n_classes"] = 36
            assert params["cache_latents"] is True
        assert mine["model"] == recipe["model"]
        trainer = mine["lightning"]["trainer"]
        assert trainer.pop("check_val_every_n_epoch", "unset") is None  # val_check_interval > batches per epoch
        recipe["lightning"]["trainer"].pop("check_val_every_n_epoch", None)
        assert mine["lightning"] == recipe["lightning"]
        data = mine["data"]["params"]
        assert data["wrap"] is False  # WrappedDataset would hide crop/flip from cache_latents' check
        for split, root in (("train", "data/images/train"), ("validation", "data/images/validation")):
            dataset = data[split]
            assert dataset["target"] == "ldm.data.folder.ImageFolderDataset"
            assert dataset["params"]["root"] == root
            params = dataset["params"]
            assert (params["size"], params["crop"], params["flip_p"]) == (32, "center", 0.0)
            assert dataset["params"].get("class_from_subfolders", False) is (folder == LDM_FOLDER)


def test_class2img_folder32_builds_on_an_exported_first_stage(digits, tmp_path):
    """With the first stage's ckpt_path at a real file the model builds (at nothing, building fails), and the
    data module reads the digits with class labels and the item index cache_latents keys on."""
    from ldm.checkpoint import save_safetensors

    first_stage = OmegaConf.load(LDM_FOLDER).model.params.first_stage_config
    weights = instantiate_from_config({**OmegaConf.to_container(first_stage), "params": {
        **OmegaConf.to_container(first_stage.params), "ckpt_path": None}}).state_dict()
    save_safetensors(weights, tmp_path / "model.safetensors")
    overrides = [f"data.params.train.params.root={digits / 'train'}",
                 f"data.params.validation.params.root={digits / 'validation'}"]
    missing = load_configs([LDM_FOLDER], overrides=[*overrides, "model.params.first_stage_config.params.ckpt_path="
                                                    f"{tmp_path / 'nothing.safetensors'}"])
    with pytest.raises(FileNotFoundError, match="first-stage checkpoint missing"):
        instantiate_from_config(missing.model)
    cfg = load_configs([LDM_FOLDER], overrides=[*overrides, "model.params.first_stage_config.params.ckpt_path="
                                                f"{tmp_path / 'model.safetensors'}"])
    model = instantiate_from_config(cfg.model)
    assert model.cond_stage_model.n_classes == 10 and model.latent_cache is not None
    data = instantiate_from_config(cfg.data)
    data.setup("fit")
    assert data.datasets["train"].classes == [str(d) for d in range(10)]
    assert not data.datasets["train"].random_augmentation
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (32, 32, 32, 3) and "index" in batch and "class_label" in batch


# ------------------------------------------------------------------------------------------ end to end


def test_own_data_digits_quick_end_to_end(tmp_path):
    """The whole path through main.py subprocesses in a few steps (about 35 s on 2 cores), then a rerun that
    skips every finished stage."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LDM_RUN_NOW", None)
    cmd = [sys.executable, "bench/own_data_digits.py", "--quick", "--workdir", str(tmp_path)]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (tmp_path / "own_data_digits.md").read_text()
    assert "real validation" in report and "class-conditional samples" in report and "target >= 80 %" in report
    results = json.loads((tmp_path / "own_data_digits.json").read_text())
    assert results["scores"]["samples"]["n"] == 20 and len(results["scores"]["samples"]["per_class"]) == 10
    sweep = results["scores"]["sweep"]
    assert [row["scale"] for row in sweep] == [1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 5.0]
    assert all(row["frechet"] > 0 for row in sweep)
    assert results["scores"]["real_vs_real"]["n"] == 20 and "real vs real" in report
    assert results["state"]["first_stage"]["trained_steps"] == 4 and results["state"]["diffusion"]["trained_steps"] == 4
    grid = Image.open(tmp_path / "own_data_digits.png")
    assert grid.size[1] > grid.size[0] > 32  # 10 rows of 2 samples
    assert (tmp_path / "models/first_stage_models/my-kl-f4-32/model.safetensors").is_file()
    assert not (REPO / "bench/results/own_data_digits.md").is_file() or \
        "--quick" not in (REPO / "bench/results/own_data_digits.md").read_text()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "first_stage: done" in second.stdout and "diffusion: done" in second.stdout
    assert not [line for line in second.stdout.splitlines() if line.startswith("$ ")]  # no command run again
