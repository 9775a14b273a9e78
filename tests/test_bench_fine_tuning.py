"""bench/fine_tuning.py --quick end to end: the folder, the extended judge, fine-tuning runs through main.py (LoRA
with new words and full fine-tuning, whose costs it compares; textual inversion is the same path with another config,
trained end to end in tests/test_new_words.py), their probes and the report (issue 26); first the first stage's decoder
fine-tuned on the folder, which every run then decodes with."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_writes_every_figure(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LDM_RUN_NOW"}
    subprocess.run([sys.executable, "bench/fine_tuning.py", "--quick", "--methods", "lora", "full",
                    "--workdir", str(tmp_path)], cwd=REPO, check=True, env=env, timeout=300)
    results = json.loads((tmp_path / "fine_tuning.json").read_text())
    assert set(results["methods"]) == {"lora", "full"}
    for split in ("seen", "seen_typed", "novel", "novel_typed"):
        assert 0.0 <= results["base"][split]["match_all"] <= 1.0
    for method, figures in results["methods"].items():
        assert figures["costs"]["steps"] == 2 and figures["peak_rss_bytes"] > 0
        assert 0.0 <= figures["last"]["novel"]["novel_share"] <= 1.0
    costs = {m: f["costs"] for m, f in results["methods"].items()}
    # LoRA trains the adapter and the embedding table, far fewer weights than full fine-tuning.
    assert costs["lora"]["optimizer_parameters"] < costs["full"]["optimizer_parameters"] / 10
    assert results["methods"]["lora"]["lora_file_bytes"] < 0.05 * results["unet"]["bytes"]
    assert 0.0 <= results["first_stage_ceiling"]["novel_share"] <= 1.0
    decoder = results["decoder"]  # fine-tuned first (2 batches), measured with the shipped one's figures beside it
    assert decoder["batches"] == 2 and (Path(decoder["run"]) / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= decoder["first_stage_ceiling"]["novel_share"] <= 1.0 and "novel" in decoder["base"]
    assert 0.0 <= decoder["first_stage_ceiling"]["known_shape"] <= 1.0
    for figures in results["methods"].values():  # every method trained and sampled through it
        (project,) = (Path(figures["run"]) / "configs").glob("*-project.yaml")
        assert OmegaConf.load(project).model.params.vae == decoder["run"]
    for figures in results["methods"].values():  # prior preservation sampled its images in every run
        assert len(list((Path(figures["run"]) / "prior").glob("*.png"))) == 2
    assert (tmp_path / "fine_tuning.png").stat().st_size > 0
    report = (tmp_path / "fine_tuning.md").read_text()
    assert "| lora |" in report and "| the fine-tuned decoder: its reconstructions" in report
    assert len(list((tmp_path / "data" / "train").glob("*.txt"))) == 8
    assert (tmp_path / "judge" / "config.json").is_file()
