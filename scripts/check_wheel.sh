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
"$WORK/venv/bin/ldm-make-inpainting-examples" --outdir examples --n 2 > /dev/null
"$WORK/venv/bin/ldm-inpaint" --indir examples --outdir inpainted --steps 4 > /dev/null
test -f inpainted/shapes_test_000.png -a -f inpainted/shapes_test_001.png
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
# The README's Python as written, and the training and model-building paths of a packaged config (its first
# stage and vocabulary are packaged too), all from the wheel.
"$WORK/venv/bin/python" - "$ROOT/README.md" <<'PYTHON'
import re
import sys
from pathlib import Path

from ldm.model_loading import build_model

for block in re.findall(r"```python\n(.*?)```", Path(sys.argv[1]).read_text(encoding="utf-8"), re.S):
    exec(compile(block, "README.md", "exec"), {})
model = build_model("configs/latent-diffusion/txt2img.yaml")
assert model.first_stage_model is not None and model.cond_stage_model is not None
print("[check_wheel] ok: the README's Python, build_model on a packaged config")
PYTHON
# Every Python block of the README and docs/, as written (placeholders filled with the packaged files).
"$WORK/venv/bin/python" "$ROOT/tests/docs_blocks.py" "$ROOT" 2> docs.log || { cat docs.log; exit 1; }
"$WORK/venv/bin/ldm-train" --base configs/latent-diffusion/txt2img.yaml -t --no-test --max_steps 1 -l runs \
  data.params.batch_size=2 data.params.train.params.num_samples=8 data.params.validation.params.num_samples=4 \
  lightning.callbacks.image_logger.params.disabled=true --limit_val_batches 1 --enable_progress_bar false > train.log
test -f runs/*/checkpoints/last.ckpt || { tail -20 train.log; exit 1; }
echo "[check_wheel] ok: ldm-train --base configs/latent-diffusion/txt2img.yaml trained a step from $PWD"
