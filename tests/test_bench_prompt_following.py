"""bench/prompt_following.py end to end on a tiny model: six prompt sets, figures and reports written."""
import importlib.util
import json

from tests.test_main import REPO


def test_prompt_following_bench_writes_every_set(tmp_path, tiny_txt2img_model):
    spec = importlib.util.spec_from_file_location("prompt_following", REPO / "bench" / "prompt_following.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.plain_caption("a small red circle above a large blue square") == "A red circle above a blue square."
    results = bench.main(["--quick", "--model", f"tiny={tiny_txt2img_model}", "--steps", "4", "--outdir",
                          str(tmp_path), "--guidance-sweep", "1", "5"])
    assert list(results) == ["real images", "tiny"]
    assert list(results["tiny"]) == list(bench.SET_TITLES)
    for name, row in results["real images"].items():
        assert row["match_all"] == 1.0, name  # the real images show what their captions say
    for row in results["tiny"].values():
        assert 0.0 <= row["match_all"] <= row["match_colour"] <= 1.0 and row["fid"] > 0
    saved = json.loads((tmp_path / "prompt_following.json").read_text())
    report = (tmp_path / "prompt_following.md").read_text()
    assert saved["settings"]["n"] == 16 and "typed, held-out pairs" in report
    # The guidance sweep: the canonical sets at each scale, in the JSON and as a table.
    assert list(saved["guidance_sweep"]["tiny"]) == ["1.0", "5.0"]
    assert set(saved["guidance_sweep"]["tiny"]["5.0"]) == {"seen", "held_out"}
    assert "| tiny | 1 |" in report and "| tiny | 5 |" in report
