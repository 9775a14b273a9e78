"""Short `main.py -t` runs of every shipped diffusion config on the built-in data, and `-r` resume."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_main import REPO, load_ckpt, only_run, run_main

DIFFUSION_CONFIGS = {
    "txt2img": "configs/latent-diffusion/txt2img.yaml",
    "txt2img_flow": "configs/latent-diffusion/txt2img_flow.yaml",
    "txt2img_minilm": "configs/latent-diffusion/txt2img_minilm.yaml",
    "class2img": "configs/latent-diffusion/class2img.yaml",
    "unconditional": "configs/latent-diffusion/unconditional.yaml",
    "inpainting": "configs/latent-diffusion/inpainting.yaml",
    "inpainting_txt": "configs/latent-diffusion/inpainting_txt.yaml",
    "pixel": "configs/ddpm/pixel_shapes.yaml",
}
# A handful of steps on tiny batches; 50 timesteps so the sampling in the image logs is quick.
FAST = ["data.params.batch_size=4", "data.params.train.params.num_samples=64",
        "data.params.validation.params.num_samples=8", "model.params.timesteps=50",
        "lightning.callbacks.image_logger.params.batch_frequency=2", "lightning.callbacks.image_logger.params.max_images=2",
        "--limit_val_batches", "1", "--val_check_interval", "2", "--log_every_n_steps", "1",
        "--enable_model_summary", "false"]


@pytest.mark.parametrize("name", list(DIFFUSION_CONFIGS))
def test_shipped_diffusion_config_trains(name, tmp_path):
    extra = ["model.params.validation_bpd_timesteps=2"] if name == "pixel" else []
    proc = run_main(["--base", DIFFUSION_CONFIGS[name], "-t", "--no-test", "--max_steps", "2", *FAST, *extra], tmp_path)
    logdir = only_run(tmp_path)
    saved = load_ckpt(logdir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2
    state = saved["state_dict"]
    assert "betas" in state and any(k.startswith("model_ema.") for k in state)
    metrics = (logdir / "csv" / "metrics.csv").read_text()
    assert "train/loss_simple" in metrics and "val/loss_simple_ema" in metrics
    grids = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "diffusion_row", "samples", "denoise_row"} <= grids, grids
    if name == "pixel":
        assert "val/bpd" in metrics
    else:
        assert "reconstruction" in grids
        # scale_by_std: measured on the first batch, printed, stored as a buffer; a model started from the text
        # model's weights keeps the scale its U-Net was trained with, and says so.
        assert ("(from the starting weights)" if name == "inpainting_txt" else "scale_by_std") in proc.stdout
        assert float(state["scale_factor"]) != 1.0
        assert not any(k.startswith("first_stage_model.loss.") for k in state)
    if name in ("txt2img", "txt2img_flow", "txt2img_minilm", "class2img", "inpainting_txt"):
        assert {"conditioning", "samples_cfg_scale_3.00"} <= grids, grids
    if name.startswith("inpainting"):
        assert "conditioning" in grids  # the masked image (and the caption)
    if name == "inpainting_txt":
        assert "initialised from the text-to-image model" in proc.stdout
        assert "scale_by_std: latent std" not in proc.stdout  # the text model's scale_factor is kept


def test_txt2img_resume_continues_and_keeps_scale_factor(tmp_path):
    args = ["-t", "--no-test", *FAST, "lightning.callbacks.image_logger.params.disabled=true"]
    run_main(["--base", DIFFUSION_CONFIGS["txt2img"], "--max_steps", "3", *args], tmp_path)
    logdir = only_run(tmp_path)
    first = load_ckpt(logdir / "checkpoints" / "last.ckpt")
    proc = run_main(["-r", str(logdir), "--max_steps", "5", *args], tmp_path)
    assert "scale_by_std: latent std" not in proc.stdout  # not measured again on resume
    second = load_ckpt(logdir / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 5
    assert torch.equal(second["state_dict"]["scale_factor"], first["state_dict"]["scale_factor"])
    assert second["state_dict"]["model_ema.num_updates"] == 5
    # Lightning's LR scheduler state continues too (the warm-up is counted in optimizer steps).
    assert second["lr_schedulers"][0]["last_epoch"] == 5


def test_resume_restores_the_whole_run_and_trains(tmp_path):
    """`-r <run>` alone (no -t, none of the first run's flags) restores the run's lightning config too: its
    trainer options (here validation every 2 steps, which the config's 1,000 would refuse on 16 batches an
    epoch) and callbacks (image logging off), and trains on; `-t false` resumes without training."""
    run_main(["--base", DIFFUSION_CONFIGS["txt2img"], "-t", "--no-test", "--max_steps", "3", *FAST,
              "lightning.callbacks.image_logger.params.disabled=true"], tmp_path)
    logdir = only_run(tmp_path)
    first_rows = (logdir / "csv" / "metrics.csv").read_text().splitlines()
    run_main(["-r", str(logdir), "--no-test", "--max_steps", "5"], tmp_path)
    assert load_ckpt(logdir / "checkpoints" / "last.ckpt")["global_step"] == 5
    # metrics.csv continues: the first run's rows, then the resumed steps'.
    rows = list(csv.DictReader((logdir / "csv" / "metrics.csv").open()))
    assert len(rows) > len(first_rows) - 1
    steps = [int(row["step"]) for row in rows if row.get("train/loss_simple_step")]
    assert steps == sorted(steps) and {0, 1, 2, 3, 4} <= set(steps), steps
    assert not (logdir / "images" / "train").exists() or not list((logdir / "images" / "train").glob("*.png"))
    run_main(["-r", str(logdir), "-t", "false", "--no-test", "--max_steps", "7"], tmp_path)
    assert load_ckpt(logdir / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_missing_first_stage_says_how_to_make_it(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    proc = run_main(["--base", DIFFUSION_CONFIGS["txt2img"], "-t", "--max_steps", "1", *FAST,
                     f"model.params.first_stage_config.params.ckpt_path={missing}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert str(missing) in out and "main.py --base" in out and "export_weights.py" in out
    assert "Traceback" not in out


def test_shipped_first_stage_recipe_is_there():
    """The built-in first stage ships with the config that made it, which the error message names."""
    root = Path(__file__).resolve().parents[1] / "models" / "first_stage_models" / "kl-f4-shapes"
    assert (root / "model.safetensors").is_file() and (root / "config.yaml").is_file()


def test_flow_model_trains_exports_and_samples_with_euler(tmp_path):
    """Flow matching end to end as the README says: main.py on txt2img_flow.yaml, export, txt2img.py --sampler euler."""
    run_main(["--base", DIFFUSION_CONFIGS["txt2img_flow"], "-t", "--no-test", "--max_steps", "2", *FAST], tmp_path)
    logdir = only_run(tmp_path)
    state = load_ckpt(logdir / "checkpoints" / "last.ckpt")["state_dict"]
    assert "model.diffusion_model.out.2.weight" in state
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model_dir = tmp_path / "flow-model"
    subprocess.run([sys.executable, "scripts/export_weights.py", str(logdir / "checkpoints" / "last.ckpt"),
                    "--model-dir", str(model_dir)], cwd=REPO, env=env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "scripts/txt2img.py", "--config", str(model_dir), "--prompt", "a red circle",
                           "--sampler", "euler", "--steps", "20", "--n_samples", "2", "--device", "cpu",
                           "--outdir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 2
    # The timestep samplers step over the DDPM table this model does not have: a one-line error.
    proc = subprocess.run([sys.executable, "scripts/txt2img.py", "--config", str(model_dir), "--prompt", "a red circle",
                           "--sampler", "ddim", "--device", "cpu", "--outdir", str(tmp_path / "out")], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "noise process is rectified_flow: use euler" in proc.stderr

