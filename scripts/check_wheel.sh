#!/usr/bin/env bash
# Install the package as a user would and use it from outside the checkout (what `.ci/run` checks after the
# tests): build the wheel, install it (not editable) into a fresh virtual environment, then from an empty
# directory elsewhere
#   - sample with the `ldm-txt2img` console script from the built-in model the wheel carries,
#   - copy a model directory and load it by absolute path, and build a training config by its packaged name.
# Set-up as scripts/setup_env.sh: the exact CPU torch first (these machines only), the rest as declared.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "[check_wheel] building the wheel"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$WORK/dist" "$ROOT"
"$PY" -m venv "$WORK/venv"
echo "[check_wheel] installing $(basename "$WORK"/dist/ldm-*.whl) into a fresh virtual environment"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" "$WORK"/dist/ldm-*.whl \
  2> >(grep -v "is ignored: it is neither" >&2)
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
"$WORK/venv/bin/ldm-txt2img" --prompt "a large red circle in the center" --n_samples 2 --steps 4 --outdir out
test -f out/samples/00000.png -a -f out/samples/00001.png -a -f out/grid-0000.png
"$WORK/venv/bin/python" - <<'PYTHON'
import shutil
from pathlib import Path

import ldm
from ldm.assets import resolve
from ldm.config import load_configs
from ldm.inference import load_model, text_to_image

assert "site-packages" in ldm.__file__, f"imported {ldm.__file__}, not the installed wheel"
copy = Path("my-model").resolve()
shutil.copytree(resolve("models/ldm/txt2img-shapes"), copy)
model = load_model(str(copy))
images = text_to_image(model, ["a small blue square on the left"], steps=4, seed=0, progress=False)
assert images.shape == (1, 3, 32, 32), images.shape
config = load_configs(["configs/latent-diffusion/txt2img.yaml"])
assert config.model.target == "ldm.models.diffusion.ddpm.LatentDiffusion"
print(f"[check_wheel] ok: ldm-txt2img wrote out/, a copied model directory loads from {copy}")
PYTHON
