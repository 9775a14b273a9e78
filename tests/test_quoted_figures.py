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
    ("docs/benchmarks.md", "bench/results/demo/prompt_following.json",
     "canonical captions {demo.seen} % / {demo.held_out} %, typed prompts {demo.seen_typed} % / "
     "{demo.held_out_typed} %, plain prompts {demo.seen_plain} % / {demo.held_out_plain} %"),
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
