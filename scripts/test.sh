#!/usr/bin/env bash
# Install everything into .venv and run the test suite (what CI runs).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# One worker per core, at most LDM_TEST_WORKERS (default 2: each worker holds its own models and fixtures, so
# a many-core machine would otherwise fill its memory); each test runs single-threaded (tests/conftest.py).
# worksteal: the end-to-end runs take 10-50 s against milliseconds for most tests, so idle workers take over
# queued tests instead of waiting on a fixed share.
WORKERS="$(python -c "import os; print(min(len(os.sched_getaffinity(0)), int(os.environ.get('LDM_TEST_WORKERS', 2))))")"
python -m pytest -q -n "$WORKERS" --dist worksteal "$@"
