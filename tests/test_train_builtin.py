"""scripts/train_builtin.sh: a stage trains and exports a model directory; run again, it resumes that run."""
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BUILTIN_STAGES": "first_stage",
           "BUILTIN_FIRST_STAGE_STEPS": str(steps), "BUILTIN_MODELS_DIR": str(tmp_path / "models"),
           "BUILTIN_LOGDIR": str(tmp_path / "logs")}
    env.pop("LDM_RUN_NOW", None)
    proc = subprocess.run(["bash", "scripts/train_builtin.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_stage_exports_then_resumes_its_run(tmp_path):
    first = _run(tmp_path, 2)
    assert "first_stage: 2 steps of configs/autoencoder/autoencoder_kl_shapes_f4.yaml" in first.stdout
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1
    model_dir = tmp_path / "models" / "first_stage_models" / "kl-f4-shapes"
    assert (model_dir / "config.yaml").is_file() and (model_dir / "model.safetensors").is_file()
    second = _run(tmp_path, 4)
    assert f"first_stage: resuming {runs[0]} to 4 steps" in second.stdout
    assert list((tmp_path / "logs").iterdir()) == runs  # the same run continued, no new one
    saved = torch.load(runs[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    exported = load_state_dict(model_dir / "model.safetensors")
    assert "encoder.conv_in.weight" in exported


def test_txt2img_stage_takes_its_overrides_and_first_stage_dir(tmp_path):
    """BUILTIN_TXT2IMG_OVERRIDES (what scripts/demo.sh sets its learning-rate schedule with) reaches the
    first run, BUILTIN_TXT2IMG_TYPED_OVERRIDES each typed run, and BUILTIN_FIRST_STAGE_DIR (the demo's: the shipped
    first stage) is the first stage it trains on."""
    schedule = "model.params.scheduler_config.params"
    shipped = "models/first_stage_models/kl-f4-shapes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BUILTIN_STAGES": "txt2img", "BUILTIN_FIRST_STAGE_DIR": shipped,
           "BUILTIN_TXT2IMG_STEPS": "2", "BUILTIN_TXT2IMG_TYPED_RUNS": "1:3e-4 2:5e-4:1",
           "BUILTIN_TXT2IMG_OVERRIDES": f"{schedule}.warm_up_steps=[1,1] {schedule}.cycle_lengths=[1,1] "
                                        f"{schedule}.f_start=[0.1,0.3] {schedule}.f_max=[1.0,0.3] "
                                        f"{schedule}.f_min=[1.0,0.01] data.params.validation.params.num_samples=4 "
                                        "data.params.batch_size=8",
           "BUILTIN_TXT2IMG_TYPED_OVERRIDES": "model.params.use_ema=false",  # what scripts/demo.sh sets
           "BUILTIN_MODELS_DIR": str(tmp_path / "models"), "BUILTIN_LOGDIR": str(tmp_path / "logs")}
    env.pop("LDM_RUN_NOW", None)
    proc = subprocess.run(["bash", "scripts/train_builtin.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = next((tmp_path / "logs").glob("*_builtin_txt2img"))
    project = OmegaConf.load(sorted((run / "configs").glob("*-project.yaml"))[-1])
    assert list(project.model.params.scheduler_config.params.cycle_lengths) == [1, 1]
    assert list(project.model.params.scheduler_config.params.f_min) == [1.0, 0.01]
    assert project.data.params.batch_size == 8
    assert project.model.params.first_stage_config.params.ckpt_path == f"{shipped}/model.safetensors"
    assert project.data.params.train.params.caption_style == "canonical"
    # The second run: typed captions, from the first run's weights, its own decaying rate.
    typed_run = next((tmp_path / "logs").glob("*_builtin_txt2img_typed1"))
    typed = OmegaConf.load(sorted((typed_run / "configs").glob("*-project.yaml"))[-1])
    assert typed.data.params.train.params.caption_style == "typed"
    assert typed.model.params.ckpt_path == f"{run}/checkpoints/last.ckpt"
    assert list(typed.model.params.scheduler_config.params.cycle_lengths) == [1]
    assert typed.model.params.scheduler_config.params.f_max[0] == pytest.approx(0.3)
    assert project.model.params.use_ema and not typed.model.params.use_ema  # the typed runs' overrides alone
    # The third: a rate held (STEPS:RATE:HOLD), then decaying, from the second run's weights.
    held_run = next((tmp_path / "logs").glob("*_builtin_txt2img_typed2"))
    held = OmegaConf.load(sorted((held_run / "configs").glob("*-project.yaml"))[-1]).model.params
    assert held.ckpt_path == f"{typed_run}/checkpoints/last.ckpt"
    assert list(held.scheduler_config.params.cycle_lengths) == [1, 1]
    assert list(held.scheduler_config.params.f_max) == pytest.approx([0.5, 0.5])
    assert list(held.scheduler_config.params.f_min) == pytest.approx([0.5, 0.01])
    exported = OmegaConf.load(tmp_path / "models" / "ldm" / "txt2img-shapes" / "config.yaml")
    assert "ckpt_path" not in exported.model.params  # the export holds every weight itself
    assert (tmp_path / "models" / "ldm" / "txt2img-shapes" / "model.safetensors").is_file()
    assert not (tmp_path / "models" / "first_stage_models").exists()  # nothing trained or copied there
