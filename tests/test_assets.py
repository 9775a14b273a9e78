"""Built-in files found from anywhere (ldm.assets), models by name from $LDM_MODELS_DIR, and the installed commands."""
import importlib
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from ldm import assets
from ldm.callbacks import ImageLogger
from ldm.config import get_obj_from_str, load_configs
from ldm.inference import load_model
from ldm.model_files import ModelNotFound
from tests.helpers import REPO


def test_a_path_resolves_as_given_first_then_in_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Not here: the checkout's copy.
    assert assets.resolve("configs/latent-diffusion/txt2img.yaml") == REPO / "configs/latent-diffusion/txt2img.yaml"
    # A user's own file of the same relative name wins.
    (tmp_path / "configs/latent-diffusion").mkdir(parents=True)
    (tmp_path / "configs/latent-diffusion/txt2img.yaml").write_text("model: {}\n")
    assert assets.resolve("configs/latent-diffusion/txt2img.yaml").resolve() == (
        tmp_path / "configs/latent-diffusion/txt2img.yaml")
    # Nowhere: the path as written, for the error message.
    assert str(assets.resolve("models/none/such.safetensors")) == "models/none/such.safetensors"


def test_a_config_loaded_from_elsewhere_finds_the_files_it_names(tmp_path, monkeypatch):
    # configs/ name the built-in first stage and vocabulary relative to the repository root: from another
    # directory (or a wheel) they resolve to the toolkit's own files, so `build_model` and `ldm-train` work there.
    monkeypatch.chdir(tmp_path)
    params = load_configs(["configs/latent-diffusion/txt2img.yaml"]).model.params
    first_stage, vocabulary = params.first_stage_config.params.ckpt_path, params.cond_stage_config.params.tokenizer_path
    assert first_stage == str(REPO / "models/first_stage_models/kl-f4-shapes/model.safetensors")
    assert vocabulary.startswith(str(REPO)) and Path(vocabulary).is_file()
    # A user's own file of that name, in the working directory, wins; a name found nowhere stays as written.
    (tmp_path / "models/first_stage_models/kl-f4-shapes").mkdir(parents=True)
    (tmp_path / "models/first_stage_models/kl-f4-shapes/model.safetensors").write_bytes(b"")
    assert load_configs(["configs/latent-diffusion/txt2img.yaml"]).model.params.first_stage_config.params.ckpt_path \
        == "models/first_stage_models/kl-f4-shapes/model.safetensors"
    missing = load_configs(["configs/latent-diffusion/txt2img.yaml"],
                           ["model.params.first_stage_config.params.ckpt_path=no/such.safetensors"])
    assert missing.model.params.first_stage_config.params.ckpt_path == "no/such.safetensors"
    # Named on the command line, a packaged file is found the same way.
    (tmp_path / "models/first_stage_models/kl-f4-shapes/model.safetensors").unlink()
    override = load_configs(["configs/latent-diffusion/txt2img.yaml"],
                            ["model.params.cond_stage_config.params.tokenizer_path=ldm/data/shapes_vocab.txt",
                             "model.params.first_stage_config.params.ckpt_path="
                             "models/first_stage_models/kl-f4-shapes/model.safetensors"])
    assert override.model.params.cond_stage_config.params.tokenizer_path == str(REPO / "ldm/data/shapes_vocab.txt")
    assert override.model.params.first_stage_config.params.ckpt_path == str(
        REPO / "models/first_stage_models/kl-f4-shapes/model.safetensors")


def test_an_installed_wheel_finds_models_and_configs_under_ldm_assets(tmp_path, monkeypatch):
    """As in site-packages: no checkout above the package, the trees copied into ldm/assets/."""
    site = tmp_path / "site-packages"
    package = site / "ldm" / "assets"
    shutil.copytree(REPO / "configs" / "latent-diffusion", package / "configs" / "latent-diffusion")
    (site / "ldm" / "data").mkdir(parents=True)
    shutil.copy(REPO / "ldm" / "data" / "shapes_vocab.txt", site / "ldm" / "data")
    monkeypatch.setattr(assets, "PACKAGE", package)
    monkeypatch.setattr(assets, "CHECKOUT", tmp_path / "no-checkout")
    monkeypatch.chdir(tmp_path)
    assert assets.resolve("configs/latent-diffusion/txt2img.yaml") == package / "configs/latent-diffusion/txt2img.yaml"
    assert assets.resolve("ldm/data/shapes_vocab.txt") == site / "ldm" / "data" / "shapes_vocab.txt"
    config = load_configs(["configs/latent-diffusion/txt2img.yaml"])  # `ldm-train --base configs/...`
    assert config.model.params.parameterization == "v"


def test_models_load_by_name_from_ldm_models_dir(tmp_path, monkeypatch, tiny_txt2img_model):
    collection = tmp_path / "my-models"
    shutil.copytree(tiny_txt2img_model, collection / "tiny")
    monkeypatch.setenv(assets.MODELS_DIR_VARIABLE, str(collection))
    monkeypatch.chdir(tmp_path)
    assert assets.models_dirs()[0] == collection
    model = load_model("tiny")
    assert model.num_timesteps == 16
    with pytest.raises(ModelNotFound, match="no model config at"):
        load_model("not-a-model")


def test_reference_configs_name_main_which_is_the_training_cli():
    # The reference's configs say `main.ImageLogger`; an installed wheel has no main.py.
    assert get_obj_from_str("main.ImageLogger") is ImageLogger
    assert get_obj_from_str("main.DataModuleFromConfig").__module__ == "ldm.data.datamodule"


def test_every_console_script_names_a_callable_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"ldm-train", "ldm-txt2img", "ldm-img2img", "ldm-inpaint", "ldm-sample", "ldm-export"} <= set(scripts)
    for command, target in scripts.items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), command


def test_every_console_scripts_help_names_the_commands_as_installed(capsys, monkeypatch):
    # A wheel has no scripts/: run as `ldm-...`, the help's examples say `ldm-...`, not `python scripts/....py`.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    helps = {}
    for command, target in scripts.items():
        module, _, attribute = target.partition(":")
        monkeypatch.setattr(sys, "argv", [f"/venv/bin/{command}", "--help"])
        with pytest.raises(SystemExit) as exit_info:
            getattr(importlib.import_module(module), attribute)()
        assert exit_info.value.code in (0, None), command
        helps[command] = capsys.readouterr().out
        assert helps[command].startswith(f"usage: {command}"), command
        assert "python scripts/" not in helps[command] and "python main.py" not in helps[command], command
    assert "ldm-txt2img --prompt" in helps["ldm-txt2img"] and "ldm-train -r logs/<run>" in helps["ldm-train"]
    monkeypatch.setattr(sys, "argv", ["txt2img.py", "--help"])  # run from a checkout: as the docstring says
    with pytest.raises(SystemExit):
        importlib.import_module("ldm.cli.txt2img").cli()
    assert "python scripts/txt2img.py --prompt" in capsys.readouterr().out


def test_a_console_script_reports_user_errors_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ldm-txt2img", "--config", "/nonexistent/model"])
    from ldm.cli.txt2img import cli

    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert str(exit_info.value).startswith("error: no model config at /nonexistent/model/config.yaml")


def test_a_hub_repository_id_loads_its_model_directory(tmp_path, monkeypatch, tiny_txt2img_model):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, local_files_only))
        if repo_id != "someone/tiny-shapes":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")
        return str(tiny_txt2img_model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert load_model("someone/tiny-shapes").num_timesteps == 16
    assert calls[0] == ("someone/tiny-shapes", True)  # the cache is asked first
    with pytest.raises(ModelNotFound, match="nobody/nothing: no such local model directory or config, and not loadable"):
        load_model("nobody/nothing")
