#!/usr/bin/env bash
# The main job on the built-in data, from a fresh clone: install, then train the whole pipeline and sample
# from it, about 30 minutes on 2 CPU cores (30 min 46 s measured from a fresh clone, install included):
#   1. the KL-f4 first stage (configs/autoencoder/autoencoder_kl_shapes_f4.yaml, a short run);
#   2. text-to-image latent diffusion on it (configs/latent-diffusion/txt2img.yaml);
#   3. latent inpainting on it (configs/latent-diffusion/inpainting.yaml);
#   4. txt2img samples for a few prompts and inpainting of data/inpainting_examples/.
# Each model is exported as a model directory (config.yaml + model.safetensors) under $DEMO_MODELS_DIR
# (default outputs/demo/models). The models shipped in models/ were made by this script with
# DEMO_MODELS_DIR=models. Step counts can be changed with DEMO_*_STEPS.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
MODELS="${DEMO_MODELS_DIR:-outputs/demo/models}"
OUT="${DEMO_OUTDIR:-outputs/demo}"
FIRST_STAGE_STEPS="${DEMO_FIRST_STAGE_STEPS:-3200}"  # optimizer steps, 2 per batch (autoencoder + discriminator)
TXT2IMG_STEPS="${DEMO_TXT2IMG_STEPS:-1500}"
INPAINTING_STEPS="${DEMO_INPAINTING_STEPS:-1500}"
FIRST_STAGE="$MODELS/first_stage_models/kl-f4-shapes"
# The scripts below sample from the trained models; the training runs' own image grids are skipped.
NO_IMAGE_LOG="lightning.callbacks.image_logger.params.disabled=true"
START=$(date +%s)

stage() { echo; echo "=== [$(( ($(date +%s) - START) / 60 )) min] $*"; }
latest_run() { ls -d logs/*_"$1" | sort | tail -n 1; }

stage "1/4 first stage: $FIRST_STAGE_STEPS optimizer steps"
python main.py --base configs/autoencoder/autoencoder_kl_shapes_f4.yaml -t --no-test -n demo_first_stage \
  --max_steps "$FIRST_STAGE_STEPS" "$NO_IMAGE_LOG"
python scripts/export_weights.py "$(latest_run demo_first_stage)/checkpoints/last.ckpt" --model-dir "$FIRST_STAGE" --dtype fp16

for model in txt2img inpainting; do
  steps=$([ "$model" = txt2img ] && echo "$TXT2IMG_STEPS" || echo "$INPAINTING_STEPS")
  stage "$([ "$model" = txt2img ] && echo 2 || echo 3)/4 $model latent diffusion: $steps steps"
  python main.py --base "configs/latent-diffusion/$model.yaml" -t --no-test -n "demo_$model" --max_steps "$steps" \
    "model.params.first_stage_config.params.ckpt_path=$FIRST_STAGE/model.safetensors" "$NO_IMAGE_LOG"
  python scripts/export_weights.py "$(latest_run "demo_$model")/checkpoints/last.ckpt" \
    --model-dir "$MODELS/ldm/$model-shapes" --dtype fp16
done

stage "4/4 sampling"
python scripts/txt2img.py --config "$MODELS/ldm/txt2img-shapes" --outdir "$OUT/txt2img" --n_samples 8 --scale 3 \
  --prompt "a large red circle on the left"
python scripts/txt2img.py --config "$MODELS/ldm/txt2img-shapes" --outdir "$OUT/txt2img" --n_samples 8 --scale 3 \
  --prompt "a blue square above a yellow triangle"
python scripts/inpaint.py --config "$MODELS/ldm/inpainting-shapes" --indir data/inpainting_examples \
  --outdir "$OUT/inpainting"

stage "done in $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s"
echo "models (config.yaml + model.safetensors): $MODELS"
echo "txt2img samples and grids: $OUT/txt2img"
ls "$OUT"/txt2img/grid-*.png
echo "inpainting results: $OUT/inpainting"
