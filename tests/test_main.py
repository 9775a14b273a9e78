"""End-to-end runs of main.py: train, write checkpoints/grids/logs, resume exactly, DDP, interrupts."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import ConfigError, refuse_unsafe_targets
from ldm.model_files import run_config_files
from tests.helpers import optimizer_fingerprint

REPO = Path(__file__).resolve().parents[1]
BUILTIN = {
    "kl": "configs/autoencoder/autoencoder_kl_shapes_f4.yaml",
    "vq": "configs/autoencoder/autoencoder_vq_shapes_f4.yaml",
}
# Keep runs short: tiny batches, no workers, a handful of steps, grids at steps 1, 2, 4.
FAST = ["data.params.batch_size=4", "data.params.num_workers=0", "data.params.train.params.num_samples=64",
        "data.params.validation.params.num_samples=8", "lightning.callbacks.image_logger.params.batch_frequency=4",
        "--limit_val_batches", "1", "--val_check_interval", "4", "--log_every_n_steps", "1", "--enable_model_summary", "false"]


def run_main(args, tmp_path, timeout=300, check=True, extra_env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("LDM_RUN_NOW", None)
    proc = subprocess.run([sys.executable, "main.py", *args, "-l", str(tmp_path / "logs")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def only_run(tmp_path) -> Path:
    runs = [p for p in (tmp_path / "logs").iterdir() if p.is_dir() and p.name != "debug_runs"]
    assert len(runs) == 1, runs
    return runs[0]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_train_writes_run_directory_then_resume_continues_exactly(kind, tmp_path):
    recorder = ["lightning.callbacks.recorder.target=tests.helpers.StateRecorder",
                f"lightning.callbacks.recorder.params.path={tmp_path / 'start.json'}"]
    proc = run_main(["--base", BUILTIN[kind], "-t", "--no-test", "--max_steps", "8", *FAST, *recorder], tmp_path)
    assert "learning rate" in proc.stdout and "not scaled" in proc.stdout
    logdir = only_run(tmp_path)
    assert logdir.name.endswith(Path(BUILTIN[kind]).stem)
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 1
    assert len(list((logdir / "configs").glob("*-lightning.yaml"))) == 1
    last = logdir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    grids = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "reconstructions", "samples"} <= grids, grids
    metrics = (logdir / "csv" / "metrics.csv").read_text()
    assert "train/rec_loss" in metrics
    assert list((logdir / "tensorboard").glob("events.out.tfevents.*"))

    saved = load_ckpt(last)
    assert saved["global_step"] == 8
    # Resume: starts from the saved step and optimizer moments, then trains on.
    # --trust_config: the run's saved configs name the test's own recorder class.
    run_main(["-r", str(logdir), "-t", "--no-test", "--max_steps", "12", "--trust_config", *FAST, *recorder], tmp_path)
    start = json.loads((tmp_path / "start.json").read_text())
    assert start["global_step"] == 8
    assert start["optimizers"] == pytest.approx(optimizer_fingerprint(saved["optimizer_states"]), rel=1e-12)
    assert load_ckpt(last)["global_step"] == 12


def test_ddp_two_cpu_processes(tmp_path):
    # A diffusion model, so that scale_by_std is checked too: each rank sees another first batch, and all must train
    # on rank 0's scale_factor (which the checkpoint stores).
    proc = run_main(["--base", "configs/latent-diffusion/class2img.yaml", "-t", "--no-test", "--max_steps", "2",
                     "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *FAST, "model.params.timesteps=50",
                     "lightning.callbacks.image_logger.params.disabled=true"], tmp_path, timeout=400)
    logdir = only_run(tmp_path)  # both ranks used the same run directory
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 1
    assert "Effective batch size = 8" in proc.stdout
    saved = load_ckpt(logdir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2
    lines = [line for line in proc.stdout.splitlines() if "scale_by_std: latent std" in line]  # one per rank
    factors = {line.split("scale_factor ")[1].split(" ")[0] for line in lines}
    assert len(lines) == 2 and factors == {f"{float(saved['state_dict']['scale_factor']):.5f}"}, lines
    assert "rank 0 measured it for all 2 ranks" in lines[0]


def test_scale_lr_prints_arithmetic(tmp_path):
    proc = run_main(["--base", BUILTIN["kl"], "--scale_lr", "--no-test", *FAST], tmp_path)
    assert "--scale_lr: 1 (accumulate_grad_batches) * 1 (num_nodes) * 1 (devices) * 4 (batch size)" in proc.stdout


@pytest.mark.hostile
def test_sigterm_saves_last_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LDM_RUN_NOW", None)
    args = [sys.executable, "main.py", "--base", BUILTIN["kl"], "-t", "--no-test", "--max_steps", "100000",
            *FAST, "-l", str(tmp_path / "logs")]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    # Wait until training has taken a few steps (the grid for step 4 is written).
    while time.time() < deadline and proc.poll() is None:
        logs = tmp_path / "logs"
        if logs.exists() and list(logs.glob("*/images/train/inputs_gs-000004*")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    logdir = only_run(tmp_path)
    last = logdir / "checkpoints" / "last.ckpt"
    assert last.is_file(), out[-3000:]
    assert "saved" in out and "Resume with" in out
    assert load_ckpt(last)["global_step"] >= 4
    # A stopped run is not a finished one: the exit status says so (scripts chaining stages stop there).
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]


@pytest.mark.hostile
def test_bad_config_key_exits_with_clear_message(tmp_path):
    proc = run_main(["--base", BUILTIN["kl"], "model.params.embed_dimm=3"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "model.params.embed_dimm" in proc.stderr and "command line" in proc.stderr


def test_debug_run_moves_to_debug_runs(tmp_path):
    run_main(["--base", BUILTIN["kl"], "-d", "-t", "--no-test", "--max_steps", "1", *FAST], tmp_path)
    assert len(list((tmp_path / "logs" / "debug_runs").iterdir())) == 1


@pytest.mark.hostile
def test_real_data_config_without_data_says_what_to_provide(tmp_path, random_vgg16_file):
    env_vgg = f"model.params.lossconfig.params.vgg_weights_path={random_vgg16_file}"
    proc = run_main(["--base", "configs/autoencoder/autoencoder_kl_32x32x4.yaml", "-t", env_vgg,
                     f"data.params.train.params.root={tmp_path / 'missing'}"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "image folder not found" in proc.stderr and "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_a_validation_interval_longer_than_an_epoch_counts_steps_across_epochs(tmp_path):
    # 64 images at batch 4 are 16 batches an epoch; a config's val_check_interval of 20 batches (the folder configs
    # say 5000) made Lightning abort before the first step unless check_val_every_n_epoch was null.
    fast = [a for a in FAST if a not in ("--val_check_interval", "4")]
    # The autoencoder takes two optimizer steps a batch: 44 steps are 22 batches.
    proc = run_main(["--base", BUILTIN["kl"], "-t", "--no-test", "--max_steps", "44",
                     "lightning.trainer.val_check_interval=20", *fast], tmp_path)
    # One progress bar over the run's steps (ldm/progress.py), not Lightning's per-epoch "Epoch 1/-2" bar.
    console = proc.stdout + proc.stderr
    assert "44/44 [" in console and "/-2" not in console and "v_num" not in console
    assert "Tip:" not in console and "weights_only" not in console
    rows = (only_run(tmp_path) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    validated = [row.split(",")[header.index("epoch")] for row in rows[1:]
                 if row.split(",")[header.index("val/rec_loss")]]
    assert validated == ["1"], validated  # once, in the second epoch (batch 20 of the run)


def test_a_learning_rate_changed_on_resume_is_applied(tmp_path):
    run_main(["--base", BUILTIN["kl"], "-t", "--no-test", "--max_steps", "4", *FAST], tmp_path)
    logdir = only_run(tmp_path)
    before = load_ckpt(logdir / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"]
    # A resume that fails (here: an architecture the checkpoint does not fit) leaves the run's configs as they
    # were, so the plain `-r` below restores the run, not the failed attempt.
    configs = sorted(p.name for p in (logdir / "configs").iterdir())
    failed = run_main(["-r", str(logdir), "--max_steps", "8", "model.params.ddconfig.ch=16", *FAST], tmp_path,
                      check=False)
    assert failed.returncode != 0 and sorted(p.name for p in (logdir / "configs").iterdir()) == configs
    proc = run_main(["-r", str(logdir), "--max_steps", "8", "model.base_learning_rate=2.5e-5", *FAST], tmp_path)
    assert "learning rate changed on resume" in proc.stdout and "-> 2.50e-05 (config)" in proc.stdout
    saved = load_ckpt(logdir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 8 and before != 2.5e-5
    assert [g["lr"] for opt in saved["optimizer_states"] for g in opt["param_groups"]] == pytest.approx([2.5e-5] * 2)


@pytest.mark.hostile
def test_a_resumed_runs_configs_build_only_safe_classes_unless_trusted(tmp_path):
    # A run directory from elsewhere: its saved configs must not run code on `-r` (model directories are held to
    # the same rule); the user's own flags and overrides are not restricted.
    run_main(["--base", BUILTIN["kl"], "-t", "--no-test", "--max_steps", "2", *FAST], tmp_path)
    logdir = only_run(tmp_path)
    last = (logdir / "checkpoints" / "last.ckpt").read_bytes()
    lightning_yaml = next((logdir / "configs").glob("*-lightning.yaml"))
    mark = tmp_path / "ran"
    evil = {"os.system": {"evil": {"target": "os.system", "params": {"command": f"touch {mark}"}}},
            "ldm.util.__class__": {"evil": {"target": "ldm.util.__class__"}},
            "tests.helpers.StateRecorder": {"recorder": {"target": "tests.helpers.StateRecorder",
                                                         "params": {"path": str(mark)}}}}
    saved = OmegaConf.load(lightning_yaml)
    for target, callbacks in evil.items():
        OmegaConf.save(OmegaConf.merge(saved, {"lightning": {"callbacks": callbacks}}), lightning_yaml)
        # What main.py -r checks first, in this process; then one of them through main.py itself.
        with pytest.raises(ConfigError, match=re.escape(f"'{target}'")) as refused:
            refuse_unsafe_targets(run_config_files(logdir))
        assert target == "ldm.util.__class__" or "while resuming a run" in str(refused.value)
    proc = run_main(["-r", str(logdir), "--max_steps", "4", *FAST], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]  # a config error
    assert "'tests.helpers.StateRecorder'" in proc.stderr.strip().splitlines()[-1] and "--trust_config" in proc.stderr
    assert not mark.exists() and (logdir / "checkpoints" / "last.ckpt").read_bytes() == last
    # Trusted: the run's own callback class is built and the run goes on.
    run_main(["-r", str(logdir), "--max_steps", "4", "--trust_config", *FAST], tmp_path)
    assert json.loads(mark.read_text())["global_step"] == 2


@pytest.mark.hostile
def test_a_run_being_trained_cannot_be_resumed_by_a_second_process(tmp_path):
    from ldm import run_lock

    run = tmp_path / "logs" / "2026-01-01T00-00-00_a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not yet a checkpoint")
    run_lock.lock_run(run)  # this process trains in it
    try:
        proc = run_main(["-r", str(run)], tmp_path, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {run} is being trained by process {os.getpid()}")
        assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"not yet a checkpoint"
    finally:
        run_lock._held.pop().close()  # the process ends (or is killed): the lock goes with it
    proc = run_main(["-r", str(run)], tmp_path, check=False)
    # On to the next problem: the run has no saved configs.
    assert proc.stderr.strip().splitlines()[-2].startswith(f"error: cannot resume {run}: its configs/ folder has no")


def _metrics_steps(logdir):
    rows = (logdir / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    return {int(row.split(",")[header.index("step")]) for row in rows[1:] if row.split(",")[header.index("step")]}


def _train_loss_steps(logdir):
    rows = (logdir / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    step, loss = header.index("step"), header.index("train/rec_loss")
    return [int(row.split(",")[step]) for row in rows[1:] if row.split(",")[loss]]


@pytest.mark.hostile
@pytest.mark.parametrize("kill", ["during_training", "while_saving"])
def test_a_killed_run_resumes_with_r_alone_to_the_configs_max_steps(kill, tmp_path):
    """SIGKILL (no handler runs) mid-training or mid-checkpoint-write, $TMPDIR on another directory; then
    `main.py -r <run>` with no other flag finishes the run (--trust_config here only because the run's configs name
    the test's own killer callback). Checkpoints every 4 batches = 8 steps."""
    marker = tmp_path / "killed"
    killer = ({"target": "tests.helpers.KillAtStep", "step": 14} if kill == "during_training"
              else {"target": "tests.helpers.KillWhileSaving", "step": 8})
    params = "step" if kill == "during_training" else "after_step"
    config = [f"lightning.callbacks.killer.target={killer['target']}",
              f"lightning.callbacks.killer.params.{params}={killer['step']}",
              f"lightning.callbacks.killer.params.marker={marker}",
              "lightning.trainer.max_steps=24", "lightning.trainer.val_check_interval=4",
              "lightning.trainer.limit_val_batches=1", "lightning.trainer.log_every_n_steps=1",
              "data.params.batch_size=4", "data.params.num_workers=0", "data.params.train.params.num_samples=64",
              "data.params.validation.params.num_samples=8", "lightning.callbacks.image_logger.params.disabled=true"]
    other_tmp = tmp_path / "elsewhere-tmp"
    other_tmp.mkdir()
    proc = run_main(["--base", BUILTIN["kl"], "-t", "--no-test", *config], tmp_path, check=False,
                    extra_env={"TMPDIR": str(other_tmp)})
    assert proc.returncode == -signal.SIGKILL and marker.exists(), proc.stderr[-2000:]
    logdir = only_run(tmp_path)
    checkpoints = logdir / "checkpoints"
    saved = load_ckpt(checkpoints / "last.ckpt")  # whole: the kill never leaves a torn checkpoint
    assert saved["global_step"] == 8
    if kill == "while_saving":
        assert list(checkpoints.glob(".*.tmp")), "the killed write should have left its temporary file"

    proc = run_main(["-r", str(logdir), "--trust_config"], tmp_path)
    assert load_ckpt(checkpoints / "last.ckpt")["global_step"] == 24
    assert not list(checkpoints.glob(".*.tmp")) and not list(checkpoints.glob("last-v*.ckpt"))
    # metrics.csv is complete: every batch of the run logged (the autoencoder's 24 optimizer steps are 12 batches,
    # which its metrics count), those before the kill kept, those after the resumed checkpoint logged again.
    assert _metrics_steps(logdir) == set(range(12))
    assert sorted(_train_loss_steps(logdir)) == list(range(12))  # each once: none left from before the kill


def test_the_configs_logger_is_used_and_a_loss_curve_is_drawn(tmp_path):
    # The reference's `lightning.logger` (target + params; save_dir defaults to the run directory) replaces
    # TensorBoard; csv/metrics.csv stays (resume and the curve read it).
    run_main(["--base", BUILTIN["kl"], "-t", "--no-test", "--max_steps", "6", *FAST,
              "lightning.logger.target=pytorch_lightning.loggers.CSVLogger", "lightning.logger.params.name=mine"],
             tmp_path)
    logdir = only_run(tmp_path)
    # One last.ckpt: validation (every 4 batches) never ran in these 3 batches, so ModelCheckpoint's own last.ckpt came
    # after LastCheckpoint's; with its version counter on it wrote a duplicate last-v1.ckpt.
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir() if p.name.startswith("last")) == \
        ["last.ckpt", "last.safetensors"]
    assert (logdir / "mine" / "version_0" / "metrics.csv").is_file() and (logdir / "csv" / "metrics.csv").is_file()
    assert not (logdir / "tensorboard").exists()
    from PIL import Image

    curve = Image.open(logdir / "loss_curve.png").convert("RGB")
    colours = {tuple(p) for p in np.asarray(curve).reshape(-1, 3).tolist()}
    assert curve.size == (720, 420) and (31, 119, 180) in colours  # the first series was drawn


@pytest.mark.hostile
def test_unreadable_training_images_are_reported_each_epoch(tmp_path):
    from PIL import Image

    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        for i in range(8):
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / split / f"{i}.png")
    (tmp_path / "train" / "3.png").write_bytes(b"not an image")
    proc = run_main(["--base", "configs/autoencoder/autoencoder_kl_f4_folder32.yaml", "-t", "--no-test",
                     "--max_steps", "6", "data.params.batch_size=4", "data.params.num_workers=0",
                     f"data.params.train.params.root={tmp_path / 'train'}",
                     f"data.params.validation.params.root={tmp_path / 'validation'}",
                     "data.params.train.params.class_from_subfolders=false",
                     "data.params.validation.params.class_from_subfolders=false",
                     "lightning.callbacks.image_logger.params.disabled=true", "--limit_val_batches", "1"], tmp_path)
    assert "[ldm] epoch 0: 1 of 8 training images could not be read and were skipped" in proc.stdout
    assert "3.png" in proc.stdout
