"""Loading never runs code it was handed: a model config may build only toolkit and torch.nn classes, and -r
reads checkpoints weights-only whatever the environment says."""
import os
import shutil
import sys

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.config import ConfigError, instantiate_from_config, safe_targets_only
from ldm.divergence import SafeCheckpointIO
from ldm.inference import load_model
from ldm.model_loading import build_model
from tests.helpers import load_script


def malicious_model_dir(source, tmp_path, marker, where=("model",)):
    """A copy of a model directory whose config, at key path `where`, names os.system with a command."""
    directory = tmp_path / "shared-model"
    shutil.copytree(source, directory)
    config = OmegaConf.load(directory / "config.yaml")
    OmegaConf.update(config, ".".join(where), {"target": "os.system", "params": {"command": f"touch {marker}"}},
                     merge=False)
    OmegaConf.save(config, directory / "config.yaml")
    return directory


@pytest.mark.hostile
@pytest.mark.parametrize("where", [("model",), ("model", "params", "cond_stage_config")],
                         ids=["top-level", "nested"])
def test_a_model_directory_naming_os_system_is_refused_and_runs_nothing(tmp_path, tiny_txt2img_model, where):
    marker = tmp_path / "pwned"
    directory = malicious_model_dir(tiny_txt2img_model, tmp_path, marker, where)
    with pytest.raises(ConfigError, match=r"refusing to build 'os\.system'.*--trust_config"):
        load_model(directory)
    assert not marker.exists()


@pytest.mark.hostile
def test_the_script_says_so_in_one_line(tmp_path, tiny_txt2img_model, monkeypatch):
    marker = tmp_path / "pwned"
    directory = malicious_model_dir(tiny_txt2img_model, tmp_path, marker)
    monkeypatch.setattr(sys, "argv", ["txt2img.py", "--config", str(directory), "--outdir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        load_script("txt2img").cli()
    message = str(exit_info.value)
    assert message.startswith("error: ") and "os.system" in message and "\n" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.hostile
def test_programs_and_functions_of_the_toolkit_are_refused_too():
    # `main.main` would read and run another (trusted) config; only classes are built.
    with safe_targets_only(), pytest.raises(ConfigError, match="refusing to build 'main.main'"):
        instantiate_from_config({"target": "main.main", "params": {"argv": ["--base", "evil.yaml", "-t"]}})
    with safe_targets_only(), pytest.raises(ConfigError, match="refusing"):
        instantiate_from_config({"target": "ldm.config.get_obj_from_str", "params": {"string": "os.system"}})


def test_trust_config_builds_other_classes(tmp_path):
    config = tmp_path / "config.yaml"
    OmegaConf.save({"model": {"target": "pytorch_lightning.LightningModule"}}, config)
    with pytest.raises(ConfigError, match="refusing to build 'pytorch_lightning.LightningModule'"):
        build_model(config)
    assert isinstance(build_model(config, trust_config=True), pl.LightningModule)


def test_training_configs_stay_unrestricted():
    # Outside a model load nothing is refused: a training config is the user's own program.
    assert isinstance(instantiate_from_config({"target": "collections.OrderedDict"}), dict)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.hostile
def test_resume_reads_checkpoints_weights_only_even_when_the_environment_says_otherwise(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callbacks": RunsCode(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        SafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    # A plain checkpoint still loads.
    torch.save({"state_dict": {"w": torch.ones(1)}, "global_step": 3}, path)
    assert SafeCheckpointIO().load_checkpoint(path)["global_step"] == 3
