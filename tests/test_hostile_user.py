"""A careless or hostile user's inputs: each ends in one line that names the problem and the fix, before any work
is done or anything already written is touched (issue 28's list). The rest of the hostile-user suite lives beside
the code it exercises, marked `hostile` as these are (`pytest -m hostile` runs the whole suite): kill/resume and
concurrent resume (test_main.py), malicious configs and pickles (test_safe_loading.py, test_main.py), outputs that
never replace inputs (test_scripts_inpaint_interpolate.py), export over its own checkpoint and damaged files
(test_checkpoint.py), divergence (test_divergence.py)."""
import shutil
import subprocess
import sys

import pytest

from ldm.data.folder import ImageFolderDataset
from tests.helpers import REPO, load_script

pytestmark = pytest.mark.hostile

UNWRITABLE = "/proc/ldm-out"  # not writable even as root
NOT_UTF8 = "a red circle \xe9".encode("latin-1")


def usage_error(capsys, script: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_negative_grid_width_is_refused_before_any_sample_is_written(capsys, tmp_path):
    line = usage_error(capsys, "txt2img", ["--n_rows", "-2", "--outdir", str(tmp_path)])
    assert "--n_rows: -2 is negative" in line and not any(tmp_path.iterdir())


def test_a_prompt_file_that_is_not_utf8_is_named(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(NOT_UTF8)
    line = usage_error(capsys, "txt2img", ["--from-file", str(prompts), "--outdir", str(tmp_path / "out")])
    assert f"--from-file {prompts} is not UTF-8 text (byte 0xe9 at offset 13); save it as UTF-8" in line


def test_a_caption_file_that_is_not_utf8_is_named(tmp_path):
    shutil.copy(REPO / "data/inpainting_examples/shapes_test_000.png", tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(NOT_UTF8)
    with pytest.raises(ValueError, match=r"a\.txt is not UTF-8 text"):
        ImageFolderDataset(str(tmp_path), size=32, caption_source="txt")


def test_export_to_a_place_it_cannot_write_stops_before_reading_the_checkpoint(tmp_path, monkeypatch):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"never read")
    for flag in ("-o", "--model-dir"):
        target = f"{UNWRITABLE}/model.safetensors" if flag == "-o" else UNWRITABLE
        monkeypatch.setattr(sys, "argv", ["ldm-export", str(checkpoint), flag, target])
        with pytest.raises(SystemExit) as exit_info:
            load_script("export_weights").cli()
        assert str(exit_info.value).startswith(f"error: {flag} ") and "cannot write there" in str(exit_info.value)


def test_convert_to_a_place_it_cannot_write_stops_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ldm-convert-diffusers", "--to-diffusers", "txt2img", "--outdir", UNWRITABLE])
    with pytest.raises(SystemExit) as exit_info:
        load_script("convert_diffusers").cli()
    assert str(exit_info.value).startswith(f"error: --outdir {UNWRITABLE}: cannot write there")


def test_resuming_from_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    run = tmp_path / "logs" / "2026-01-01T00-00-00_a"
    (run / "csv").mkdir(parents=True)
    (run / "csv" / "metrics.csv").write_text("step,loss\n0,1.0\n")
    proc = subprocess.run([sys.executable, "main.py", "-r", str(run / "csv" / "metrics.csv")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot resume {run}: its configs/ folder has no saved" in proc.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_a_folder_whose_every_image_is_unreadable_is_one_line(tmp_path, workers):
    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        for name in ("a.png", "b.png"):
            (tmp_path / split / name).write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "main.py", "--base", "configs/autoencoder/autoencoder_kl_f4_folder32.yaml",
                           "-t", "--no-test", "--max_steps", "2", "-l", str(tmp_path / "logs"),
                           f"data.params.num_workers={workers}", "data.params.batch_size=2",
                           f"data.params.train.params.root={tmp_path / 'train'}",
                           f"data.params.validation.params.root={tmp_path / 'validation'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-2] == (f"error: none of the 2 images under {tmp_path / 'validation'} could be read (see the "
                         "warnings above); replace the damaged files or point 'root' at another folder"), lines[-2:]


def test_a_checkpoint_write_that_finds_the_disk_full_keeps_the_old_one_and_says_how_to_go_on(tmp_path, monkeypatch):
    """The disk fills while a checkpoint is written (here every write goes to /dev/full, which fails as a full disk
    does): the checkpoint already there stays whole, no temporary file is left, and the error names the file and
    the way on. (Checked by hand on a real, small tmpfs: main.py ends with this line and `-r` goes on.)"""
    import os
    import tempfile

    import torch

    from ldm import divergence
    from ldm.checkpoint import is_disk_full
    from ldm.cli.train import disk_full_message

    run = tmp_path / "logs" / "2026-01-01T00-00-00_run"
    last = run / "checkpoints" / "last.ckpt"
    divergence.atomic_torch_save({"global_step": 4}, last)
    real_mkstemp = tempfile.mkstemp

    def full_disk(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(divergence.tempfile, "mkstemp", full_disk)
    with pytest.raises(OSError) as error:
        divergence.atomic_torch_save({"global_step": 8, "weights": torch.zeros(100_000)}, last)
    assert is_disk_full(error.value) and error.value.filename == str(last)
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert disk_full_message(error.value).startswith(f"no space left on the disk writing {last}: free some space, "
                                                     f"then resume with: python main.py -r {run}.")
    last.unlink()
    assert f"then start it again (it had saved no checkpoint; remove {run} first)" in disk_full_message(error.value)


def _can_mount_tmpfs() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="this machine lets no process mount a tmpfs of its own")
def test_training_into_a_disk_that_fills_up_ends_in_one_line_and_resumes_once_there_is_room(tmp_path):
    """A real full disk: the run's --logdir on a 40 MiB tmpfs (in a mount namespace of the test's own), where the
    step-4 checkpoints fit (two of 14 MiB: the KL first stage carries its LPIPS network) and those of step 8 do
    not. Then the tmpfs grows, as when the user frees space, and `-r` alone finishes the run."""
    logs = tmp_path / "logs"
    logs.mkdir()
    fast = ("data.params.batch_size=4 data.params.num_workers=0 data.params.train.params.num_samples=64 "
            "data.params.validation.params.num_samples=8 lightning.callbacks.image_logger.params.disabled=true "
            "--limit_val_batches 1 --val_check_interval 4 --enable_model_summary false")
    script = f"""
        mount -t tmpfs -o size=40m tmpfs {logs}
        {sys.executable} main.py --base configs/autoencoder/autoencoder_kl_shapes_f4.yaml -t --no-test \
            --max_steps 12 {fast} -l {logs} 2> {tmp_path}/first.err
        echo "first: $?"
        mount -o remount,size=200m {logs}
        {sys.executable} main.py -r $(ls -d {logs}/*/) 2> {tmp_path}/second.err
        echo "second: $?"
        {sys.executable} -c "import torch, glob; print('step', torch.load(glob.glob('{logs}/*/checkpoints/last.ckpt')[0], weights_only=True)['global_step'])"
    """
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    first = (tmp_path / "first.err").read_text()
    assert "first: 1" in proc.stdout and "Traceback" not in first, first[-3000:]
    line = first.strip().splitlines()[-1]
    assert line.startswith(f"error: no space left on the disk writing {logs}/") and "/checkpoints/" in line
    assert "then resume with: python main.py -r" in line
    assert "second: 0" in proc.stdout, (tmp_path / "second.err").read_text()[-3000:]
    assert "step 12" in proc.stdout
