"""The benchmarks' peak resident memory of a run is the run's own: Linux carries a process's ru_maxrss across fork and
exec, so a small child of a large benchmark process would report the benchmark's size (bench/own_data_digits.py
`run_measured`, used by bench/fine_tuning.py too)."""
import importlib.util
import sys

from tests.helpers import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("own_data_digits", REPO / "bench" / "own_data_digits.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return bench


def test_a_small_child_of_a_large_process_reports_its_own_peak():
    held = b"x" * (400 << 20)  # resident in this process, not just reserved
    child = "b = b'x' * (100 << 20); import time; time.sleep(0.3)"
    _, peak = _bench().run_measured([sys.executable, "-c", child])
    assert 100 << 20 <= peak < 300 << 20, peak / 2**20
    del held
