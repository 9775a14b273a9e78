"""Figures quoted outside bench/results/ are the ones measured there: each quote below is rebuilt from the
benchmark's JSON (rounded as quoted) and must appear in its page word for word (line breaks aside)."""
from __future__ import annotations

import json
import re

import pytest

from tests.helpers import REPO

# (page, benchmark JSON, quote with {model.set} for the share of samples matching every stated attribute, in %).
QUOTES = [
    ("models/ldm/txt2img-shapes/README.md", "bench/results/prompt_following.json",
     "canonical captions {after.seen} % / {after.held_out} % (before: {before.seen} % / {before.held_out} %), "
     "typed prompts {after.seen_typed} % / {after.held_out_typed} % (before: {before.seen_typed} % / "
     "{before.held_out_typed} %"),
    ("models/ldm/txt2img-shapes/README.md", "bench/results/prompt_following.json",
     '("A red circle above a blue square.") {after.seen_plain} % / {after.held_out_plain} % (before: '
     "{before.seen_plain} % / {before.held_out_plain} %)"),
    ("docs/benchmarks.md", "bench/results/demo/c6000-t500/prompt_following.json",
     "canonical {demo.seen} % / {demo.held_out} %, typed {demo.seen_typed} % / {demo.held_out_typed} %, plain "
     "{demo.seen_plain} % / {demo.held_out_plain} % (`bench/results/demo/c6000-t500/`)"),
    ("docs/benchmarks.md", "bench/results/demo/whole-run-ema-restart/prompt_following.json",
     "canonical {raw.seen} % / {raw.held_out} %, typed {raw.seen_typed} % / {raw.held_out_typed} % (70.9 % / 70.9 % "
     "unrounded), plain {raw.seen_plain} % / {raw.held_out_plain} %"),
    ("docs/benchmarks.md", "bench/results/demo/whole-run-ema-restart/prompt_following.json",
     "canonical {ema-restart.seen} % / {ema-restart.held_out} %, typed {ema-restart.seen_typed} % / "
     "{ema-restart.held_out_typed} % (69.7 % seen unrounded), plain {ema-restart.seen_plain} % / "
     "{ema-restart.held_out_plain} %"),
    ("docs/benchmarks.md", "bench/results/demo/ema-vs-raw/prompt_following.json",
     "typed {raw.seen_typed} % / {raw.held_out_typed} % against {ema.seen_typed} % / {ema.held_out_typed} %"),
    ("docs/benchmarks.md", "bench/results/demo/split-5000-1500/prompt_following.json",
     "canonical {c5000-t1500.seen} % / {c5000-t1500.held_out} %, typed {c5000-t1500.seen_typed} % / "
     "{c5000-t1500.held_out_typed} %, plain {c5000-t1500.seen_plain} % / {c5000-t1500.held_out_plain} %"),
    ("docs/benchmarks.md", "bench/results/demo/c5500-t1000h/prompt_following.json",
     "canonical {c5500-t1000h.seen} % / {c5500-t1000h.held_out} %, typed {c5500-t1000h.seen_typed} % / "
     "{c5500-t1000h.held_out_typed} %, plain {c5500-t1000h.seen_plain} % / {c5500-t1000h.held_out_plain} %"),
    ("docs/benchmarks.md", "bench/results/demo/lr-2e-3/prompt_following.json",
     "canonical {lr2e-3.seen} % / {lr2e-3.held_out} %, typed {lr2e-3.seen_typed} % / {lr2e-3.held_out_typed} %, "
     "plain {lr2e-3.seen_plain} % / {lr2e-3.held_out_plain} %"),
]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("page, source, quote", QUOTES)
def test_quoted_figures_match_the_benchmarks_results(page, source, quote):
    results = json.loads((REPO / source).read_text())["results"]

    def figure(match: re.Match) -> str:
        model, prompt_set = match.group(1).rsplit(".", 1)
        return f"{100 * results[model][prompt_set]['match_all']:.0f}"

    expected = re.sub(r"\{([\w .-]+)\}", figure, quote)
    assert expected in _flat((REPO / page).read_text(encoding="utf-8")), f"{page} should quote {source}: {expected}"
