"""A text model trained on a user's captions reads their words: its vocabulary is built from the captions."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.inference import load_model, text_to_image
from ldm.modules.encoders.caption_vocabulary import build_caption_vocabulary, caption_words
from ldm.modules.encoders.tokenization import PromptWarning
from tests.test_main import REPO, only_run, run_main
from tests.test_main_diffusion import FAST

FOLDER_FAST = [arg for arg in FAST if "num_samples" not in arg]  # a folder is as big as it is
CAPTIONS = ["A white heart on a black tile.", "Two white hearts, side by side", "a black hexagon on white tile",
            "the hexagon and the heart", "a tiny black heart"]


def test_words_are_split_and_counted_as_the_tokenizer_reads_them():
    assert caption_words("A Caf\u00e9\u2019s heart, \u201cwhite\u201d!") == ["a", "cafe", "s", "heart", "white"]
    words = build_caption_vocabulary(CAPTIONS, min_count=2)  # most frequent first, ties alphabetical
    assert words == ["a", "black", "heart", "white", "hexagon", "on", "side", "the", "tile"]
    assert words == build_caption_vocabulary(list(reversed(CAPTIONS)), min_count=2)  # order-free: deterministic
    assert build_caption_vocabulary(CAPTIONS, min_count=1, max_size=2) == ["a", "black"]
    with pytest.raises(ValueError, match="min_count"):
        build_caption_vocabulary(CAPTIONS, min_count=0)


def _caption_folder(root, count: int = 12) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])


def test_a_run_on_a_captioned_folder_learns_its_words_and_exports_them(tmp_path):
    _caption_folder(tmp_path / "images" / "train")
    _caption_folder(tmp_path / "images" / "validation", count=4)
    folder = {"target": "ldm.data.folder.ImageFolderDataset", "params": {"size": 32, "flip_p": 0.0}}
    overlay = {
        "model": {"params": {"cache_latents": False, "cond_stage_config": {
            "params": {"tokenizer_path": None}, "vocabulary": {"min_count": 3, "max_size": 100}}}},
        "data": {"params": {
            "train": {**folder, "params": {**folder["params"], "root": str(tmp_path / "images" / "train")}},
            "validation": {**folder, "params": {**folder["params"], "root": str(tmp_path / "images" / "validation")}}}},
    }
    OmegaConf.save(OmegaConf.create(overlay), tmp_path / "my_captions.yaml")
    proc = run_main(["--base", "configs/latent-diffusion/txt2img.yaml", str(tmp_path / "my_captions.yaml"), "-t",
                     "--no-test", "--max_steps", "2", *FOLDER_FAST], tmp_path)
    run = only_run(tmp_path)
    vocab = (run / "vocab.txt").read_text().split()
    assert {"heart", "hexagon", "white", "tile"} <= set(vocab) and not {"tiny", "and"} & set(vocab)  # seen twice
    assert len(vocab) == 5 + 12 and "vocabulary: 12 words of 12 training captions" in proc.stdout
    project = OmegaConf.load(next((run / "configs").glob("*-project.yaml"))).model.params.cond_stage_config.params
    assert project.tokenizer_path == str(run / "vocab.txt") and project.vocab_size == len(vocab)

    # -r keeps the run's vocabulary (the saved config names it): nothing is rebuilt.
    before = (run / "vocab.txt").stat().st_mtime_ns
    run_main(["-r", str(run), "--no-test", "--max_steps", "3"], tmp_path)
    assert (run / "vocab.txt").stat().st_mtime_ns == before

    model_dir = tmp_path / "my-model"
    subprocess.run([sys.executable, "scripts/export_weights.py", str(run / "checkpoints" / "last.ckpt"),
                    "--model-dir", str(model_dir)], cwd=REPO, check=True, capture_output=True)
    assert (model_dir / "vocab.txt").read_text().split() == vocab
    card = (model_dir / "README.md").read_text()
    assert "reads 12 words" in card and "hexagon" in card  # where the unknown-word warning points
    model = load_model(str(model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text_to_image(model, ["A white hexagon on a black tile."], steps=2, progress=False)
        text_to_image(model, ["a white unicorn"], steps=2, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, PromptWarning)]
    assert len(messages) == 1 and "'unicorn'" in messages[0] and "hexagon" not in messages[0]
    assert str(model_dir / "README.md") in messages[0]
