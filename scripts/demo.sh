#!/usr/bin/env bash
# The main job on the built-in data: install, train the shapes KL autoencoder for a short run,
# then write a grid of held-out reconstructions with their PSNR/SSIM.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
STEPS="${DEMO_STEPS:-2400}"   # optimizer steps (2 per batch); about 5 minutes on 2 CPU cores
python main.py --base configs/autoencoder/autoencoder_kl_shapes_f4.yaml -t --no-test -n demo_kl_f4 \
  --max_steps "$STEPS"
RUN="$(ls -d logs/*_demo_kl_f4 | sort | tail -n 1)"
python scripts/reconstruct.py --run "$RUN" --n 32 --outdir outputs/demo
echo
echo "run directory (checkpoints, training image grids, metrics): $RUN"
echo "held-out reconstructions: outputs/demo/reconstructions.png"
