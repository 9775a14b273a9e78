"""scripts/inpaint.py, scripts/interpolate.py, scripts/make_inpainting_examples.py and ldm/interpolation.py.

The scripts run end to end as subprocesses on tiny random-weight models (conftest's `tiny_txt2img_model`
and `tiny_inpainting_model`). Loading torch and Lightning dominates a script's run time, so all runs start
together with the module's first test; the in-process tests (bad inputs, calling the scripts' `main`, and
ldm/interpolation.py's functions) run meanwhile, and the checks of the runs' outputs come last.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import ShapesTest
from ldm.inference import decode_latents, encode_images, load_model
from ldm.interpolation import (condition_for, denoise_from, interpolate, lerp, mixing_weights,
                               progressive_generation, slerp, start_step)
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.samplers import SAMPLERS, run_sampler, sampler_sigmas, start_state
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # the tiny models' image size: 8x8 latents of a factor-4 first stage
PAD = 2  # make_grid's padding between the cells of a grid / strip
N_PAIRS = 3
# Interpolation and progressive runs: few frames and steps, a noise level inside the tiny models' T = 16.
T_INTERP, N_FRAMES, STEPS, SEED = 10, 4, 8, 5



def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def cells(strip: np.ndarray, rows: int, cols: int, size: int = SIZE) -> np.ndarray:
    """The images of a grid written by save_grid: (rows, cols, size, size, 3)."""
    assert strip.shape == (rows * (size + PAD) + PAD, cols * (size + PAD) + PAD, 3)
    return np.stack([np.stack([strip[PAD + r * (size + PAD):][:size, PAD + c * (size + PAD):][:, :size]
                               for c in range(cols)]) for r in range(rows)])


def to_8bit(images: torch.Tensor) -> np.ndarray:
    """NCHW in [-1, 1] as the PNGs store it: (N, H, W, 3) int."""
    return ((images.clamp(-1, 1) + 1) / 2 * 255).round().permute(0, 2, 3, 1).numpy().astype(np.int16)


class ScriptRun:
    """A script started in the background; `result()` waits for it."""

    def __init__(self, name: str, args: list, log_dir: Path) -> None:
        self.name = name
        self.stdout_path, self.stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        # One thread each: several runs share the machine's cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=out,
                                            stderr=err, text=True)

    def result(self, timeout: float = 300) -> "ScriptRun":
        self.returncode = self.process.wait(timeout=timeout)
        self.stdout, self.stderr = self.stdout_path.read_text(), self.stderr_path.read_text()
        return self

    def check(self) -> "ScriptRun":
        self.result()
        assert self.returncode == 0, f"{self.name} failed:\n{self.stdout}\n{self.stderr[-3000:]}"
        return self


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """N_PAIRS inpainting examples written by the example generator."""
    directory = tmp_path_factory.mktemp("examples")
    load_script("make_inpainting_examples").write_examples(directory, N_PAIRS, SIZE)
    return directory


@pytest.fixture(scope="module")
def pair_images(example_dir) -> tuple[Path, Path]:
    return example_dir / "shapes_test_000.png", example_dir / "shapes_test_001.png"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, example_dir, pair_images, tiny_txt2img_model, tiny_inpainting_model) -> dict:
    """Every script run of this module, started together; keyed by name."""
    root = tmp_path_factory.mktemp("runs")
    device = ["--device", "cpu"]
    commands = {
        "inpaint_inpainting_model": ["scripts/inpaint.py", "--config", tiny_inpainting_model, "--indir", example_dir,
                                     "--outdir", root / "inpaint_inpainting_model", "--steps", 4, *device],
        "inpaint_txt2img_model": ["scripts/inpaint.py", "--config", tiny_txt2img_model, "--indir", example_dir,
                                  "--outdir", root / "inpaint_txt2img_model", "--steps", 4, "--sampler", "dpmpp_2m",
                                  "--prompt", "a red circle", "--scale", 2.0, "--skip_grid", *device],
        "interpolate": ["scripts/interpolate.py", "--config", tiny_txt2img_model, "--image-a", pair_images[0],
                        "--image-b", pair_images[1], "--t", T_INTERP, "--n_frames", N_FRAMES, "--steps", STEPS,
                        "--seed", SEED, "--outdir", root / "interpolate", *device],
        "progressive": ["scripts/interpolate.py", "--mode", "progressive", "--config", tiny_txt2img_model,
                        "--prompt", "a red circle", "--n_samples", 2, "--n_frames", 3, "--steps", 4,
                        "--outdir", root / "progressive", *device],
    }
    started = {name: ScriptRun(name, args, root) for name, args in commands.items()}
    started["root"] = root
    yield started
    for run in started.values():
        if isinstance(run, ScriptRun) and run.process.poll() is None:
            run.process.kill()


@pytest.fixture(scope="module", autouse=True)
def _start_runs_first(runs) -> None:
    """Start the script runs with the module's first test, so the in-process tests run while they work."""


@pytest.fixture(scope="module")
def txt2img_model(tiny_txt2img_model):
    return load_model(tiny_txt2img_model, device="cpu")


@pytest.fixture(scope="module")
def inpainting_model(tiny_inpainting_model):
    return load_model(tiny_inpainting_model, device="cpu")


# ---------------------------------------------------------------------------------------------- examples


def test_committed_examples_are_the_generators_output(tmp_path):
    """The shipped data/inpainting_examples are what the generator writes, on every run (compared as pixels:
    PNG compression may differ between Pillow versions)."""
    generator = load_script("make_inpainting_examples")
    generator.main(["--outdir", str(tmp_path / "first")])
    generator.main(["--outdir", str(tmp_path / "second")])
    committed = sorted(p.name for p in (REPO / "data" / "inpainting_examples").glob("*.png"))
    for caption in sorted((REPO / "data" / "inpainting_examples").glob("*.txt")):
        assert caption.read_text() == (tmp_path / "first" / caption.name).read_text()
    assert committed == sorted(p.name for p in (tmp_path / "first").glob("*.png"))
    assert len(committed) == 12
    for name in committed:
        pixels = np.asarray(Image.open(tmp_path / "first" / name))
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(tmp_path / "second" / name)))
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(REPO / "data" / "inpainting_examples" / name)))


def test_examples_are_valid_pairs(tmp_path):
    """Each mask is a 0/255 grey image of its image's size (white = fill), holds some of each, and the image is
    the test split's item rendered at that size."""
    load_script("make_inpainting_examples").main(["--outdir", str(tmp_path), "--n", "3", "--size", "48"])
    pairs = load_script("inpaint").find_pairs(tmp_path)
    assert [image.name for image, _ in pairs] == [f"shapes_test_{i:03d}.png" for i in range(3)]
    dataset = ShapesTest(size=48, num_samples=3, with_mask=True)
    for index, (image_path, mask_path) in enumerate(pairs):
        image, mask = Image.open(image_path), Image.open(mask_path)
        assert image.mode == "RGB" and image.size == (48, 48)
        assert mask.mode == "L" and mask.size == (48, 48)
        mask = np.asarray(mask)
        assert set(np.unique(mask)) == {0, 255}
        item = dataset[index]
        np.testing.assert_array_equal(mask == 255, item["mask"][:, :, 0] == 1)
        expected = np.round((item["image"] + 1) / 2 * 255)
        assert np.abs(np.asarray(image, dtype=np.float64) - expected).max() <= 1
        # Its caption beside it is the pair's prompt, unless --prompt gives one.
        inpaint_script = load_script("inpaint")
        assert inpaint_script.pair_prompt(image_path, "") == item["caption"]
        assert inpaint_script.pair_prompt(image_path, "a red circle") == "a red circle"
    assert load_script("inpaint").pair_prompt(tmp_path / "no_caption.png", "") == ""


# ---------------------------------------------------------------------------------------------- inpaint.py


def _bad_input(tmp_path: Path, problem: str) -> Path:
    directory = tmp_path / "indir"
    if problem == "missing":
        return directory
    directory.mkdir()
    mask = Image.fromarray(np.full((SIZE, SIZE), 255, dtype=np.uint8))
    image = Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    if problem == "no image":
        mask.save(directory / "lonely_mask.png")
    elif problem == "unreadable":
        mask.save(directory / "a_mask.png")
        (directory / "a.png").write_bytes(b"not a png")
    elif problem == "size":
        mask.resize((SIZE // 2, SIZE // 2)).save(directory / "a_mask.png")
        image.save(directory / "a.png")
    return directory


@pytest.mark.hostile
@pytest.mark.parametrize("problem, message", [
    ("missing", "is not a folder"),
    ("empty", "has no *_mask.png files"),
    ("no image", "lonely_mask.png has no image: expected"),
    ("unreadable", "cannot read"),
    ("size", "make the mask the image's size"),
])
def test_inpaint_bad_inputs_exit_before_loading_a_model(tmp_path, capsys, problem, message):
    """A missing or empty folder, a mask without its image, an unreadable image, or a mask of another size
    stop the script with a message and exit status 2 (argparse's), before any model is loaded."""
    indir = _bad_input(tmp_path, problem)
    with pytest.raises(SystemExit) as exit_info:
        load_script("inpaint").main(["--indir", str(indir), "--config", str(tmp_path / "no_model")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- interpolate.py


@pytest.mark.hostile
@pytest.mark.parametrize("args, message", [
    (["--sampler", "heun"], "--sampler heun cannot; use --sampler ddim, plms, ddpm"),
    (["--n_frames", "1"], "--n_frames must be at least 2"),
    (["--image-a", "a.png"], "give both --image-a and --image-b"),
    (["--image-a", "a.png", "c.png", "--image-b", "b.png"], "give one b per a"),
])
def test_interpolate_bad_options_exit_before_loading_a_model(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script("interpolate").main(["--config", str(tmp_path / "no_model"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.hostile
@pytest.mark.parametrize("args, message", [
    (["--t", "500"], "t must be a timestep in 0..15"),
    (["--image-a", "missing.png", "--image-b", "missing.png"], "no image at missing.png"),
    (["--mode", "progressive", "--class_label", "3"], "conditioned on text: give a prompt, not a class label"),
])
def test_interpolate_bad_inputs_for_the_model_exit(capsys, tiny_txt2img_model, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script("interpolate").main(["--config", str(tiny_txt2img_model), "--device", "cpu", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ldm/interpolation.py


def test_slerp_ends_and_norm():
    """slerp gives a at λ=0 and b at λ=1, and keeps the norm of equally long vectors on the way, where lerp
    shortens orthogonal ones by cos 45° at the middle."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # Equal norms, exactly orthogonal: b minus its projection on a, rescaled.
    b = b - (a * b).flatten(1).sum(1).reshape(-1, 1, 1, 1) / a.flatten(1).pow(2).sum(1).reshape(-1, 1, 1, 1) * a
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    norm = a.flatten(1).norm(dim=1)
    for weight in (0.25, 0.5, 0.9):
        torch.testing.assert_close(slerp(a, b, weight).flatten(1).norm(dim=1), norm)
    torch.testing.assert_close(lerp(a, b, 0.5).flatten(1).norm(dim=1), norm * 0.5 ** 0.5)


def test_slerp_of_parallel_vectors_is_the_line():
    a = torch.randn(2, 3)
    for b in (2 * a, -a):
        mixed = slerp(a, b, 0.3)
        assert torch.isfinite(mixed).all()
        torch.testing.assert_close(mixed, lerp(a, b, 0.3))
    with pytest.raises(ValueError, match="one shape"):
        slerp(a, a[:1], 0.5)


def test_mixing_weights():
    assert mixing_weights(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="at least 2"):
        mixing_weights(1)


def test_start_step(txt2img_model):
    """DDPM starts anywhere; DDIM at the highest of its timesteps not above t."""
    assert start_step(txt2img_model, 10, "ddpm") == 10
    sampler = DDIMSampler(txt2img_model)
    sampler.make_schedule(STEPS, verbose=False)
    assert start_step(txt2img_model, 10, "ddim", STEPS) == max(t for t in sampler.ddim_timesteps if t <= 10)
    with pytest.raises(ValueError, match="0..15"):
        start_step(txt2img_model, 16, "ddpm")
    with pytest.raises(ValueError, match="below the first"):
        start_step(txt2img_model, 0, "ddim", 4)
    with pytest.raises(ValueError, match="not 'heun'"):
        start_step(txt2img_model, 10, "heun")


def test_ddpm_from_the_last_step_is_ancestral_sampling(txt2img_model):
    """The reverse process from t = T−1 is the model's full ancestral sampler (the registry's ddpm)."""
    model = txt2img_model
    cond, _ = condition_for(model, 1, "a red circle")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = denoise_from(model, x_T, model.num_timesteps - 1, cond, sampler="ddpm", seed=3)
    torch.manual_seed(3)
    info, denoiser = SAMPLERS["ddpm"], model.sigma_denoiser(cond)
    sigmas = sampler_sigmas(info, model.process, 1)
    with torch.no_grad():
        full = run_sampler(info, denoiser, start_state(info, denoiser, x_T, sigmas[0]), sigmas, disable=True)
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_lambda_zero_is_the_reconstruction_path(txt2img_model, sampler):
    """Frame 0 is image a encoded, noised to the start step with the seed's ε, and decoded from there; frame 1
    at λ=1 is the same for image b (DDPM appendix D); the spherical path has the same ends."""
    model = txt2img_model
    dataset = ShapesTest(size=SIZE, num_samples=2)
    a, b = (torch.from_numpy(dataset[i]["image"]).permute(2, 0, 1)[None] for i in range(2))
    frames = interpolate(model, a, b, t=T_INTERP, n_frames=3, sampler=sampler, steps=STEPS, seed=SEED)
    spherical = interpolate(model, a, b, t=T_INTERP, n_frames=3, spherical=True, sampler=sampler, steps=STEPS,
                            seed=SEED)
    step = start_step(model, T_INTERP, sampler, STEPS)
    cond, _ = condition_for(model, 1)
    for index, image in ((0, a), (2, b)):
        z = encode_images(model, image)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(SEED))
        x_t = model.q_sample(z, torch.full((1,), step), noise)
        expected = decode_latents(model, denoise_from(model, x_t, step, cond, sampler=sampler, steps=STEPS,
                                                      seed=SEED + 1))
        # DDIM decodes the frames as one batch, here one alone: equal up to batched-kernel rounding.
        torch.testing.assert_close(frames[0, index], expected[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(spherical[0, index], expected[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(frames[0, 1], spherical[0, 1])


def test_progressive_generation_frames(txt2img_model):
    """Frames are the decoded x̂_0 at evenly spaced steps: reproducible with a seed, changing along the way,
    for every sampler (ddpm visits all T steps)."""
    model = txt2img_model
    first = progressive_generation(model, 2, n_frames=3, prompt="a red circle", sampler="ddim", steps=4, seed=0)
    again = progressive_generation(model, 2, n_frames=3, prompt="a red circle", sampler="ddim", steps=4, seed=0)
    assert first.shape == (2, 3, 3, SIZE, SIZE)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first[:, 0], first[:, -1])
    assert progressive_generation(model, 1, n_frames=16, sampler="ddpm", seed=0).shape == (1, 16, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="between 1 and the number of sampler steps"):
        progressive_generation(model, 1, n_frames=5, steps=4)


def test_class_conditional_progressive_generation(tiny_class_model):
    """A class label conditions a class model (guidance against its null class); a prompt cannot."""
    model = load_model(tiny_class_model, device="cpu")
    cond, uncond = condition_for(model, 2, class_label=4, scale=3.0)
    torch.testing.assert_close(cond, model.get_learned_conditioning(torch.tensor([4, 4])))
    torch.testing.assert_close(uncond, model.get_learned_conditioning(torch.tensor([6, 6])))
    frames = progressive_generation(model, 1, n_frames=2, class_label=4, scale=3.0, steps=4, seed=0)
    assert frames.shape == (1, 2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="class-conditional: give a class label in 0..5"):
        condition_for(model, 1, prompt="a red circle")


def test_condition_for(txt2img_model, inpainting_model):
    cond, uncond = condition_for(txt2img_model, 2, "a red circle", scale=3.0)
    assert cond.shape[0] == uncond.shape[0] == 2
    assert condition_for(txt2img_model, 2, "", scale=3.0)[1] is None  # the empty prompt is the unconditional score
    with pytest.raises(ValueError, match="conditioned on text"):
        condition_for(txt2img_model, 1, class_label=3)
    with pytest.raises(ValueError, match="inpainting model"):
        condition_for(inpainting_model, 1)


# ---------------------------------------------------------------------------------------------- script outputs
# Last in the file: the runs started with the module's first test, and the tests above ran meanwhile.


@pytest.mark.parametrize("run_name", ["inpaint_inpainting_model", "inpaint_txt2img_model"])
def test_inpaint_keeps_known_pixels_and_fills_the_mask(runs, example_dir, run_name):
    """Both an inpainting model (concat conditioning) and a text-to-image model (known latents kept) write
    name.png per pair, the input's size, equal to the input outside the mask, generated inside it."""
    run = runs[run_name].check()
    outdir = runs["root"] / run_name
    for image_path, mask_path in load_script("inpaint").find_pairs(example_dir):
        out_path = outdir / image_path.name
        assert str(out_path) in run.stdout
        result, original = read_rgb(out_path), read_rgb(image_path)
        fill = np.asarray(Image.open(mask_path)) >= 128
        assert result.shape == original.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(result[~fill], original[~fill])
        assert (result[fill] != original[fill]).any()
    grid = outdir / "grid-0000.png"
    if run_name == "inpaint_txt2img_model":  # --skip_grid
        assert not grid.exists()
    else:
        rows = cells(read_rgb(grid), N_PAIRS, 2)
        np.testing.assert_array_equal(rows[0, 1], read_rgb(outdir / "shapes_test_000.png"))


@pytest.mark.hostile
def test_inpaint_never_replaces_inputs_or_earlier_results_and_says_how_each_was_made(tmp_path, tiny_inpainting_model):
    """--outdir = --indir keeps the sources (results take name-1.png); a second run keeps the first run's results
    and grid; --overwrite replaces earlier results but still not the inputs; every PNG carries its settings."""
    folder = tmp_path / "pairs"
    load_script("make_inpainting_examples").write_examples(folder, 1, SIZE)
    source = folder / "shapes_test_000.png"
    original = source.read_bytes()
    args = ["--indir", str(folder), "--outdir", str(folder), "--config", str(tiny_inpainting_model),
            "--steps", str(STEPS), "--prompt", "a red circle"]
    inpaint = load_script("inpaint")
    inpaint.main(args)
    inpaint.main(args)
    assert source.read_bytes() == original
    assert (folder / "shapes_test_000-1.png").is_file() and (folder / "shapes_test_000-2.png").is_file()
    assert (folder / "grid-0000.png").is_file() and (folder / "grid-0001.png").is_file()
    inpaint.main([*args, "--overwrite", "--skip_grid"])
    assert source.read_bytes() == original and (folder / "shapes_test_000-3.png").is_file()  # inputs: never
    text = Image.open(folder / "shapes_test_000-1.png").text
    assert text["prompt"] == "a red circle" and text["source"] == str(source) and text["steps"] == str(STEPS)
    assert text["mask"] == str(folder / "shapes_test_000_mask.png") and text["model"] == str(tiny_inpainting_model)

    elsewhere = tmp_path / "out"
    inpaint.main([*args[:2], "--outdir", str(elsewhere), *args[4:], "--skip_grid"])
    first = (elsewhere / "shapes_test_000.png").read_bytes()
    inpaint.main([*args[:2], "--outdir", str(elsewhere), *args[4:], "--skip_grid", "--overwrite", "--seed", "7"])
    assert (elsewhere / "shapes_test_000.png").read_bytes() != first and not (elsewhere / "shapes_test_000-1.png").exists()


def test_interpolation_strip_ends_are_each_image_decoded_alone(runs, pair_images, txt2img_model):
    """One row of n_frames; frame 0 and the last frame are image a and image b reconstructed through step t
    with the same noise (an interpolation of an image with itself), and the frames between differ from both."""
    run = runs["interpolate"].check()
    strip = runs["root"] / "interpolate" / "interpolation-0000.png"
    assert str(strip) in run.stdout
    frames = cells(read_rgb(strip), 1, N_FRAMES)[0]
    for index, path in ((0, pair_images[0]), (-1, pair_images[1])):
        image = torch.from_numpy(read_rgb(path).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        alone = interpolate(txt2img_model, image, image, t=T_INTERP, n_frames=2, sampler="ddim", steps=STEPS,
                            seed=SEED, scale=3.0)
        assert np.abs(frames[index] - to_8bit(alone[0])[0]).max() <= 1
        assert np.abs(frames[index] - to_8bit(alone[0])[1]).max() <= 1
    assert np.abs(frames[1] - frames[0]).max() > 1 and np.abs(frames[1] - frames[-1]).max() > 1


def test_progressive_strip_has_a_row_per_sample(runs):
    run = runs["progressive"].check()
    strip = runs["root"] / "progressive" / "progressive-0000.png"
    assert str(strip) in run.stdout
    frames = cells(read_rgb(strip), 2, 3)
    assert np.abs(frames[:, 0] - frames[:, -1]).max() > 1  # x̂_0 changes along the reverse process


@pytest.mark.hostile
@pytest.mark.parametrize("script, args", [
    ("inpaint", ["--indir", "/nonexistent"]),
    ("interpolate", []),
    ("reconstruct", ["--config", "/nonexistent.yaml", "--ckpt", "/nonexistent.ckpt"]),
])
def test_outputs_are_checked_writable_before_any_work(script, args, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the folder should be")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args, "--outdir", str(tmp_path / "file" / "out")])
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).cli()
    assert str(exit_info.value).startswith(f"error: --outdir {tmp_path / 'file' / 'out'}: cannot write there")
