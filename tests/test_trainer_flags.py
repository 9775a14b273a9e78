"""Every Lightning Trainer flag works through main.py, or is refused in one line that says why: the flags that
switch a feature off also switch off the toolkit's callbacks that provide it. (`--devices 2 --strategy ddp` is
trained in tests/test_main.py.)"""
from __future__ import annotations

import pytest

from tests.test_main import load_ckpt, only_run, run_main

AUTOENCODER = "configs/autoencoder/autoencoder_kl_shapes_f4.yaml"
TINY = ["data.params.batch_size=2", "data.params.train.params.num_samples=8",
        "data.params.validation.params.num_samples=4", "--limit_val_batches", "1"]
TXT2IMG_TINY = ["data.params.batch_size=2", "data.params.train.params.num_samples=8",
                "data.params.validation.params.num_samples=4", "model.params.cache_latents=false",
                "lightning.callbacks.image_logger.params.disabled=true", "--limit_val_batches", "1"]


def train(tmp_path, flags, config=AUTOENCODER, steps=2, overrides=TINY):
    return run_main(["--base", config, "-t", "--no-test", "--max_steps", str(steps), *flags, *overrides], tmp_path)


# Flags that do not interact share a run (each run costs seconds of start-up); every flag is in one.
@pytest.mark.parametrize("flags, present, absent", [
    (["--enable_progress_bar", "false", "--logger", "false", "--profiler", "simple"],
     ["checkpoints/last.ckpt"], ["csv", "tensorboard", "loss_curve.png"]),
    (["--enable_checkpointing", "false", "--precision", "bf16-mixed", "--limit_train_batches", "2",
      "--max_time", "00:00:10:00"], ["checkpoints/last.safetensors", "csv/metrics.csv"], ["checkpoints/last.ckpt"]),
], ids=["no-progress-bar,no-logger,profiler", "no-checkpointing,bf16,limit-batches,max-time"])
def test_trainer_flags_train(tmp_path, flags, present, absent):
    proc = train(tmp_path, flags)
    run = only_run(tmp_path)
    assert "Traceback" not in proc.stderr
    for name in present:
        assert (run / name).exists(), (name, sorted(p.name for p in run.rglob("*")))
    for name in absent:
        assert not (run / name).exists(), name


def test_fast_dev_run_trains_a_batch(tmp_path):
    proc = train(tmp_path, ["--fast_dev_run", "true"])
    assert "Traceback" not in proc.stderr and "done" in proc.stdout


def test_accumulate_grad_batches_works_for_diffusion_and_is_refused_in_one_line_for_the_autoencoder(tmp_path):
    proc = train(tmp_path / "txt2img", ["--accumulate_grad_batches", "2"],
                 config="configs/latent-diffusion/txt2img.yaml", steps=2, overrides=TXT2IMG_TINY)
    assert load_ckpt(only_run(tmp_path / "txt2img") / "checkpoints" / "last.ckpt")["global_step"] == 2, proc.stdout
    refused = run_main(["--base", AUTOENCODER, "-t", "--max_steps", "2", "--accumulate_grad_batches", "2", *TINY],
                       tmp_path / "ae", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "cannot accumulate; raise data.params.batch_size instead" in refused.stderr.strip().splitlines()[-1]
