"""The sampling scripts end to end on tiny random-weight models: files, numbering, sizes, seeds, errors.

Each script runs once as a real subprocess (the three start together: importing Lightning dominates their
time); the further runs and the error cases call the same `main(argv)` in this process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from ldm.visualization import make_grid
from tests.tiny_models import txt2img_config, write_model_dir
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
STEPS = "4"  # few DDIM steps; 4 divides the tiny models' 16 timesteps into a valid uniform schedule
TRAIN_SIZE = 32  # the tiny models' training resolution in pixels



def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def grid_size(rows: int, columns: int, height: int = TRAIN_SIZE, width: int = TRAIN_SIZE) -> tuple[int, int]:
    """(width, height) of a PNG grid of rows x columns images, as PIL reports it."""
    grid = make_grid(torch.zeros(rows * columns, 3, height, width), nrow=columns)
    return grid.shape[2], grid.shape[1]


def run_error(capsys, script: ModuleType, argv: list[str]) -> str:
    """The usage error `script` exits with for `argv` (its stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_class_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("script_inputs")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle above a blue square\n\n   \na green triangle\n")
    init = root / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(init)
    # A training run as main.py writes it: configs/<now>-project.yaml and checkpoints/last.ckpt.
    run = root / "logs" / "2026-01-01T00-00-00_class2img"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    project_config = run / "configs" / "2026-01-01T00-00-00-project.yaml"
    OmegaConf.save(OmegaConf.load(tiny_class_model / "config.yaml"), project_config)
    torch.save({"state_dict": load_file(tiny_class_model / "model.safetensors"), "global_step": 7},
               run / "checkpoints" / "last.ckpt")
    return {"prompts": prompts, "init": init, "run": run, "out": root / "out"}


@pytest.fixture(scope="module")
def cli_runs(inputs, tiny_txt2img_model) -> dict[str, subprocess.CompletedProcess]:
    """One subprocess run of each script, started together."""
    out = inputs["out"]
    commands = {
        "txt2img": ["--config", str(tiny_txt2img_model), "--from-file", str(inputs["prompts"]), "--n_samples", "3",
                    "--n_iter", "2", "--steps", STEPS, "--seed", "5", "--outdir", str(out / "txt2img")],
        "img2img": ["--config", str(tiny_txt2img_model), "--init-img", str(inputs["init"]), "--n_samples", "2",
                    "--steps", STEPS, "--strength", "0.5", "--outdir", str(out / "img2img")],
        "sample_diffusion": ["-r", str(inputs["run"]), "-n", "5", "--batch_size", "2", "-c", STEPS],
    }
    # One thread each: three processes share the cores, and the in-process rerun below must match bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {
        name: subprocess.Popen([sys.executable, f"scripts/{name}.py", *argv], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, argv in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert process.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
    return results


# ---------------------------------------------------------------------------------------------- txt2img


def test_txt2img_writes_numbered_samples_and_grid(cli_runs, inputs):
    out = inputs["out"] / "txt2img"
    samples = sorted((out / "samples").iterdir())
    # 2 prompts (blank lines skipped) x 2 iterations x 3 samples.
    assert [p.name for p in samples] == [f"{i:05d}.png" for i in range(12)]
    assert all(Image.open(p).size == (TRAIN_SIZE, TRAIN_SIZE) for p in samples)
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png"]
    # A row per prompt and iteration, a column per sample.
    assert Image.open(out / "grid-0000.png").size == grid_size(rows=4, columns=3)
    assert str(out / "samples") in cli_runs["txt2img"].stdout
    assert str(out / "grid-0000.png") in cli_runs["txt2img"].stdout


def test_txt2img_second_run_continues_numbering_and_same_seed_repeats(cli_runs, inputs, tiny_txt2img_model):
    out = inputs["out"] / "txt2img"
    load_script("txt2img").main(["--config", str(tiny_txt2img_model), "--from-file", str(inputs["prompts"]),
                                 "--n_samples", "3", "--n_iter", "2", "--steps", STEPS, "--seed", "5",
                                 "--outdir", str(out)])
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"{i:05d}.png" for i in range(24)]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    first, second = ([pixels(out / "samples" / f"{i:05d}.png") for i in block] for block in (range(12), range(12, 24)))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pixels(out / "grid-0000.png"), pixels(out / "grid-0001.png"))
    # Batches get their own seeds: the two prompts' batches and the two iterations differ.
    assert not np.array_equal(first[0], first[3]) and not np.array_equal(first[0], first[6])


def test_txt2img_larger_than_training_size(tmp_path, tiny_txt2img_model):
    load_script("txt2img").main(["--config", str(tiny_txt2img_model), "--n_samples", "1", "--steps", STEPS,
                                 "--H", "48", "--W", "64", "--skip_grid", "--outdir", str(tmp_path)])
    assert Image.open(tmp_path / "samples" / "00000.png").size == (64, 48)
    assert not list(tmp_path.glob("grid-*.png"))


def test_samples_carry_how_they_were_made_in_their_png_text(tmp_path, tiny_txt2img_model):
    load_script("txt2img").main(["--config", str(tiny_txt2img_model), "--n_samples", "2", "--steps", STEPS,
                                 "--prompt", "a red circle", "--negative_prompt", "blue", "--scale", "2.5",
                                 "--sampler", "euler", "--seed", "7", "--outdir", str(tmp_path)])
    model_hash = hashlib.sha256((tiny_txt2img_model / "model.safetensors").read_bytes()).hexdigest()[:10]
    for index in (0, 1):
        text = Image.open(tmp_path / "samples" / f"0000{index}.png").text
        assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "sampler", "steps", "scale", "model",
                                     "batch_index", "size", "model_hash")} == {
            "prompt": "a red circle", "negative_prompt": "blue", "seed": str(7 + index), "sampler": "euler", "steps": STEPS,
            "scale": "2.5", "model": str(tiny_txt2img_model), "batch_index": str(index), "size": "32x32",
            "model_hash": model_hash}
        assert text["software"].startswith("ldm ")
        # AUTOMATIC1111's `parameters` text, which ComfyUI, civitai and image viewers read.
        prompt, negative, settings = text["parameters"].split("\n")
        assert prompt == "a red circle" and negative == "Negative prompt: blue"
        assert settings.startswith(f"Steps: {STEPS}, Sampler: Euler, CFG scale: 2.5, Seed: {7 + index}, Size: 32x32, "
                                   f"Model hash: {model_hash}, Model: {tiny_txt2img_model}")
    grid = Image.open(tmp_path / "grid-0000.png").text  # the grid too: its first image's settings, every prompt
    assert grid["seed"] == "7" and grid["model_hash"] == model_hash and json.loads(grid["prompts"]) == ["a red circle"]
    assert grid["size"] == "70x36" and grid["parameters"].startswith("a red circle\n")


def test_a_samples_seed_remakes_it_alone_and_fixed_code_repeats_the_start_noise(tmp_path, tiny_txt2img_model):
    txt2img = load_script("txt2img")
    common = ["--config", str(tiny_txt2img_model), "--steps", STEPS, "--prompt", "a red circle", "--skip_grid"]
    txt2img.main([*common, "--n_samples", "3", "--n_iter", "2", "--seed", "10", "--outdir", str(tmp_path / "run")])
    fifth = Image.open(tmp_path / "run" / "samples" / "00004.png")
    assert fifth.text["seed"] == "14"
    txt2img.main([*common, "--n_samples", "1", "--seed", "14", "--outdir", str(tmp_path / "alone")])
    assert np.abs(pixels(tmp_path / "alone" / "samples" / "00000.png").astype(int) - np.asarray(fifth).astype(int)).max() <= 1
    txt2img.main([*common, "--n_samples", "2", "--n_iter", "2", "--fixed_code", "--outdir", str(tmp_path / "fixed")])
    fixed = [pixels(tmp_path / "fixed" / "samples" / f"0000{i}.png") for i in range(4)]
    assert np.array_equal(fixed[0], fixed[2]) and np.array_equal(fixed[1], fixed[3]) and not np.array_equal(fixed[0], fixed[1])


@pytest.mark.parametrize("outdir", ["/proc/ldm-out", "file"])
def test_an_unwritable_outdir_fails_before_the_model_loads(tmp_path, outdir, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["txt2img.py", "--config", "/nonexistent/model", "--outdir", f"{outdir}/x"])
    with pytest.raises(SystemExit) as exit_info:
        load_script("txt2img").cli()
    assert str(exit_info.value).startswith(f"error: --outdir {outdir}/x: cannot write there")  # not the model's error


def test_n_rows_sets_the_grids_columns(tmp_path, tiny_txt2img_model):
    load_script("txt2img").main(["--config", str(tiny_txt2img_model), "--n_samples", "4", "--n_rows", "2",
                                 "--steps", STEPS, "--skip_save", "--outdir", str(tmp_path)])
    assert Image.open(tmp_path / "grid-0000.png").size == grid_size(rows=2, columns=2)


def test_txt2img_skip_save_writes_only_the_grid(tmp_path, tiny_txt2img_model):
    load_script("txt2img").main(["--config", str(tiny_txt2img_model), "--n_samples", "2", "--steps", STEPS,
                                 "--skip_save", "--outdir", str(tmp_path)])
    assert not (tmp_path / "samples").exists()
    assert Image.open(tmp_path / "grid-0000.png").size == grid_size(rows=1, columns=2)


def test_txt2img_size_not_a_multiple_of_the_downsampling_factor(capsys, tmp_path, tiny_txt2img_model):
    err = run_error(capsys, load_script("txt2img"), ["--config", str(tiny_txt2img_model), "--H", "30",
                                                     "--outdir", str(tmp_path)])
    assert "--H/--W" in err and "height 30 is not a multiple" in err
    assert not tmp_path.joinpath("samples").exists()


def test_txt2img_prompt_file_missing_or_empty(capsys, tmp_path):
    txt2img = load_script("txt2img")
    err = run_error(capsys, txt2img, ["--from-file", str(tmp_path / "absent.txt")])
    assert "--from-file" in err and "no such file" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "has no prompts" in run_error(capsys, txt2img, ["--from-file", str(empty)])


# ---------------------------------------------------------------------------------------------- img2img


def test_img2img_resizes_to_training_size_and_writes_grid(cli_runs, inputs):
    out = inputs["out"] / "img2img"
    samples = sorted((out / "samples").iterdir())
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
    # The 50x40 init image comes back at the model's training size.
    assert all(Image.open(p).size == (TRAIN_SIZE, TRAIN_SIZE) for p in samples)
    assert Image.open(out / "grid-0000.png").size == grid_size(rows=1, columns=2)
    assert str(out / "grid-0000.png") in cli_runs["img2img"].stdout


def test_img2img_bad_inputs(capsys, tmp_path, tiny_txt2img_model, monkeypatch):
    img2img = load_script("img2img")
    model = ["--config", str(tiny_txt2img_model), "--outdir", str(tmp_path)]
    err = run_error(capsys, img2img, [*model, "--init-img", str(tmp_path / "absent.png")])
    assert "--init-img" in err and "no image at" in err
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    err = run_error(capsys, img2img, [*model, "--init-img", str(broken)])
    assert "--init-img" in err and "cannot read" in err
    for strength in ("0", "1.5"):
        err = run_error(capsys, img2img, [*model, "--init-img", str(broken), "--strength", strength])
        assert "--strength" in err and "not in (0, 1]" in err
    # Every shipped sampler can start midway (ddpm too); one registered without that is refused before any work.
    from ldm.models.diffusion import samplers

    monkeypatch.setitem(samplers.SAMPLERS, "from_noise_only",
                        dataclasses.replace(samplers.SAMPLERS["euler"], name="from_noise_only", starts_midway=False))
    err = run_error(capsys, img2img, [*model, "--init-img", str(broken), "--sampler", "from_noise_only"])
    assert "--sampler from_noise_only" in err and "midway" in err
    assert not tmp_path.joinpath("samples").exists()


# ---------------------------------------------------------------------------------------------- sample_diffusion


def test_sample_diffusion_from_a_run_directory(cli_runs, inputs, tiny_class_model):
    # -r logs/<run>: outputs under <run>/samples/<global step>/<timestamp>/ as the reference.
    (outdir,) = (inputs["run"] / "samples" / "00000007").iterdir()
    assert sorted(p.name for p in (outdir / "img").iterdir()) == [f"sample_{i:06}.png" for i in range(5)]
    with np.load(outdir / "numpy" / "samples_5x32x32x3.npz") as npz:
        arrays, labels = npz["arr_0"], npz["labels"]
    assert arrays.dtype == np.uint8 and arrays.shape == (5, TRAIN_SIZE, TRAIN_SIZE, 3)
    np.testing.assert_array_equal(arrays[3], pixels(outdir / "img" / "sample_000003.png"))
    # No --class_label: all classes in turn.
    n_classes = OmegaConf.load(tiny_class_model / "config.yaml").model.params.cond_stage_config.params.n_classes
    assert labels.tolist() == [i % n_classes for i in range(5)]
    stdout = cli_runs["sample_diffusion"].stdout
    assert re.search(r"5 samples in [\d.]+ s: [\d.]+ samples/s, [\d.]+ s per U-Net evaluation", stdout)
    assert (outdir / "sampling_config.yaml").is_file()


def test_sample_diffusion_class_labels_guidance_and_vanilla(tmp_path, tiny_class_model):
    load_script("sample_diffusion").main(["--config", str(tiny_class_model), "-n", "3", "--batch_size", "3",
                                          "--class_label", "2", "--class_label", "1", "--scale", "2", "-v",
                                          "-l", str(tmp_path)])
    # A weights-only model has no global step: <logdir>/samples/<timestamp>/.
    (outdir,) = (tmp_path / "samples").iterdir()
    with np.load(outdir / "numpy" / "samples_3x32x32x3.npz") as npz:
        assert npz["labels"].tolist() == [2, 1, 2]
        assert npz["arr_0"].shape == (3, TRAIN_SIZE, TRAIN_SIZE, 3)
    assert OmegaConf.load(outdir / "sampling_config.yaml").sampler == "ddpm"


def test_sample_diffusion_bad_inputs(capsys, tmp_path, tiny_class_model, tiny_txt2img_model):
    sample_diffusion = load_script("sample_diffusion")
    assert "no model given" in run_error(capsys, sample_diffusion, [])
    err = run_error(capsys, sample_diffusion, ["-r", str(tmp_path / "no_run")])
    assert "does not exist" in err
    err = run_error(capsys, sample_diffusion, ["--config", str(tiny_class_model), "--class_label", "99",
                                               "-l", str(tmp_path)])
    assert "--class_label [99]" in err and "classes 0 to" in err
    err = run_error(capsys, sample_diffusion, ["--config", str(tiny_txt2img_model), "--class_label", "1",
                                               "-l", str(tmp_path)])
    assert "text-conditional" in err and "--from-file" in err
    assert not any(tmp_path.iterdir())


def test_sample_diffusion_text_model_for_metrics(tmp_path, tiny_txt2img_model):
    """USER-NEEDS 14: text-conditional batch sampling, prompts from a file or the built-in validation captions."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\n")
    sample_diffusion = load_script("sample_diffusion")
    sample_diffusion.main(["--config", str(tiny_txt2img_model), "-n", "3", "--steps", "4", "--scale", "2",
                           "--from-file", str(prompts), "-l", str(tmp_path / "file")])
    (outdir,) = (tmp_path / "file" / "samples").iterdir()
    with np.load(outdir / "numpy" / "samples_3x32x32x3.npz") as npz:
        assert npz["captions"].tolist() == ["a red circle", "a blue star", "a red circle"]
    sample_diffusion.main(["--config", str(tiny_txt2img_model), "-n", "2", "--steps", "4",
                           "-l", str(tmp_path / "builtin")])
    (outdir,) = (tmp_path / "builtin" / "samples").iterdir()
    from ldm.data.shapes import ShapesValidation
    with np.load(outdir / "numpy" / "samples_2x32x32x3.npz") as npz:
        assert npz["captions"].tolist() == [ShapesValidation(size=8)[i]["caption"] for i in range(2)]


def unconditional_config() -> dict:
    """The tiny text-to-image model without its condition: a U-Net with self-attention only."""
    config = txt2img_config()
    params = config["model"]["params"]
    for key in ("cond_stage_key", "cond_stage_trainable", "ucg_training", "conditioning_key"):
        params.pop(key)
    params["cond_stage_config"] = "__is_unconditional__"
    unet = params["unet_config"]["params"]
    unet["use_spatial_transformer"] = False
    unet.pop("context_dim")
    unet.pop("transformer_depth")
    return config


def test_sample_diffusion_unconditional(capsys, tmp_path):
    model = write_model_dir(tmp_path / "model", unconditional_config())
    sample_diffusion = load_script("sample_diffusion")
    err = run_error(capsys, sample_diffusion, ["--config", str(model), "--class_label", "1", "-l", str(tmp_path)])
    assert "need a class-conditional model" in err
    sample_diffusion.main(["--config", str(model), "-n", "2", "-c", STEPS, "-l", str(tmp_path / "out")])
    (outdir,) = (tmp_path / "out" / "samples").iterdir()
    with np.load(outdir / "numpy" / "samples_2x32x32x3.npz") as npz:
        assert npz.files == ["arr_0"] and npz["arr_0"].dtype == np.uint8
    assert sorted(p.name for p in (outdir / "img").iterdir()) == ["sample_000000.png", "sample_000001.png"]


def test_txt2img_and_img2img_negative_prompt(tmp_path, tiny_txt2img_model, inputs):
    """--negative_prompt changes guided samples; the same run without it is the plain guided one."""
    def txt2img(name: str, *extra: str) -> np.ndarray:
        load_script("txt2img").main(["--config", str(tiny_txt2img_model), "--n_samples", "1", "--steps", STEPS,
                                     "--skip_grid", "--outdir", str(tmp_path / name), *extra])
        return pixels(tmp_path / name / "samples" / "00000.png")

    plain = txt2img("plain")
    np.testing.assert_array_equal(txt2img("empty", "--negative_prompt", ""), plain)
    assert not np.array_equal(txt2img("away", "--negative_prompt", "a green square"), plain)
    load_script("img2img").main(["--config", str(tiny_txt2img_model), "--init-img", str(inputs["init"]), "--n_samples", "1",
                                 "--steps", STEPS, "--negative_prompt", "a green square", "--skip_grid",
                                 "--outdir", str(tmp_path / "img2img")])
    assert (tmp_path / "img2img" / "samples" / "00000.png").is_file()


BAD_FLAGS = [("--scale", "nan", "--scale: nan is not a finite number"),
             ("--scale", "inf", "--scale: inf is not a finite number"),
             ("--seed", str(2 ** 64), "--seed: 18446744073709551616 is out of range")]
SCRIPT_FLAGS = [(script, *bad) for script in ("txt2img", "img2img", "inpaint", "sample_diffusion", "interpolate")
                for bad in BAD_FLAGS]


@pytest.mark.parametrize("script, flag, value, message", SCRIPT_FLAGS)
def test_bad_scale_or_seed_names_the_flag(capsys, script, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).get_parser().parse_args([flag, value, *(["--init-img", "x.png"] if script == "img2img" else [])])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
