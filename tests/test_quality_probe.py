"""Quality probes (quality against training time) and the convergence benchmark's report."""
import csv
import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from ldm.evaluation.attribute_classifier import load_attribute_classifier
from ldm.evaluation.quality_probe import ReconstructionProbe, reconstruction_quality
from tests.test_main import load_ckpt, only_run, run_main
from tests.test_main_diffusion import DIFFUSION_CONFIGS, FAST


class _Autoencoder(nn.Module):
    """Stands in for a first stage: returns its input plus fixed noise, or a flat grey image."""

    def __init__(self, grey: bool = False) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.grey = grey

    def forward(self, x, sample_posterior=True):
        if self.grey:
            return torch.zeros_like(x), None
        return x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), None


@pytest.fixture(scope="module")
def classifier():
    return load_attribute_classifier()


def test_reconstruction_quality_tells_a_good_first_stage_from_a_useless_one(classifier):
    good = reconstruction_quality(_Autoencoder(), classifier, n_images=128, progress=False)
    grey = reconstruction_quality(_Autoencoder(grey=True), classifier, n_images=128, progress=False)
    # Noise of std 0.01 on [-1, 1] images is std 0.005 on [0, 1]: PSNR = -10 log10(0.005^2) = 46 dB.
    assert good["psnr"] == pytest.approx(46.0, abs=0.5)
    assert good["keep_colour"] > 0.97 and good["keep_shape"] > 0.95
    assert grey["keep_shape"] < 0.5 and grey["keep_colour"] < 0.5 and grey["keep_all"] < 0.1


def test_probe_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="every_minutes"):
        ReconstructionProbe(every_minutes=0)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_prompt_following_probe_in_a_training_run_and_its_clock_resumes(tmp_path):
    probe = ["lightning.callbacks.probe.target=ldm.evaluation.quality_probe.PromptFollowingProbe",
             "lightning.callbacks.probe.params.every_minutes=0.0001", "lightning.callbacks.probe.params.n_captions=4",
             "lightning.callbacks.probe.params.n_real=16", "lightning.callbacks.probe.params.steps=2",
             "lightning.callbacks.probe.params.label=test", "lightning.callbacks.image_logger.params.disabled=true"]
    args = ["-t", "--no-test", *FAST, *probe]
    proc = run_main(["--base", DIFFUSION_CONFIGS["txt2img"], "--max_steps", "2", *args], tmp_path)
    assert "[probe] step 1" in proc.stdout
    run = only_run(tmp_path)
    rows = _rows(run / "quality.csv")
    # Measured after steps 1 and 2 (every step is due), never twice at one step; both caption splits, each in the
    # canonical template and as typed prompts.
    sets = ["seen", "held_out", "seen_typed", "held_out_typed"]
    assert [(r["step"], r["split"]) for r in rows] == [(step, s) for step in ("1", "2") for s in sets]
    for row in rows:
        assert row["label"] == "test"
        assert 0.0 <= float(row["match_all"]) <= float(row["match_colour"]) <= 1.0
        assert math.isfinite(float(row["fid"])) and float(row["fid"]) > 0
    minutes = [float(r["train_minutes"]) for r in rows]
    assert minutes == sorted(minutes)
    state = load_ckpt(run / "checkpoints" / "last.ckpt")["callbacks"]
    saved = next(v for k, v in state.items() if "PromptFollowingProbe" in k)
    run_main(["-r", str(run), "--max_steps", "3", *args], tmp_path)
    resumed = _rows(run / "quality.csv")
    assert [r["step"] for r in resumed[8:]] == ["3"] * 4
    # The training clock goes on from where the first fit stopped.
    assert float(resumed[8]["train_minutes"]) >= saved["train_seconds"] / 60.0 - 0.01


def test_convergence_report_from_stored_runs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("convergence", "bench/convergence.py")
    convergence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convergence)
    monkeypatch.setattr(convergence, "RESULTS", tmp_path)
    monkeypatch.setattr(convergence, "RUNS", tmp_path / "convergence")
    (tmp_path / "convergence").mkdir()
    header = "label,step,train_minutes,split,match_all,match_shape,match_colour,match_size,match_position,match_num_objects,fid\n"
    (tmp_path / "convergence" / "a.csv").write_text(
        header + "a,10,1.0,seen,0.1,0.2,0.3,0.4,0.5,0.6,100\na,10,1.0,held_out,0.05,0.2,0.3,0.4,0.5,0.6,200\n"
        "a,20,2.0,seen,0.3,0.4,0.5,0.6,0.7,0.8,50\na,20,2.0,held_out,0.1,0.2,0.3,0.4,0.5,0.6,150\n")
    # b continues a's weights, c continues b's: each counted from its parent's end, in steps and in minutes
    (tmp_path / "convergence" / "b.csv").write_text(header + "b,5,0.5,seen,0.4,0.5,0.6,0.7,0.8,0.9,40\n")
    (tmp_path / "convergence" / "c.csv").write_text(header + "c,5,0.25,seen,0.5,0.5,0.6,0.7,0.8,0.9,30\n")
    run = {"config": "x.yaml", "overrides": [], "wall_seconds": 1, "machine": {}}
    (tmp_path / "convergence" / "runs.json").write_text(json.dumps(
        {"a": {**run, "steps": 20, "parent": None, "start_step": 0},
         "b": {**run, "steps": 5, "parent": "a", "start_step": 20},
         "c": {**run, "steps": 5, "parent": "b", "start_step": 25}}))
    (tmp_path / "convergence" / "fs.csv").write_text(
        "label,step,train_minutes,split,psnr,ssim,keep_shape,keep_colour,keep_all\n"
        "fs,100,3.0,held_out,29.5,0.91,0.9,0.99,0.85\n")
    (tmp_path / "convergence" / "real_images.json").write_text(
        '{"seen": {"match_all": 1.0, "match_shape": 1.0, "match_colour": 1.0, "match_size": 1.0, '
        '"match_position": 1.0, "match_num_objects": 1.0, "fid": 95.0}}')
    convergence.write_report()
    md = (tmp_path / "convergence.md").read_text()
    assert "| real images | seen | - | - | - | - | 100 % | 100 % | 100 % | 100 % | 100 % | 100 % | 95.0 |" in md
    assert "| a | seen | 2.0 | 20 | 2.0 | 20 | 30 % | 40 % | 50 % | 60 % | 70 % | 80 % | 50.0 |" in md
    assert "| b | seen | 2.5 | 25 | 0.5 | 5 | 40 % |" in md
    assert "| c | seen | 2.8 | 30 | 0.2 | 5 | 50 % |" in md  # 2.0 + 0.5 + 0.25 minutes
    assert convergence.parent_end("c", convergence.read_rows(), json.loads(
        (tmp_path / "convergence" / "runs.json").read_text())) == (30, 2.75)
    assert "| fs | 3.0 | 100 | 29.50 | 0.910 | 90.0 % | 99.0 % | 85.0 % |" in md
    assert len(_rows(tmp_path / "convergence.csv")) == 7  # the runs' rows; real images are in the table only
    assert (tmp_path / "convergence.png").stat().st_size > 10_000


def test_convergence_resume_continues_the_labels_latest_run(tmp_path, monkeypatch):
    """`--resume` runs `main.py -r` on the label's latest run directory and keeps its probe rows; with no run to
    continue it stops with a one-line message."""
    spec = importlib.util.spec_from_file_location("convergence", "bench/convergence.py")
    convergence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convergence)
    config = convergence.REPO / "configs" / "latent-diffusion" / "txt2img.yaml"
    monkeypatch.setattr(convergence, "REPO", tmp_path)
    monkeypatch.setattr(convergence, "RUNS", tmp_path / "runs")
    opt = convergence.argparse.Namespace(config=str(config), label="x", steps=100, every_steps=50, n_captions=4,
                                         note="", parent=None, overrides=[], resume=True)
    with pytest.raises(SystemExit, match="no run named"):
        convergence.train(opt)
    older = tmp_path / "logs" / "convergence" / "2026-01-01T00-00-00_conv_x"
    latest = tmp_path / "logs" / "convergence" / "2026-01-02T00-00-00_conv_x"
    for run in (older, latest):
        run.mkdir(parents=True)
    (latest / "quality.csv").write_text("label,step,train_minutes,split,match_all\nx,50,1.0,seen,0.5\n")
    commands, real_run, status = [], convergence.subprocess.run, [0]

    def run(cmd, **kwargs):  # records main.py; anything else (platform.platform() asks uname) runs
        if "main.py" not in cmd:
            return real_run(cmd, **kwargs)
        commands.append(cmd)
        return convergence.subprocess.CompletedProcess(cmd, status[0])

    monkeypatch.setattr(convergence.subprocess, "run", run)
    convergence.train(opt)
    assert commands == [[convergence.sys.executable, "main.py", "-r", str(latest), "--max_steps", "100"]]
    assert (tmp_path / "runs" / "x.csv").read_text().endswith("x,50,1.0,seen,0.5\n")
    settings = convergence.json.loads((tmp_path / "runs" / "runs.json").read_text())["x"]
    assert settings["resumed"] is True and settings["run_dir"] == str(latest.relative_to(tmp_path))
    # a finished run trained on to more steps: the recorded part's wall time is kept in the sum
    settings["wall_seconds"] = 1000.0
    (tmp_path / "runs" / "runs.json").write_text(convergence.json.dumps({"x": settings}))
    opt.steps = 200
    convergence.train(opt)
    assert commands[-1][-2:] == ["--max_steps", "200"]
    settings = convergence.json.loads((tmp_path / "runs" / "runs.json").read_text())["x"]
    assert settings["steps"] == 200 and 1000.0 <= settings["wall_seconds"] < 1010.0
    status[0] = 128 + 15  # stopped again by SIGTERM: one line that says how to go on
    with pytest.raises(SystemExit, match="status 143.*--resume"):
        convergence.train(opt)
