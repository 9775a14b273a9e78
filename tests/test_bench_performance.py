"""bench/performance.py: a --quick run (ours against diffusers at txt2img size) writes its tables."""
import csv
import json

from bench.performance import ANALYSIS_MARKER, main


def test_quick_run_times_both_and_writes_tables(tmp_path):
    (tmp_path / "performance.md").write_text("old tables\n" + ANALYSIS_MARKER + "\nkept by hand\n")
    main(["--quick", "--tasks", "forward,sample", "--stage", "smoke", "--outdir", str(tmp_path)])
    with open(tmp_path / "performance.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["impl"]) for r in rows} == {(t, i) for t in ("forward", "sample")
                                                      for i in ("ours", "diffusers")}
    for row in rows:
        assert float(row["median_s"]) > 0 and float(row["ratio"]) > 0
        assert row["ours_options"] == "channels_last"  # the toolkit's default
    forward = [r for r in rows if r["task"] == "forward"]
    assert all(float(r["gflop"]) > 0 and 0 < float(r["ceiling_fraction"]) < 1 for r in forward)
    assert forward[0]["gflop"] == forward[1]["gflop"]  # the same network: the same FLOPs
    assert all(0 <= float(r["overhead"]) < 0.5 for r in rows if r["task"] == "sample")
    meta = json.loads((tmp_path / "performance.json").read_text())
    assert set(meta["smoke/cpu"]["ceiling"]) == {"matmul", "conv3x3"}
    report = (tmp_path / "performance.md").read_text()
    assert "## smoke (cpu)" in report and "old tables" not in report
    assert report.endswith("kept by hand\n")  # the hand-written analysis survives a rerun
