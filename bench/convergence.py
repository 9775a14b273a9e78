"""Benchmark: quality against training time, one labelled run per config change.

    python bench/convergence.py --label baseline --config configs/latent-diffusion/txt2img.yaml --steps 3000
    python bench/convergence.py --label min-snr-5 --config configs/latent-diffusion/txt2img.yaml --steps 3000 \\
        model.params.loss_weighting=min_snr
    python bench/convergence.py --label kl-f4-z8 --config configs/autoencoder/<new>.yaml --steps 6000
    python bench/convergence.py --label kl-f4-z8 --config ... --steps 6000 --resume   # after Ctrl-C / a kill
    python bench/convergence.py --label kl-f4-z8 --config ... --steps 9000 --resume   # train it on to 9,000
    python bench/convergence.py --label decay --parent baseline --config ... --steps 3000 \
        model.params.ckpt_path=logs/convergence/<baseline run>/checkpoints/last.ckpt   # continue a run's weights
    python bench/convergence.py --report       # only rebuild convergence.{csv,png,md} from the stored runs

Each run trains through `main.py` exactly as a user would (`--max_steps`, the config plus `key=value`
overrides), with a quality probe (ldm/evaluation/quality_probe.py) added to its callbacks: text-to-image
models are sampled every `--every-steps` optimizer steps on fixed seen-pair and held-out-pair captions
(DPM-Solver++(2M), 20 steps, guidance 3, EMA weights) and scored by the attribute classifier; first
stages get PSNR, SSIM and the share of shapes/colours the classifier still reads in reconstructions.
Image logging is switched off in these runs (it would cost training time and measure nothing).

Every run's probe CSV is kept in bench/results/convergence/<label>.csv with its settings in
runs.json; `convergence.csv` (all rows), `convergence.png` (curves) and `convergence.md` (the last
measurement of each run, and the settings) are rebuilt from them after each run. Curves and tables put
quality against training minutes (the probes' time left out), with optimizer steps beside them: what a
recipe costs is its time, and recipes of different step cost compare directly. A run that continues
another's weights (`--parent`) is counted from its parent's end, in steps and in minutes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ldm from this checkout (imported where needed: --report needs no torch)
RESULTS = REPO / "bench" / "results"
RUNS = RESULTS / "convergence"
PROBES = {
    "diffusion": "ldm.evaluation.quality_probe.PromptFollowingProbe",
    "first_stage": "ldm.evaluation.quality_probe.ReconstructionProbe",
}


def probe_kind(config: Path) -> str:
    from omegaconf import OmegaConf

    from ldm.model_loading import is_first_stage_target

    return "first_stage" if is_first_stage_target(OmegaConf.load(config).model.target) else "diffusion"


def probe_config(kind: str, label: str, every_steps: int, path: Path, n_captions: int) -> Path:
    params = {"every_steps": every_steps, "label": label}
    if kind == "diffusion":
        params["n_captions"] = n_captions
    config = {"lightning": {"callbacks": {
        "quality_probe": {"target": PROBES[kind], "params": params},
        "image_logger": {"target": "ldm.callbacks.ImageLogger", "params": {"disabled": True}},
    }}}
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def train(opt: argparse.Namespace) -> None:
    config = Path(opt.config)
    kind = probe_kind(config)
    logroot = REPO / "logs" / "convergence"
    logroot.mkdir(parents=True, exist_ok=True)
    name = f"conv_{opt.label}"
    settings = json.loads((RUNS / "runs.json").read_text()) if (RUNS / "runs.json").exists() else {}
    if opt.parent:
        parent_end(opt.parent, read_rows(), settings)  # a parent that is not stored stops here, before training

    def label_runs() -> list[Path]:
        return sorted(p for p in logroot.iterdir() if p.is_dir() and p.name.endswith(name))

    if opt.resume:
        # Continue the label's latest run where it stopped (its saved configs hold the probe), to --steps: the
        # same figure after an interruption, a larger one to train a finished run on. The probe's CSV in the run
        # directory keeps the rows measured before.
        runs = label_runs()
        if not runs:
            raise SystemExit(f"--resume: no run named *{name} in {logroot}; start it without --resume")
        cmd = [sys.executable, "main.py", "-r", str(runs[-1]), "--max_steps", str(opt.steps)]
    else:
        probe = probe_config(kind, opt.label, opt.every_steps, logroot / f"probe_{opt.label}.yaml", opt.n_captions)
        cmd = [sys.executable, "main.py", "--base", str(config), str(probe), "-t", "--no-test", "-n", name,
               "-l", str(logroot), "--max_steps", str(opt.steps), *opt.overrides]
    print(" ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env={k: v for k, v in os.environ.items() if k != "LDM_RUN_NOW"})
    if proc.returncode != 0:  # main.py said why; a stopped run (Ctrl-C, SIGTERM) kept its last.ckpt
        raise SystemExit(f"training ended with status {proc.returncode}: fix what it said, or continue a stopped run "
                         "with the same command and --resume")
    wall = time.time() - start
    run = label_runs()[-1]
    RUNS.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "quality.csv", RUNS / f"{opt.label}.csv")
    recorded = settings.get(opt.label, {})
    if opt.resume and recorded.get("run_dir") == str(run.relative_to(REPO)):
        wall += recorded["wall_seconds"]  # a finished run trained on: its first part was recorded
    settings[opt.label] = {
        "kind": kind, "config": str(config), "overrides": opt.overrides, "steps": opt.steps,
        "parent": opt.parent, "start_step": parent_end(opt.parent, read_rows(), settings)[0] if opt.parent else 0,
        "wall_seconds": round(wall, 1), "resumed": opt.resume, "run_dir": str(run.relative_to(REPO)), "note": opt.note,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    (RUNS / "runs.json").write_text(json.dumps(settings, indent=1) + "\n")


def parent_end(label: str, rows: list[dict], settings: dict) -> tuple[int, float]:
    """(optimizer steps, training minutes) from scratch at `label`'s last measurement: where a run continuing
    its weights starts."""
    own = [r for r in rows if r["label"] == label]
    if not own:
        raise SystemExit(f"--parent {label}: no stored run of that name in {RUNS}")
    start_step, start_minutes = run_offsets(rows, settings)[label]
    last = max(own, key=lambda r: int(r["step"]))
    return start_step + int(last["step"]), start_minutes + float(last["train_minutes"])


def run_offsets(rows: list[dict], settings: dict) -> dict[str, tuple[int, float]]:
    """Each run's start on the curves, (optimizer steps, training minutes) from scratch: (0, 0) for a run from
    scratch; for a continued run its recorded start step, and the minutes of its parents (each up to its last
    measurement) summed along the chain."""
    offsets: dict[str, tuple[int, float]] = {}

    def offset(label: str, chain: tuple[str, ...]) -> tuple[int, float]:
        if label not in offsets:
            setting = settings.get(label, {})
            parent = setting.get("parent")
            minutes = 0.0
            if parent and parent not in chain and any(r["label"] == parent for r in rows):
                last = max((r for r in rows if r["label"] == parent), key=lambda r: int(r["step"]))
                minutes = offset(parent, chain + (label,))[1] + float(last["train_minutes"])
            offsets[label] = (int(setting.get("start_step") or 0), minutes)
        return offsets[label]

    for label in dict.fromkeys(r["label"] for r in rows):
        offset(label, ())
    return offsets


def read_rows() -> list[dict]:
    rows = []
    for path in sorted(RUNS.glob("*.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                row["label"] = path.stem
                rows.append(row)
    return rows


def real_rows(n_captions: int = 128) -> list[dict]:
    """The probe's figures for real images (match ceiling, FID floor at this sample count), computed once."""
    path = RUNS / "real_images.json"
    if not path.exists():
        from ldm.evaluation.attribute_classifier import load_attribute_classifier
        from ldm.evaluation.quality_probe import real_image_scores

        scores = real_image_scores(load_attribute_classifier(), n_captions=n_captions)
        path.write_text(json.dumps(scores, indent=1) + "\n")
    return [{"label": "real images", "step": "", "train_minutes": "nan", "split": split,
             **{k: str(v) for k, v in values.items()}} for split, values in json.loads(path.read_text()).items()]


def write_report() -> None:
    settings = json.loads((RUNS / "runs.json").read_text()) if (RUNS / "runs.json").exists() else {}
    rows = read_rows()
    if not rows:
        raise SystemExit(f"no runs in {RUNS}; train one with --label/--config first")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(RESULTS / "convergence.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    write_plot(rows, settings)
    (RESULTS / "convergence.md").write_text(markdown(real_rows() + rows, settings, run_offsets(rows, settings)))
    print(f"wrote {RESULTS / 'convergence.csv'}, .png, .md")


def _last_rows(rows: list[dict]) -> dict[tuple[str, str], dict]:
    last = {}
    for row in rows:
        last[(row["label"], row["split"])] = row
    return last


def markdown(rows: list[dict], settings: dict, offsets: dict[str, tuple[int, float]]) -> str:
    lines = ["# Quality against training time", "",
             "Made by `bench/convergence.py` on the machine below; each run is one config change against its",
             "parent (see the settings table). Figures are the probe's last measurement (at the end of training).",
             "Text-to-image: share of samples matching their caption (all attributes / per attribute) and the",
             "Fréchet distance in the attribute classifier's feature space (FID), for captions of colour-shape pairs",
             "seen in training and held-out pairs; DPM-Solver++(2M), 20 steps, guidance 3, EMA weights. Runs from",
             "the typed-caption work on also measure the same items as typed prompts (`seen_typed`, `held_out_typed`:",
             "words left out, synonyms, case, punctuation; scored on what each states).",
             "First stage: PSNR/SSIM on 1,024 held-out images and the share of shapes/colours the classifier still",
             "reads in reconstructions.",
             "Minutes are training time without the probes; a run that continues another's weights counts from its",
             "parent's end (`from scratch` columns), and `run` columns are its own.", ""]
    last = _last_rows(rows)
    diffusion = [(k, r) for k, r in last.items() if "match_all" in r and r.get("match_all")]
    if diffusion:
        lines += ["## Text to image, last measurement of each run", ""] + _match_table(diffusion, offsets)
        # Runs of different lengths compared where all of them were measured: the longest common step.
        steps = [max(int(r["step"]) for r in rows if r["label"] == label and r.get("match_all"))
                 for label in {k[0] for k, r in diffusion if r["step"]}]
        common = str(min(steps)) if steps else ""
        at_common = [((r["label"], r["split"]), r) for r in rows if r["step"] == common and r.get("match_all")]
        if common and any(r["step"] != common for _, r in diffusion if r["step"]):
            lines += [f"## Text to image at step {common} of each run, reached by every run", ""] + \
                _match_table(at_common, offsets)
    stages = [(k, r) for k, r in last.items() if r.get("psnr")]
    if stages:
        lines += ["| first stage run | train min | step | PSNR dB | SSIM | shapes kept | colours kept | all kept |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for (label, _), r in stages:
            lines.append(f"| {label} | {float(r['train_minutes']):.1f} | {r['step']} | {float(r['psnr']):.2f} | "
                         f"{float(r['ssim']):.3f} | {100 * float(r['keep_shape']):.1f} % | "
                         f"{100 * float(r['keep_colour']):.1f} % | {100 * float(r['keep_all']):.1f} % |")
        lines.append("")
    lines += ["## Runs", "", "| run | config | overrides | steps | wall s | note |", "|---|---|---|---:|---:|---|"]
    for label, s in settings.items():
        lines.append(f"| {label} | `{s['config']}` | `{' '.join(s['overrides']) or '-'}` | {s['steps']} | "
                     f"{s['wall_seconds']} | {s.get('note', '')} |")
    machines = {json.dumps(s["machine"]) for s in settings.values()}
    lines += ["", f"Machines: {', '.join(sorted(machines))}", ""]
    analysis = RUNS / "analysis.md"  # written by hand: what the curves say; kept across rebuilds
    if analysis.exists():
        lines += [analysis.read_text()]
    return "\n".join(lines)


def _match_table(rows: list[tuple[tuple[str, str], dict]], offsets: dict[str, tuple[int, float]]) -> list[str]:
    lines = ["| run | split | train min from scratch | step from scratch | run min | run step | all | shape | "
             "colour | size | position | count | FID |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (label, split), r in rows:
        pct = [f"{100 * float(r[f'match_{c}']):.0f} %" for c in ("all", "shape", "colour", "size", "position",
                                                                  "num_objects")]
        if r["step"]:
            start_step, start_minutes = offsets.get(label, (0, 0.0))
            where = (f"{start_minutes + float(r['train_minutes']):.1f} | {start_step + int(r['step'])} | "
                     f"{float(r['train_minutes']):.1f} | {r['step']}")
        else:  # the real images' row
            where = "- | - | - | -"
        lines.append(f"| {label} | {split} | {where} | " + " | ".join(pct) + f" | {float(r['fid']):.1f} |")
    return lines + [""]


def write_plot(rows: list[dict], settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("match_all", "seen", "all attributes, seen pairs"),
              ("match_all", "held_out", "all attributes, held-out pairs"),
              ("match_all", "seen_typed", "typed prompts: all stated, seen pairs"),
              ("match_all", "held_out_typed", "typed prompts: all stated, held-out pairs"),
              ("match_shape", "seen", "shape, seen pairs"),
              ("fid", "seen", "classifier FID, seen pairs"),
              ("psnr", "held_out", "first stage PSNR (dB)"),
              ("keep_shape", "held_out", "first stage: shapes kept")]
    fig, axes = plt.subplots(2, 4, figsize=(22, 8))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    # One colour per run in every panel (20 before repeating, where the default cycle has 10), and one legend
    # beside the panels, so that no legend covers a curve.
    colours = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    offsets = run_offsets(rows, settings)
    handles = {}
    for ax, (column, split, title) in zip(axes.flat, panels):
        for label in labels:
            start = offsets[label][1]  # a continued run is drawn after its parent
            points = [(start + float(r["train_minutes"]), float(r[column])) for r in rows
                      if r["label"] == label and r["split"] == split and r.get(column) not in (None, "", "nan")]
            if points:
                handles[label] = ax.plot(*zip(*points), "o-", ms=3, color=colours[label], label=label)[0]
        ax.set_title(title)
        # Minutes, not steps: what a recipe costs is its time, whatever its step costs (the tables give both).
        # Runs that shared the CPU with other work are slower than they would be alone (their notes say so).
        ax.set_xlabel("training minutes (continued runs from their parent's end)")
        if column == "fid":
            ax.set_yscale("log")
    fig.suptitle("Quality against training minutes on 2 CPU cores (the probes' time left out)")
    fig.legend([handles[label] for label in labels if label in handles],
               [label for label in labels if label in handles], loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(RESULTS / "convergence.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", help="name of the run (its config difference)")
    parser.add_argument("--config", help="the config to train")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps to train (default %(default)s)")
    parser.add_argument("--every-steps", dest="every_steps", type=int, default=500,
                        help="optimizer steps between measurements (default %(default)s)")
    parser.add_argument("--n-captions", dest="n_captions", type=int, default=128, help="captions per split")
    parser.add_argument("--note", default="", help="what this run changes, for the report")
    parser.add_argument("--parent", help="for a run that continues another stored run's weights "
                        "(model.params.ckpt_path=its checkpoint): that run's label; curves and tables count this run "
                        "from the parent's end, in steps and minutes")
    parser.add_argument("--resume", action="store_true",
                        help="continue the latest run of --label (main.py -r) to --steps: after an interruption (give "
                             "the same arguments), or a finished run to more steps; then report. wall_seconds adds "
                             "the part recorded before, if the run was (an interrupted one's counts from the resume)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from stored runs")
    parser.add_argument("overrides", nargs="*", help="config overrides key.path=value")
    opt = parser.parse_args()
    if not opt.report:
        if not (opt.label and opt.config):
            parser.error("--label and --config are needed to train (or use --report)")
        train(opt)
    write_report()


if __name__ == "__main__":
    main()
