#!/usr/bin/env bash
# The main job on the built-in data: install, then train the text-to-image latent diffusion model
# (configs/latent-diffusion/txt2img.yaml) on top of the shipped KL-f4 first stage for a short run. The
# run logs grids of its samples, guided samples and their captions.
# (The first stage itself is remade with: python main.py --base models/first_stage_models/kl-f4-shapes/config.yaml -t)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
STEPS="${DEMO_STEPS:-1500}"   # about 15 minutes on 2 CPU cores (14 min 17 s measured); the config's full run is 3000 steps
python main.py --base configs/latent-diffusion/txt2img.yaml -t --no-test -n demo_txt2img \
  --max_steps "$STEPS" "lightning.callbacks.image_logger.params.batch_frequency=$STEPS"
RUN="$(ls -d logs/*_demo_txt2img | sort | tail -n 1)"
echo
echo "run directory (checkpoints, metrics): $RUN"
echo "samples after $STEPS steps, with their captions (images/train/):"
ls "$RUN"/images/train/{conditioning,samples,samples_cfg_scale_3.00}_gs-*.png
