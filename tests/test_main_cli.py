"""main.py's argument handling (ldm/cli/train.py), without training."""
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ldm.cli import train as main
from ldm.config import ConfigError
from ldm.util import instantiate_from_config
from tests.helpers import REPO


def parse(argv):
    flags, overrides = main.split_argv(argv)
    return main.get_parser().parse_known_args(flags)[0], overrides


def test_overrides_anywhere_and_bare_boolean_flags():
    opt, overrides = parse(["--base", "a.yaml", "x.y=1", "b.yaml", "-t", "model.lr=2", "--no-test"])
    assert opt.base == ["a.yaml", "b.yaml"] and opt.train is True and opt.no_test is True
    assert overrides == ["x.y=1", "model.lr=2"]
    opt, _ = parse(["-t", "false", "--scale_lr"])
    assert opt.train is False and opt.scale_lr is True


def test_scale_lr_is_off_by_default():
    assert parse([])[0].scale_lr is False


def test_trainer_flags_override_config_and_legacy_gpus_maps():
    lightning = OmegaConf.create({"trainer": {"max_steps": 10, "precision": 32}})
    opt, _ = parse(["--max_steps", "20", "--precision", "bf16-mixed", "--gpus", "0,1"])
    options = main.resolve_trainer_options(lightning, opt)
    assert options["max_steps"] == 20 and options["precision"] == "bf16-mixed"
    assert options["accelerator"] == "gpu" and options["devices"] == [0, 1]
    opt, _ = parse(["--devices", "2", "--accelerator", "cpu", "--strategy", "ddp"])
    options = main.resolve_trainer_options(OmegaConf.create({}), opt)
    assert options == {"devices": 2, "accelerator": "cpu", "strategy": "ddp"}
    # An integer validation interval counts steps across epochs (any data size).
    options = main.resolve_trainer_options(OmegaConf.create({"trainer": {"val_check_interval": 5000}}), parse([])[0])
    assert options["check_val_every_n_epoch"] is None
    options = main.resolve_trainer_options(OmegaConf.create({"trainer": {"val_check_interval": 0.5}}), parse([])[0])
    assert "check_val_every_n_epoch" not in options


def test_unknown_trainer_option_in_config_is_named():
    with pytest.raises(ConfigError, match=r"unknown Trainer option\(s\) \['max_stepz'\]"):
        main.resolve_trainer_options(OmegaConf.create({"trainer": {"max_stepz": 1}}), parse([])[0])


def test_reference_style_targets_resolve_through_main():
    data = instantiate_from_config({"target": "main.DataModuleFromConfig", "params": {
        "batch_size": 2, "num_workers": 0,
        "train": {"target": "ldm.data.shapes.ShapesTrain", "params": {"num_samples": 4}}}})
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["image"].shape == (2, 32, 32, 3)
    assert isinstance(instantiate_from_config({"target": "main.ImageLogger", "params": {"batch_frequency": 5}}),
                      main.ImageLogger)


def test_resume_needs_an_existing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main._resolve_resume(str(tmp_path / "nope"))
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        main._resolve_resume(str(tmp_path / "run"))


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    names = [main.claim_run_name(tmp_path, "2026-01-01T00-00-00", "_txt2img") for _ in range(3)]
    assert names == ["2026-01-01T00-00-00", "2026-01-01T00-00-00-2", "2026-01-01T00-00-00-3"]
    assert {p.name for p in tmp_path.iterdir()} == {f"{n}_txt2img" for n in names}
    # Claimed but never written into (a run stopped by a user error): removed on the way out.
    (tmp_path / f"{names[0]}_txt2img" / "configs").mkdir()
    main.release_empty_run_dirs()
    assert {p.name for p in tmp_path.iterdir()} == {f"{names[0]}_txt2img"}


def test_a_config_error_leaves_no_run_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LDM_RUN_NOW"}
    proc = subprocess.run([sys.executable, "main.py", "--base", "configs/latent-diffusion/txt2img.yaml",
                           "model.params.no_such_key=1", "-l", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown parameter 'no_such_key'" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["data.params.batch_size=-4"], "'data' (set in command line): batch_size must be a positive integer, got -4"),
    (["model.base_learning_rate=fast"], "'model.base_learning_rate' (set in command line): must be a positive number, got 'fast'"),
    (["-l", "/proc/ldm-logs"], "-l/--logdir /proc/ldm-logs: cannot create it"),
], ids=["negative batch", "text learning rate", "unwritable logdir"])
def test_bad_training_settings_are_one_line_errors(tmp_path, args, message):
    env = {k: v for k, v in os.environ.items() if k != "LDM_RUN_NOW"}
    logdir = [] if "-l" in args else ["-l", str(tmp_path)]
    proc = subprocess.run([sys.executable, "main.py", "--base", "configs/autoencoder/autoencoder_kl_shapes_f4.yaml",
                           "-t", *args, *logdir], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
