"""Released CompVis / Stable Diffusion `.ckpt` files load weights-only, and nothing else in a pickle runs.

Those files were written by PyTorch Lightning 1.x: beside `state_dict` they hold the callback states keyed by
the callback classes themselves (Lightning's ModelCheckpoint and the reference main.py's callbacks), numpy
scalars, and the optimizer and scheduler states. The files here are written the same way.
"""
import collections
import os
import sys
import types

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.inference import load_model, text_to_image


@pytest.fixture
def reference_main(monkeypatch):
    """A module named `main` with the reference's callback classes, so pickles name `main.SetupCallback`."""
    module = types.ModuleType("main")
    for name in ("SetupCallback", "ImageLogger", "CUDACallback"):
        setattr(module, name, type(name, (), {"__module__": "main"}))
    monkeypatch.setitem(sys.modules, "main", module)
    return module


def lightning_1_checkpoint(state_dict, main_module, extra_callback_state=None):
    """The layout of a released Lightning-1.x-era checkpoint around `state_dict`."""
    return {
        "epoch": 17,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": collections.OrderedDict(state_dict),
        "callbacks": {
            ModelCheckpoint: {"monitor": "val/loss_simple_ema", "best_model_score": torch.tensor(0.0921),
                              "best_model_path": "logs/2021-12-01T12-00-00_txt2img/checkpoints/epoch=000017.ckpt",
                              "current_score": np.float64(0.0934), "dirpath": "logs/x/checkpoints",
                              "kth_value": np.float32(0.1), "best_k_models": {"epoch=000017.ckpt": np.float64(0.09)}},
            main_module.SetupCallback: extra_callback_state or {"now": "2021-12-01T12-00-00", "epoch_steps": np.int64(3)},
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                              "weight_decay": 0.01, "params": [0, 1]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 470000, "_step_count": 470001, "lr_lambdas": [None]}],
    }


def test_a_released_style_checkpoint_loads_weights_only_and_samples(tmp_path, tiny_txt2img_model, reference_main):
    weights = load_file(str(tiny_txt2img_model / "model.safetensors"))
    path = tmp_path / "model.ckpt"
    torch.save(lightning_1_checkpoint(weights, reference_main), path)
    # The layout is the real thing: a plain weights-only load refuses it.
    with pytest.raises(Exception, match="ModelCheckpoint|main"):
        torch.load(path, weights_only=True)
    state = load_state_dict(path)
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    model = load_model(tiny_txt2img_model / "config.yaml", path)  # `--config config.yaml --ckpt model.ckpt`
    images = text_to_image(model, ["a red circle"], steps=2, seed=0, progress=False)
    assert torch.isfinite(images).all()


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_variant_is_refused_by_name_and_runs_nothing(tmp_path, tiny_txt2img_model, reference_main):
    marker = tmp_path / "pwned"
    weights = load_file(str(tiny_txt2img_model / "model.safetensors"))
    path = tmp_path / "model.ckpt"
    torch.save(lightning_1_checkpoint(weights, reference_main, {"now": RunsCode(marker)}), path)
    with pytest.raises(CheckpointError, match=rf"model\.ckpt.*names {os.system.__module__}\.system, which is not allowed"):
        load_state_dict(path)
    assert not marker.exists()
