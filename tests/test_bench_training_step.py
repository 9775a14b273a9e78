"""bench/training_step.py: a tiny run times the bare step and both real loops and writes its report."""
import json

from bench.training_step import main


def test_tiny_run_times_bare_and_real_loops_and_writes_report(tmp_path):
    main(["--steps", "3", "--warmup", "3", "--pool", "24", "--batch-size", "8", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "training_step.json").read_text())
    for run in ("cached", "uncached", "text_encoder"):
        assert result[run]["s_per_step"] > 0 and result[run]["cpu_ratio"] > 0
    assert result["cached"]["cache_hit_rate"] == 1.0  # warm-up covered the pool: every timed item was cached
    assert result["cached"]["cached_items"] == 24
    assert "cache_hit_rate" not in result["uncached"]
    assert "(b) real loop, cache_latents on" in (tmp_path / "training_step.md").read_text()
