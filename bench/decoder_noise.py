"""Benchmark: the same text-to-image model, its latents decoded by different first-stage decoders.

    python bench/decoder_noise.py --decoder shipped=models/first_stage_models/kl-f4-shapes/model.safetensors \
        --decoder noise0.5=logs/<decoder fine-tune run>/checkpoints/last.ckpt

A decoder fine-tuned with `decoder_noise` and `train_decoder_only` (ldm/models/autoencoder.py) keeps the
encoder, so the shipped diffusion model's latents mean the same to it; only how they are drawn changes. For
each decoder: prompt following of the model's samples (the convergence probe's fixed captions, seed, sampler
DPM-Solver++(2M) 20 steps, guidance 3; read by the attribute classifier, which trains nothing here) and the
decoder's reconstructions of held-out images (PSNR, shapes and colours kept). Writes
bench/results/decoder_noise.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.checkpoint import load_state_dict, load_weights  # noqa: E402
from ldm.evaluation.attribute_classifier import load_attribute_classifier  # noqa: E402
from ldm.evaluation.quality_probe import PromptFollowingProbe, reconstruction_quality  # noqa: E402
from ldm.inference import load_model  # noqa: E402
from ldm.script_args import user_errors  # noqa: E402

FIRST_STAGE_PREFIX = "first_stage_model."


def first_stage_weights(path: str) -> dict[str, torch.Tensor]:
    """An autoencoder's inference weights from a first-stage export or training checkpoint (EMA when it has one)."""
    state = load_state_dict(path)
    if any(k.startswith("model_ema.") for k in state):
        raise ValueError(f"{path} holds EMA weights; export them first (scripts/export_weights.py)")
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="txt2img", help="the text-to-image model (built-in name or model dir)")
    parser.add_argument("--decoder", action="append", required=True, metavar="LABEL=WEIGHTS",
                        help="a first stage's weights to decode with (repeatable)")
    parser.add_argument("--n-captions", type=int, default=128, help="captions per split")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decoder_noise.md")
    opt = parser.parse_args()
    with user_errors():
        model = load_model(opt.model)
        decoders = dict(item.split("=", 1) for item in opt.decoder)
        weights = {label: first_stage_weights(path) for label, path in decoders.items()}
    classifier = load_attribute_classifier()
    probe = PromptFollowingProbe(n_captions=opt.n_captions, every_steps=1)
    probe.classifier = classifier
    rows = {}
    for label, state in weights.items():
        load_weights(model.first_stage_model, state, strict=True, source=decoders[label])
        start = time.perf_counter()
        prompts = probe.measure(model)
        recon = reconstruction_quality(model.first_stage_model, classifier)
        rows[label] = {"weights": decoders[label], "prompt_following": prompts, "reconstruction": recon,
                       "seconds": round(time.perf_counter() - start, 1)}
        print(label, json.dumps(rows[label]))
    opt.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# One text-to-image model, different decoders", "",
        f"`python bench/decoder_noise.py` with `--model {opt.model}`; {opt.n_captions} captions per split, "
        "DPM-Solver++(2M) 20 steps, guidance 3, the same seeds for every decoder. Match = share of samples whose "
        "attribute the classifier reads as the caption says (seen / held-out pairs). Reconstructions: 1,024 held-out "
        "images.", "",
        "| decoder | all | shape | colour | size | position | FID | recon PSNR | shapes kept | colours kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        p, r = row["prompt_following"], row["reconstruction"]

        def pair(key: str) -> str:
            return f"{p['seen'][key]:.0%} / {p['held_out'][key]:.0%}"

        lines.append(f"| {label} | {pair('match_all')} | {pair('match_shape')} | {pair('match_colour')} | "
                     f"{pair('match_size')} | {pair('match_position')} | {p['seen']['fid']:.0f} / "
                     f"{p['held_out']['fid']:.0f} | {r['psnr']:.1f} dB | {r['keep_shape']:.1%} | "
                     f"{r['keep_colour']:.1%} |")
    opt.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {opt.out}")


if __name__ == "__main__":
    main()
