#!/usr/bin/env bash
# The main job on the built-in data, from a fresh clone: install, then train the whole pipeline and sample
# from it in under 30 minutes on 2 CPU cores (steps sized from measured step times; see README):
#   1. the KL-f4 first stage (configs/autoencoder/autoencoder_kl_shapes_f4.yaml);
#   2. text-to-image latent diffusion on it (configs/latent-diffusion/txt2img.yaml);
#   3. text-conditioned latent inpainting, started from the txt2img model (configs/latent-diffusion/inpainting_txt.yaml);
#   4. txt2img samples for a few prompts and inpainting of data/inpainting_examples/.
# Each model is exported as a model directory (config.yaml + model.safetensors) under $DEMO_MODELS_DIR
# (default outputs/demo/models). Training is scripts/train_builtin.sh (the recipe of the models shipped in
# models/) with fewer steps, DEMO_*_STEPS; run again after an interruption, it resumes where it stopped.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
MODELS="${DEMO_MODELS_DIR:-outputs/demo/models}"
OUT="${DEMO_OUTDIR:-outputs/demo}"
# The shipped recipe (scripts/train_builtin.sh), shortened to the demo's budget.
# Its three stages only: the super-resolution, semantic and layout models train with train_builtin.sh itself.
export BUILTIN_MODELS_DIR="$MODELS" BUILTIN_LOGDIR="${DEMO_LOGDIR:-logs/demo}" BUILTIN_STAGES="first_stage txt2img inpainting"
# Measured on 2 cores (README): first stage ~17 steps/s (its GAN is on from batch 1,500; at 8,000 steps it kept 92 %
# of shapes and colours, where fs-z8-gan1500 in bench/results/convergence.md had ~70 % at 5,000), txt2img ~10 steps/s;
# a 23-minute run in all.
export BUILTIN_FIRST_STAGE_STEPS="${DEMO_FIRST_STAGE_STEPS:-8000}"  # optimizer steps, 2 per batch
export BUILTIN_TXT2IMG_STEPS="${DEMO_TXT2IMG_STEPS:-6000}"
export BUILTIN_INPAINTING_STEPS="${DEMO_INPAINTING_STEPS:-1500}"  # a fine-tune of the txt2img model
# The txt2img recipe's first two phases fitted to the demo's steps: two thirds at the full rate, then a linear
# decay from 0.3x to 0.01x, which settles what the constant rate keeps shaking (colour, size: see txt2img.yaml).
DECAY=$(( BUILTIN_TXT2IMG_STEPS / 3 ))
SCHEDULE=model.params.scheduler_config.params
export BUILTIN_TXT2IMG_OVERRIDES="$SCHEDULE.warm_up_steps=[300,1] \
$SCHEDULE.cycle_lengths=[$(( BUILTIN_TXT2IMG_STEPS - DECAY )),$DECAY] $SCHEDULE.f_start=[1.0e-6,0.3] \
$SCHEDULE.f_max=[1.0,0.3] $SCHEDULE.f_min=[1.0,0.01]"
START=$(date +%s)
stage() { echo; echo "=== [$(( ($(date +%s) - START) / 60 )) min] $*"; }

stage "1-3/4 training: first stage, txt2img, inpainting (scripts/train_builtin.sh)"
bash "$(dirname "${BASH_SOURCE[0]}")/train_builtin.sh"

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
