#!/usr/bin/env bash
# Install everything into .venv and run the test suite (what CI runs).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m pytest -q "$@"
