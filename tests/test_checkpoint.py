"""Safe checkpoint reading, clear key errors, safetensors export."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import CheckpointError, load_state_dict, load_weights, save_safetensors

REPO = Path(__file__).resolve().parents[1]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_ckpt_with_state_dict_entry_and_safetensors_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({"state_dict": model.state_dict(), "global_step": 5}, tmp_path / "a.ckpt")
    sd = load_state_dict(tmp_path / "a.ckpt")
    assert torch.equal(sd["weight"], model.weight)
    save_safetensors(sd, tmp_path / "a.safetensors", metadata={"global_step": 5})
    back = load_state_dict(tmp_path / "a.safetensors")
    assert set(back) == {"weight", "bias"} and torch.equal(back["bias"], model.bias)


@pytest.mark.hostile
def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict(tmp_path / "evil.ckpt")


@pytest.mark.hostile
def test_missing_unexpected_and_shape_errors_list_keys():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    sd = model.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("1.")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, partial)
    assert "missing keys (2): 1.weight, 1.bias" in str(e.value) and "unexpected keys (1): extra.weight" in str(e.value)
    wrong = dict(sd, **{"0.weight": torch.zeros(5, 5)})
    with pytest.raises(CheckpointError, match=r"0.weight: checkpoint \(5, 5\) vs model \(2, 3\)"):
        load_weights(model, wrong)
    missing, unexpected = load_weights(model, {**sd, "loss.disc": torch.zeros(1)}, ignore_prefixes=("loss.",))
    assert missing == [] and unexpected == []


@pytest.mark.hostile
def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict("/nonexistent/x.ckpt")


def test_export_script_drops_loss_weights(tmp_path):
    torch.save({"state_dict": {"encoder.w": torch.ones(2), "loss.discriminator.w": torch.ones(3)}},
               tmp_path / "last.ckpt")
    subprocess.run([sys.executable, "scripts/export_weights.py", str(tmp_path / "last.ckpt")], cwd=REPO, check=True)
    assert set(load_state_dict(tmp_path / "last.safetensors")) == {"encoder.w"}


@pytest.mark.hostile
def test_export_never_replaces_its_checkpoint_nor_without_overwrite_an_earlier_export(tmp_path, monkeypatch):
    from ldm.cli import export_weights

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"encoder.w": torch.ones(2)}}, ckpt)
    original = ckpt.read_bytes()

    def export(*args):  # the console command in this process: its one-line error, or None when it worked
        monkeypatch.setattr(sys, "argv", ["ldm-export", str(ckpt), *args])
        try:
            export_weights.cli()
        except SystemExit as stop:
            return str(stop.code)
        return None

    for args in (["-o", str(ckpt)], ["-o", str(ckpt), "--overwrite"]):
        assert "is the checkpoint being exported" in export(*args)
    assert ckpt.read_bytes() == original
    earlier = tmp_path / "w.safetensors"
    earlier.write_bytes(b"earlier")
    assert "--overwrite to replace it" in export("-o", str(earlier)) and earlier.read_bytes() == b"earlier"
    assert export("-o", str(earlier), "--overwrite") is None
    assert set(load_state_dict(earlier)) == {"encoder.w"}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"a model")
    assert "already holds a model (model.safetensors)" in export("--model-dir", str(model_dir))
    assert (model_dir / "model.safetensors").read_bytes() == b"a model"


@pytest.mark.hostile
@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_a_damaged_safetensors_file_is_a_checkpoint_error_naming_it(tmp_path, damage):
    from ldm.checkpoint import CheckpointError, load_state_dict, save_safetensors

    path = save_safetensors({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello, not weights"}[damage])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors as safetensors"):
        load_state_dict(path)


@pytest.mark.hostile
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_weights_and_checkpoints_are_written_with_the_users_umask(tmp_path, umask):
    # As torch.save and open() create files; safetensors and mkstemp alone would make every file 0600.
    from ldm.divergence import atomic_torch_save

    previous = os.umask(umask)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        atomic_torch_save({"state_dict": {}}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "last.ckpt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
