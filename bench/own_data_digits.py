"""Benchmark: the "your own images" path end to end on a small class folder, scikit-learn's digits.

    python bench/own_data_digits.py --fs-steps 6000 --ldm-steps 3000     # the full run (~20-30 min on 2 cores)
    python bench/own_data_digits.py --quick --workdir /tmp/digits_quick  # a few steps of everything (the test)

What a user does, step by step, with the folder configs untouched except for their data roots:
1. `scripts/prepare_digits.py` writes the 1,797 digits as 32x32 PNGs into `--data` (train/validation/<digit>/);
2. `main.py` trains configs/autoencoder/autoencoder_kl_f4_folder32.yaml on them, `scripts/export_weights.py`
   exports it (a model directory under <workdir>/models/first_stage_models/my-kl-f4-32);
3. `main.py` trains configs/latent-diffusion/class2img_folder32.yaml on that first stage (the config's
   `first_stage_config.params.ckpt_path` overridden to the export), exported the same way;
4. `--per-class` samples of each digit (DPM-Solver++(2M), 20 steps, guidance 3, EMA weights) are read by a
   judge trained on the real training images only (ldm/evaluation/digit_judge.py), as are the real
   validation images and their first-stage reconstructions (what the first stage alone leaves readable);
5. diversity beside accuracy: at each guidance scale of --guidance-scales (1 to 5), the samples' accuracy and
   their Fréchet distance to the real validation images in the judge's features (the 64 grey levels it reads),
   beside the distance of as many real training images (`--per-class` of each digit) to the same validation
   images: a model that draws each digit's most typical image scores 100 % on the judge and is still far from the
   real distribution.

Writes <results>/own_data_digits.md (per-class accuracy of real, reconstructed and generated digits, their
ratio against the target of 80 %, steps and minutes), own_data_digits.png (one row of samples per class) and
own_data_digits.json (the same figures, and the stages run);
--results defaults to bench/results, or to the workdir with --quick so a test never overwrites the record.

Resumable: `<workdir>/state.json` records each finished stage; run the same command again and finished stages
are skipped, an interrupted one resumes its run (`main.py -r`), and a larger step count continues the run.
A diffusion run belongs to its first stage: a first stage trained further gets a fresh diffusion run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FS_CONFIG = "configs/autoencoder/autoencoder_kl_f4_folder32.yaml"
LDM_CONFIG = "configs/latent-diffusion/class2img_folder32.yaml"
NO_IMAGE_LOG = "lightning.callbacks.image_logger.params.disabled=true"  # the bench draws its own grid
# Guidance 1.5: at 3 (the text models' scale) the samples read 99.9 % right but sat 4.3x as far from the real digits as
# real digits do (the same few strokes per digit); 1.25-1.5 kept >= 99 % of the real images' accuracy within 1.8x
# (bench/results/own_data_digits.md, the sweep).
SAMPLER, SAMPLER_STEPS, GUIDANCE = "dpmpp_2m", 20, 1.5
GUIDANCE_SCALES = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 5.0)  # finer where accuracy meets diversity
TARGET_RATIO = 0.8  # the target: samples' per-class accuracy >= 80 % of the real images'
# The time-to-quality issue's target for this recipe: accuracy >= 95 % of the real images' and a Fréchet distance
# within 2x the real-vs-real one, at the same guidance.
SWEEP_ACCURACY_RATIO, SWEEP_DISTANCE_RATIO = 0.95, 2.0
SIZE = 32
QUICK = {"fs_steps": 4, "ldm_steps": 4, "per_class": 2, "limit": 20}  # seconds per stage; proves the plumbing only
GRID_COLUMNS = 16


def subprocess_env() -> dict[str, str]:
    # LDM_RUN_NOW names a main.py run directory; an inherited one would make two runs share a directory.
    return {k: v for k, v in os.environ.items() if k != "LDM_RUN_NOW"}


def run(cmd: list[str]) -> float:
    """Run a command from the repository root; its wall minutes."""
    return run_measured(cmd)[0]


def peak_rss_watcher(pid: int, every: float = 0.05) -> tuple[threading.Thread, list[int]]:
    """A thread that keeps the high-water resident set of process `pid`'s own memory (VmHWM in /proc) in
    ``found[0]`` until the process exits. Why not `wait4`'s ru_maxrss: Linux carries a process's peak across fork and
    exec, so a child of this (large) process reports at least this process's resident set, whatever it used itself;
    VmHWM belongs to the memory the child mapped after its exec."""
    found = [0]
    status = Path(f"/proc/{pid}/status")

    def watch() -> None:
        while True:
            try:
                text = status.read_text()
            except OSError:
                return
            line = next((ln for ln in text.splitlines() if ln.startswith("VmHWM:")), None)
            if line is None:  # exited (a zombie has no memory left)
                return
            found[0] = max(found[0], int(line.split()[1]) * 1024)
            time.sleep(every)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, found


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run a command from the repository root; its wall minutes and the peak resident set of its process in bytes
    (`peak_rss_watcher`; sampled every 50 ms, so a peak shorter than that may be missed)."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    process = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env())
    watcher, peak = peak_rss_watcher(process.pid)
    try:
        process.wait()
    except BaseException:
        process.kill()  # Ctrl-C here: the child got it too; do not leave it behind
        process.wait()
        raise
    watcher.join()
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, cmd)
    return (time.time() - start) / 60, peak[0]


def ensure_data(data: Path, limit: Optional[int]) -> None:
    """Prepare the digits into `data` unless it already holds them at this size and limit."""
    info_file = data / "prepared.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("size") == SIZE and info.get("limit") == limit:
        print(f"using the digits already in {data} ({info['train']} train, {info['validation']} validation)")
        return
    run([sys.executable, "scripts/prepare_digits.py", "--outdir", str(data), "--size", str(SIZE),
         *([] if limit is None else ["--limit", str(limit)])])


def latest_run(logdir: Path, name: str) -> Optional[Path]:
    runs = sorted(logdir.glob(f"*_{name}")) if logdir.is_dir() else []
    return runs[-1] if runs else None


def global_step(run_dir: Path) -> int:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return int(ckpt["global_step"])


def train(name: str, config: str, steps: int, logdir: Path, overrides: list[str]) -> tuple[Path, float]:
    """Train `config` to `steps` optimizer steps as run `name`: resume its last run if it has a checkpoint
    (an interrupted run, or one to continue), else start one. (run directory, wall minutes)."""
    run_dir, minutes, _ = train_measured(name, [config], steps, logdir, overrides)
    return run_dir, minutes


def train_measured(name: str, configs: list[str], steps: int, logdir: Path, overrides: list[str],
                   ) -> tuple[Path, float, int]:
    """`train` with the configs `configs` merged in order; (run directory, wall minutes, peak resident bytes)."""
    previous = latest_run(logdir, name)
    common = ["-t", "--no-test", "--max_steps", str(steps), NO_IMAGE_LOG, *overrides]
    if previous is not None and (previous / "checkpoints" / "last.ckpt").is_file():
        minutes, peak = run_measured([sys.executable, "main.py", "-r", str(previous), *common])
    else:
        minutes, peak = run_measured([sys.executable, "main.py", "--base", *configs, "-n", name, "-l", str(logdir),
                                      *common])
    found = latest_run(logdir, name)
    if found is None:
        raise SystemExit(f"error: main.py left no run named *_{name} under {logdir}")
    return found, minutes, peak


def stage(state: dict[str, Any], key: str, name: str, config: str, steps: int, workdir: Path,
          model_dir: Path, overrides: list[str], depends_on: Optional[int] = None) -> bool:
    """Train and export one stage unless state.json says it is done with these settings. True if it ran."""
    done = state.get(key, {})
    wanted = {"steps": steps, "depends_on": depends_on}
    if {k: done.get(k) for k in wanted} == wanted and (model_dir / "model.safetensors").is_file():
        print(f"{key}: done ({steps} steps, {done['run']}), skipped")
        return False
    run_dir, minutes = train(name, config, steps, workdir / "logs", overrides)
    minutes += run([sys.executable, "scripts/export_weights.py", str(run_dir / "checkpoints" / "last.ckpt"),
                    "--model-dir", str(model_dir), "--overwrite"])  # a re-run re-exports its stage
    same_run = done.get("run") == str(run_dir)  # a resumed run: its earlier minutes count too
    state[key] = {**wanted, "run": str(run_dir), "trained_steps": global_step(run_dir),
                  "minutes": round(minutes + (done.get("minutes", 0.0) if same_run else 0.0), 2)}
    (workdir / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    return True


def real_per_class(images: Any, labels: Any, per_class: int) -> Any:
    """The first `per_class` images of each class (all of a class that has fewer): real images at the count the
    samples have, for the real-vs-real distance."""
    import numpy as np

    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return images[keep]


def evaluate(data: Path, model_dir: Path, per_class: int, seed: int,
             scales: tuple[float, ...] = GUIDANCE_SCALES) -> tuple[dict[str, Any], Any, float]:
    """Per-class accuracies of real validation images, their reconstructions and samples at guidance GUIDANCE;
    the sweep over `scales` (accuracy and Fréchet distance to the validation images at each); the samples at
    GUIDANCE (class-major, `per_class` each) and the sampling minutes of all scales."""
    import torch

    from ldm.evaluation.digit_judge import digit_features, fit_digit_judge, load_folder, per_class_accuracy
    from ldm.evaluation.frechet import frechet_distance
    from ldm.inference import decode_latents, encode_images, generate, load_model

    train_images, train_labels, train_classes = load_folder(data / "train")
    judge = fit_digit_judge(train_images, train_labels, train_classes, source=data / "train")
    images, labels, classes = load_folder(data / "validation")
    real_features = digit_features(images)
    model = load_model(model_dir)
    n_classes = model.cond_stage_model.n_classes
    if len(classes) != n_classes:
        raise SystemExit(f"error: {data / 'validation'} has {len(classes)} class folders but the model has "
                         f"n_classes={n_classes}; set model.params.cond_stage_config.params.n_classes")
    with torch.no_grad():
        recon = torch.cat([decode_latents(model, encode_images(model, batch)) for batch in images.split(128)])
    start = time.time()
    sample_labels = torch.arange(n_classes).repeat_interleave(per_class)
    sweep, samples = [], None
    for scale in sorted(set(scales) | {GUIDANCE}):
        drawn = generate(model, len(sample_labels), class_labels=sample_labels.tolist(), scale=scale,
                         sampler=SAMPLER, steps=SAMPLER_STEPS, seed=seed, batch_size=100, progress=False)
        accuracy = per_class_accuracy(judge, drawn, sample_labels)
        sweep.append({"scale": scale, "mean": accuracy["mean"], "n": accuracy["n"],
                      "frechet": frechet_distance(digit_features(drawn), real_features)})
        if scale == GUIDANCE:
            samples, at_guidance = drawn, accuracy
    sampling_minutes = (time.time() - start) / 60
    real_reference = real_per_class(train_images, train_labels, per_class)
    scores = {"real": per_class_accuracy(judge, images, labels),
              "reconstructed": per_class_accuracy(judge, recon, labels),
              "samples": at_guidance, "sweep": sweep,
              "real_vs_real": {"n": len(real_reference),
                               "frechet": frechet_distance(digit_features(real_reference), real_features)}}
    return scores, samples, sampling_minutes


def save_grid(samples: Any, per_class: int, path: Path) -> None:
    """One row per class: its first GRID_COLUMNS samples."""
    from ldm.image_io import save_grid as write_grid

    columns = min(per_class, GRID_COLUMNS)
    rows = samples.view(-1, per_class, *samples.shape[1:])[:, :columns]
    write_grid(rows.reshape(-1, *samples.shape[1:]), path, nrow=columns)


def sweep_lines(scores: dict[str, Any]) -> list[str]:
    """The guidance sweep: accuracy and Fréchet distance at each scale, against the real-vs-real distance."""
    real, reference = scores["real"]["mean"], scores["real_vs_real"]
    lines = ["Accuracy and diversity over guidance: the samples' Fréchet distance to the real validation images "
             f"in the judge's features (its 64 grey levels), beside {reference['n']} real training images' "
             f"distance to them (real vs real: **{reference['frechet']:.2f}**). Target at a scale: accuracy >= "
             f"{100 * SWEEP_ACCURACY_RATIO:.0f} % of the real images' and distance <= {SWEEP_DISTANCE_RATIO:g}x "
             "real vs real.", "",
             "| guidance | per-class accuracy | of real | Fréchet distance | of real vs real | both targets |",
             "|---:|---:|---:|---:|---:|---|"]
    for row in scores["sweep"]:
        ratio, distance_ratio = row["mean"] / real, row["frechet"] / reference["frechet"]
        met = ratio >= SWEEP_ACCURACY_RATIO and distance_ratio <= SWEEP_DISTANCE_RATIO
        lines.append(f"| {row['scale']:g} | {100 * row['mean']:.1f} % | {100 * ratio:.1f} % | {row['frechet']:.2f} | "
                     f"{distance_ratio:.2f}x | {'met' if met else 'not met'} |")
    return lines


def report(opt: argparse.Namespace, state: dict[str, Any], scores: dict[str, dict], sampling_minutes: float,
           wall_minutes: float, grid: Path) -> str:
    real, recon, gen = scores["real"], scores["reconstructed"], scores["samples"]
    ratio = gen["mean"] / real["mean"]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    fs, ldm = state["first_stage"], state["diffusion"]
    lines = [
        "# Your own images end to end: scikit-learn's digits", "",
        "Made by `bench/own_data_digits.py` (command below): scikit-learn's 1,797 digits upscaled to 32x32",
        f"(`scripts/prepare_digits.py`), the first stage `{FS_CONFIG}` and the class-conditional",
        f"`{LDM_CONFIG}`, both trained through `main.py` with only their data roots overridden.",
        f"Samples: {opt.per_class} per class, {SAMPLER} {SAMPLER_STEPS} steps, guidance {GUIDANCE}, EMA weights.",
        "Judge: an SVC on the real training images read back at 8x8 (`ldm/evaluation/digit_judge.py`), never",
        "a training signal. Accuracy is the mean over the ten classes of the share of images the judge reads",
        "as their class.", "",
        f"**Samples' per-class accuracy is {100 * ratio:.1f} % of the real images' "
        f"(target >= {100 * TARGET_RATIO:.0f} %: {verdict}).**", "",
        "| images | n | mean per-class accuracy | of real |", "|---|---:|---:|---:|",
        f"| real validation | {real['n']} | {100 * real['mean']:.1f} % | 100 % |",
        f"| first-stage reconstructions of them | {recon['n']} | {100 * recon['mean']:.1f} % | "
        f"{100 * recon['mean'] / real['mean']:.1f} % |",
        f"| class-conditional samples | {gen['n']} | {100 * gen['mean']:.1f} % | {100 * ratio:.1f} % |", "",
        "| class | real | reconstructed | samples |", "|---|---:|---:|---:|",
        *[f"| {c} | {100 * real['per_class'][c]:.1f} % | {100 * recon['per_class'][c]:.1f} % | "
          f"{100 * gen['per_class'][c]:.1f} % |" for c in real["per_class"]], "",
        *sweep_lines(scores), "",
        f"![samples, one row per class]({grid.name})", "",
        f"Rows: digits 0 to 9 from the top, the first {min(opt.per_class, GRID_COLUMNS)} samples of each.", "",
        "| stage | optimizer steps | train + export min |", "|---|---:|---:|",
        f"| first stage | {fs['trained_steps']} | {fs['minutes']:.1f} |",
        f"| class-conditional diffusion | {ldm['trained_steps']} | {ldm['minutes']:.1f} |",
        f"| sampling {gen['n']} images at {len(scores['sweep'])} guidance scales | - | {sampling_minutes:.1f} |",
        "",
        f"Wall minutes of this invocation (stages skipped as done do not count): {wall_minutes:.1f}.",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}.",
        "", "```", "python bench/own_data_digits.py " + " ".join(opt.argv), "```", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fs-steps", dest="fs_steps", type=int, default=6000,
                        help="first-stage optimizer steps, 2 per batch; the GAN starts at 3,000 (default %(default)s)")
    parser.add_argument("--ldm-steps", dest="ldm_steps", type=int, default=3000,
                        help="diffusion optimizer steps (default %(default)s)")
    parser.add_argument("--per-class", dest="per_class", type=int, default=100,
                        help="samples per class (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a few steps of everything on {QUICK['limit']} digits per class (a test of the plumbing)")
    parser.add_argument("--workdir", type=Path, default=Path("logs/own_data_digits"),
                        help="runs, exports and state.json (default %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the digits folder (default data/digits, or <workdir>/digits with --quick)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where the report and grid go (default bench/results, or the workdir with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    parser.add_argument("--guidance-scales", dest="guidance_scales", type=float, nargs="+", default=GUIDANCE_SCALES,
                        help="the sweep's guidance scales (default: %(default)s)")
    opt = parser.parse_args(argv)
    opt.argv = sys.argv[1:] if argv is None else list(argv)  # for the report's command line
    if opt.quick:
        opt.fs_steps, opt.ldm_steps, opt.per_class = QUICK["fs_steps"], QUICK["ldm_steps"], QUICK["per_class"]
    for flag in ("fs_steps", "ldm_steps", "per_class"):
        if getattr(opt, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(opt, flag)}")
    workdir = (opt.workdir if opt.workdir.is_absolute() else REPO / opt.workdir).resolve()
    data = (opt.data or (workdir / "digits" if opt.quick else Path("data/digits")))
    data = (data if data.is_absolute() else REPO / data).resolve()
    results = (opt.results or (workdir if opt.quick else Path("bench/results")))
    results = (results if results.is_absolute() else REPO / results).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    start = time.time()

    ensure_data(data, QUICK["limit"] if opt.quick else None)
    state_file = workdir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    roots = [f"data.params.train.params.root={data / 'train'}",
             f"data.params.validation.params.root={data / 'validation'}"]
    fs_dir = workdir / "models" / "first_stage_models" / "my-kl-f4-32"
    ldm_dir = workdir / "models" / "ldm" / "digits-class2img"
    stage(state, "first_stage", "digits_first_stage", FS_CONFIG, opt.fs_steps, workdir, fs_dir, roots)
    fs_steps = state["first_stage"]["trained_steps"]
    # Named after its first stage's steps: a further-trained first stage starts a fresh diffusion run
    # instead of resuming one whose cached latents and scale_factor came from the older weights.
    stage(state, "diffusion", f"digits_class2img_fs{fs_steps}", LDM_CONFIG, opt.ldm_steps, workdir, ldm_dir,
          [*roots, f"model.params.first_stage_config.params.ckpt_path={fs_dir / 'model.safetensors'}"],
          depends_on=fs_steps)

    scores, samples, sampling_minutes = evaluate(data, ldm_dir, opt.per_class, opt.seed, tuple(opt.guidance_scales))
    grid = results / "own_data_digits.png"
    save_grid(samples, opt.per_class, grid)
    text = report(opt, state, scores, sampling_minutes, (time.time() - start) / 60, grid)
    (results / "own_data_digits.md").write_text(text)
    (results / "own_data_digits.json").write_text(json.dumps({"scores": scores, "state": state}, indent=1) + "\n")
    print(text)
    print(f"wrote {results / 'own_data_digits.md'}, .png and .json")


if __name__ == "__main__":
    main()
