"""A quiet console: the sampling commands print what they wrote and warnings; the library's messages (what was
loaded, the sampler's timesteps, the EMA) only with --verbose. Training prints its run's messages."""
from __future__ import annotations

import logging
import sys

import pytest

from ldm.cli import txt2img
from ldm.console import configure_logging

LIBRARY_MESSAGES = ("ddim sampler: 4 steps from σ = ",)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_sampling_is_quiet_unless_verbose(tmp_path, tiny_txt2img_model, capsys, monkeypatch, restore_logging):
    args = ["txt2img", "--config", str(tiny_txt2img_model), "--n_samples", "1", "--steps", "4", "--skip_grid",
            "--prompt", "a red circle"]
    monkeypatch.setattr(sys, "argv", [*args, "--outdir", str(tmp_path / "quiet")])
    txt2img.cli()
    quiet = capsys.readouterr().out
    assert "samples: " in quiet and not any(message in quiet for message in LIBRARY_MESSAGES), quiet
    assert "[ldm]" not in quiet

    monkeypatch.setattr(sys, "argv", [*args, "--outdir", str(tmp_path / "verbose"), "--verbose"])
    txt2img.cli()
    verbose = capsys.readouterr().out
    assert all(f"[ldm] {message}" in verbose for message in LIBRARY_MESSAGES), verbose


def test_log_lines_name_the_toolkit_and_follow_a_redirected_stdout(capsys, restore_logging):
    configure_logging(logging.INFO)
    logging.getLogger("ldm.models.diffusion.ddpm").info("scale_factor 0.2")
    logging.getLogger("pytorch_lightning.trainer").info("GPU available: False")
    logging.getLogger("ldm.util").debug("not shown at INFO")
    assert capsys.readouterr().out == "[ldm] scale_factor 0.2\n[pytorch_lightning.trainer] GPU available: False\n"
