"""Benchmark: do text-to-image models follow prompts as people write them?

    python bench/prompt_following.py                                   # the shipped txt2img model (~10 min, 2 cores)
    python bench/prompt_following.py --model before=/tmp/old-txt2img --model after=txt2img   # compare models
    python bench/prompt_following.py --quick                           # smoke run: 16 captions per set

Each model draws one image per caption of six prompt sets with one sampler (DPM-Solver++(2M), 20 steps,
guidance 3, the same seeds for every model), scored by the attribute classifier on what each caption states
(ldm/evaluation/prompt_following.py; a caption that leaves a word out constrains only what it states):

- ``seen`` / ``held_out``: canonical captions of validation items (colour-shape pairs seen in training) and of
  test items (each names a held-out pair): "a small red circle above a large blue square";
- ``seen_typed`` / ``held_out_typed``: the same items as typed prompts (ldm/data/captions.py `typed_caption`:
  any attribute left out, synonyms, counts, either order, case, punctuation): "Two purple triangles side by side.";
- ``seen_plain`` / ``held_out_plain``: the canonical captions with the size words left out, capitalised, with a
  full stop, as a new user writes them: "A red circle above a blue square."

Also the Fréchet distance in the classifier's features against --n-real real images of the split, and the
figures of the real images themselves (the ceiling of the match, the floor of the FID at this count). Words a
model's vocabulary lacks are counted per set ("unknown-word prompts"): they are read as [UNK].

With --guidance-sweep 1 2 3 4 5, each model's canonical sets are also drawn at each of those guidance scales: the
trade-off between following the caption (all-attribute match) and diversity (FID; at the same count, the real images'
own FID is the floor). Every recipe reports it: a model whose samples are all its most typical image scores well on
the judge and is still a poor generator.

Writes bench/results/prompt_following.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.evaluation.attribute_classifier import load_attribute_classifier  # noqa: E402
from ldm.evaluation.frechet import feature_statistics, frechet_distance_from_statistics  # noqa: E402
from ldm.evaluation.prompt_following import prompt_match  # noqa: E402
from ldm.evaluation.quality_probe import MATCH_COLUMNS, prompt_sets  # noqa: E402
from ldm.inference import load_model, text_to_image  # noqa: E402
from ldm.modules.encoders.tokenization import PromptWarning  # noqa: E402

RESULTS = REPO / "bench" / "results"
SET_TITLES = {"seen": "canonical, seen pairs", "held_out": "canonical, held-out pairs",
              "seen_typed": "typed, seen pairs", "held_out_typed": "typed, held-out pairs",
              "seen_plain": "no size, capitalised, full stop, seen pairs",
              "held_out_plain": "no size, capitalised, full stop, held-out pairs"}


def plain_caption(canonical: str) -> str:
    """"a small red circle above a large blue square" -> "A red circle above a blue square." """
    text = re.sub(r"\b(small|large) ", "", canonical)
    return text[0].upper() + text[1:] + "."


def all_prompt_sets(classifier, n: int, n_real: int) -> dict[str, tuple[list[str], tuple]]:
    """Per set: its captions and the real images' feature statistics; plus the real images' own scores."""
    sets, real = {}, {}
    for name, (captions, images, stats) in prompt_sets(classifier, n, n_real).items():
        sets[name] = (captions, stats)
        real[name] = score(classifier, images, captions, stats)
        if not name.endswith("_typed"):
            plain = f"{name}_plain"
            sets[plain] = ([plain_caption(c) for c in captions], stats)
            real[plain] = score(classifier, images, sets[plain][0], stats)
    return {name: sets[name] for name in SET_TITLES}, {name: real[name] for name in SET_TITLES}


@torch.no_grad()
def score(classifier, images: torch.Tensor, captions: list[str], real_stats: tuple) -> dict[str, float]:
    images = images.to(classifier.head.weight.device)
    match = prompt_match(classifier, images, captions)
    fid = frechet_distance_from_statistics(*feature_statistics(classifier.features(images)), *real_stats)
    return {**{f"match_{c}": match[c] for c in MATCH_COLUMNS}, "fid": fid}


SWEEP_SETS = ("seen", "held_out")


def measure(model, classifier, sets: dict, opt: argparse.Namespace, scale: float) -> dict[str, dict[str, float]]:
    rows = {}
    for name, (captions, stats) in sets.items():
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptWarning)
            images = torch.cat([
                text_to_image(model, captions[s:s + opt.batch_size], scale=scale, sampler=opt.sampler,
                              steps=opt.steps, seed=opt.seed + s, progress=False)
                for s in range(0, len(captions), opt.batch_size)])
        unknown = sum(issubclass(w.category, PromptWarning) and "vocabulary" in str(w.message) for w in caught)
        rows[name] = {**score(classifier, images, captions, stats), "unknown_word_prompts": unknown,
                      "seconds": round(time.perf_counter() - start, 1)}
        print(f"  {name:<15} all {100 * rows[name]['match_all']:5.1f} %  shape {100 * rows[name]['match_shape']:5.1f} %"
              f"  FID {rows[name]['fid']:6.1f}  ({unknown} prompts with unknown words, {rows[name]['seconds']} s)",
              flush=True)
    return rows


def markdown(results: dict, settings: dict, sweeps: dict) -> str:
    lines = ["# Prompt following: canonical captions, typed prompts and plain prompts", "",
             f"Generated by `{settings['command']}` on {settings['machine']} in {settings['wall_minutes']} min. "
             f"{settings['n']} captions per set, {settings['sampler']} {settings['steps']} steps, guidance "
             f"{settings['scale']}, the same seeds for every model; FID in the attribute classifier's features against "
             f"{settings['n_real']} real images of the split (bench/prompt_following.py says how the sets are made).", "",
             "Each cell: share of samples whose every **stated** attribute the classifier reads as the caption says "
             "(per attribute in the columns after), and the FID.", ""]
    header = "| model | prompt set | all | shape | colour | size | position | count | FID | unknown-word prompts |"
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for model, rows in results.items():
        for name, r in rows.items():
            cells = " | ".join("-" if r[f"match_{c}"] != r[f"match_{c}"] else f"{100 * r[f'match_{c}']:.0f}%"
                               for c in MATCH_COLUMNS)
            unknown = r.get("unknown_word_prompts", "")
            lines.append(f"| {model} | {SET_TITLES[name]} | {cells} | {r['fid']:.1f} | {unknown} |")
    if sweeps:
        lines += sweep_markdown(results["real images"], sweeps, settings)
    return "\n".join(lines) + "\n"


def sweep_markdown(real: dict, sweeps: dict, settings: dict) -> list[str]:
    lines = ["", "## Guidance: following the caption against diversity", "",
             f"Canonical captions at each guidance scale ({settings['n']} per set, the same seeds); the real images' "
             f"FID at this count is the floor: {real['seen']['fid']:.1f} seen, {real['held_out']['fid']:.1f} "
             "held-out.", "",
             "| model | guidance | all, seen | all, held-out | shape, seen | shape, held-out | FID, seen | "
             "FID, held-out |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, by_scale in sweeps.items():
        for scale, rows in by_scale.items():
            seen, held = rows["seen"], rows["held_out"]
            lines.append(f"| {model} | {scale:g} | {100 * seen['match_all']:.1f}% | {100 * held['match_all']:.1f}% | "
                         f"{100 * seen['match_shape']:.1f}% | {100 * held['match_shape']:.1f}% | {seen['fid']:.1f} | "
                         f"{held['fid']:.1f} |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, metavar="[LABEL=]MODEL",
                        help="a built-in name or model directory, optionally labelled (default: txt2img); repeatable")
    parser.add_argument("--n", type=int, default=512, help="captions per prompt set (default %(default)s)")
    parser.add_argument("--n-real", dest="n_real", type=int, default=2000, help="real images per split for FID")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    parser.add_argument("--guidance-sweep", dest="guidance_sweep", type=float, nargs="+", default=[],
                        metavar="SCALE", help="also draw the canonical sets at each of these guidance scales")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 captions per set, 64 real images")
    parser.add_argument("--outdir", type=Path, default=RESULTS)
    opt = parser.parse_args(argv)
    if opt.quick:
        opt.n, opt.n_real = 16, 64
    started = time.perf_counter()
    classifier = load_attribute_classifier()
    sets, real = all_prompt_sets(classifier, opt.n, opt.n_real)
    results, sweeps = {"real images": real}, {}
    for spec in opt.model or ["txt2img"]:
        label, _, model = spec.rpartition("=")
        label = label or model
        print(f"{label} ({model}):", flush=True)
        loaded = load_model(model)
        results[label] = measure(loaded, classifier, sets, opt, opt.scale)
        for scale in opt.guidance_sweep:
            print(f"{label} at guidance {scale:g}:", flush=True)
            rows = measure(loaded, classifier, {name: sets[name] for name in SWEEP_SETS}, opt, scale)
            sweeps.setdefault(label, {})[scale] = rows
    settings = {"command": "python bench/prompt_following.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "models": opt.model or ["txt2img"], "n": opt.n, "n_real": opt.n_real, "sampler": opt.sampler,
                "steps": opt.steps, "scale": opt.scale, "seed": opt.seed, "guidance_sweep": opt.guidance_sweep,
                "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads",
                "wall_minutes": round((time.perf_counter() - started) / 60, 1),
                "example_captions": {name: captions[:5] for name, (captions, _) in sets.items()}}
    opt.outdir.mkdir(parents=True, exist_ok=True)
    (opt.outdir / "prompt_following.json").write_text(json.dumps({"settings": settings, "results": results,
                                                                  "guidance_sweep": sweeps}, indent=1) + "\n")
    (opt.outdir / "prompt_following.md").write_text(markdown(results, settings, sweeps))
    print(f"wrote {opt.outdir / 'prompt_following.md'} in {settings['wall_minutes']} min")
    return results


if __name__ == "__main__":
    main()
