"""A diverging run stops with a message and never writes non-finite weights; checkpoints are written atomically."""
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.callbacks import LastCheckpoint
from ldm.checkpoint import CheckpointError
from ldm.data.shapes import ShapesTrain
from ldm.divergence import SafeCheckpointIO, TrainingDiverged, non_finite_tensors, raise_if_not_finite
from ldm.util import instantiate_from_config
from tests.test_main import load_ckpt, run_main
from tests.test_main_diffusion import DIFFUSION_CONFIGS, FAST
from tests.tiny_models import txt2img_config


def test_a_non_finite_loss_is_named_with_its_terms():
    raise_if_not_finite(torch.tensor(0.5), {"train/loss": 0.5}, "global step 3")
    with pytest.raises(TrainingDiverged, match=r"loss is nan at global step 3; non-finite terms: \{'train/vlb': nan\}"):
        raise_if_not_finite(torch.tensor(float("nan")), {"train/simple": torch.tensor(0.1),
                                                        "train/vlb": torch.tensor(float("nan"))}, "global step 3")
    assert non_finite_tensors({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]),
                               "steps": torch.tensor([1, 2])}) == ["b"]


@pytest.mark.hostile
def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    io.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}, "global_step": 2}, path)
    assert load_ckpt(path)["global_step"] == 2
    good = path.read_bytes()
    with pytest.raises(TrainingDiverged, match=r"not writing .*last.ckpt: the weights or optimizer state are not "
                                               r"finite \(w\)"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert path.read_bytes() == good
    # Finite weights, but Adam's second moment overflowed: the next step would diverge from this checkpoint.
    adam = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3),
                          "exp_avg_sq": torch.tensor([1.0, float("inf"), 0.0])}}, "param_groups": [{"lr": 1e-3}]}
    with pytest.raises(TrainingDiverged, match=r"\(optimizer 0, parameter 0: exp_avg_sq\)"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "optimizer_states": [adam]}, path)
    assert path.read_bytes() == good

    def torn_save(obj, f):  # a kill (or a full disk) in the middle of writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    # A damaged file (cut short, as by a copy that did not finish) is named, not a traceback from deep in torch.
    (tmp_path / "cut.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut.ckpt .*damaged or not a checkpoint"):
        io.load_checkpoint(tmp_path / "cut.ckpt")
    assert io.load_checkpoint(path)["global_step"] == 2


def _fit(model, ckptdir: Path, steps: int) -> None:
    data = ShapesTrain(size=32, num_samples=8)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[LastCheckpoint(str(ckptdir))],
                         plugins=[SafeCheckpointIO()])
    trainer.fit(model, DataLoader(data, batch_size=4))


@pytest.mark.hostile
def test_a_diverging_fit_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = txt2img_config()["model"]
    model = instantiate_from_config(config)
    model.learning_rate = 1e-4
    _fit(model, tmp_path, steps=1)
    good = (tmp_path / "last.ckpt").read_bytes()
    assert not non_finite_tensors(load_ckpt(tmp_path / "last.ckpt")["state_dict"])

    diverging = instantiate_from_config(config)
    diverging.learning_rate = 1e12
    with pytest.raises(TrainingDiverged, match="global step"):
        _fit(diverging, tmp_path, steps=20)
    assert (tmp_path / "last.ckpt").read_bytes() == good


@pytest.mark.hostile
def test_main_stops_a_diverging_run_with_one_line(tmp_path):
    proc = run_main(["--base", DIFFUSION_CONFIGS["txt2img"], "-t", "--no-test", "--max_steps", "8", *FAST,
                     "lightning.callbacks.image_logger.params.disabled=true", "model.base_learning_rate=1e12"],
                    tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "learning rate" in errors[0], proc.stderr[-2000:]
    for ckpt in (tmp_path / "logs").glob("*/checkpoints/*.ckpt"):
        assert not non_finite_tensors(load_ckpt(ckpt)["state_dict"]), ckpt
