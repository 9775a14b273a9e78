#!/usr/bin/env bash
# Train the built-in models on the built-in data with the shipped recipe, and export each as a model
# directory (config.yaml + model.safetensors):
#   1. the KL-f4 first stage   (configs/autoencoder/autoencoder_kl_shapes_f4.yaml)
#   2. text-to-image LDM on it (configs/latent-diffusion/txt2img.yaml): on the canonical captions, then on typed ones
#   3. text-conditioned inpainting LDM, started from the txt2img model (configs/latent-diffusion/inpainting_txt.yaml)
#   4. x4 super-resolution (configs/latent-diffusion/sr_shapes.yaml), semantic synthesis
#      (semantic2img_shapes.yaml) and layout-to-image (layout2img_shapes.yaml) on the same first stage
#
#   bash scripts/train_builtin.sh                          # the full recipe (hours on 2 CPU cores)
#   BUILTIN_MODELS_DIR=models bash scripts/train_builtin.sh   # remake the models shipped in models/
#   BUILTIN_STAGES="txt2img" bash scripts/train_builtin.sh    # only some stages (default: all, in order)
#
# Interrupt it at any time (Ctrl-C, SIGTERM, a lost machine): every stage writes last.ckpt when stopped,
# and running the same command again resumes each unfinished stage exactly (`main.py -r`) and skips the
# finished ones. Step counts: BUILTIN_{FIRST_STAGE,TXT2IMG,INPAINTING,SUPERRES,SEMANTIC2IMG,LAYOUT2IMG}_STEPS, and
# BUILTIN_TXT2IMG_TYPED_RUNS the text model's runs on typed captions ("STEPS:RATE[:HOLD] ...": the rate held HOLD
# steps, then decaying to 1e-5; default "3000:3e-4 3000:1e-4 8000:5e-4:4000 10000:5e-4:5000");
# BUILTIN_TXT2IMG_OVERRIDES adds config overrides (key=value, space-separated) to the txt2img stage's first run, e.g. a
# learning-rate schedule fitted to fewer steps, and BUILTIN_TXT2IMG_TYPED_OVERRIDES to each typed run.
# BUILTIN_FIRST_STAGE_DIR is the first stage's model directory the other stages train on (and stage first_stage exports
# to): default $BUILTIN_MODELS_DIR/first_stage_models/kl-f4-shapes; models/first_stage_models/kl-f4-shapes trains the
# later stages on the shipped one.
# On a GPU add BUILTIN_TRAINER_ARGS="--accelerator gpu --devices 1".
# scripts/demo.sh runs this recipe shortened.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
MODELS="${BUILTIN_MODELS_DIR:-outputs/builtin/models}"
LOGS="${BUILTIN_LOGDIR:-logs/builtin}"
STAGES="${BUILTIN_STAGES:-first_stage txt2img inpainting superres semantic2img layout2img}"
FIRST_STAGE_STEPS="${BUILTIN_FIRST_STAGE_STEPS:-12000}"  # optimizer steps, 2 per batch (autoencoder + discriminator)
TXT2IMG_STEPS="${BUILTIN_TXT2IMG_STEPS:-12000}"
# The typed-caption runs after it: STEPS:RATE[:HOLD] each, its rate held HOLD steps then decaying linearly to 1e-5
# (what the shipped model had; typed-finetune-4/5-raised warmed up over 200 steps where this recipe takes 100).
TXT2IMG_TYPED_RUNS="${BUILTIN_TXT2IMG_TYPED_RUNS:-3000:3e-4 3000:1e-4 8000:5e-4:4000 10000:5e-4:5000}"
INPAINTING_STEPS="${BUILTIN_INPAINTING_STEPS:-6000}"
SUPERRES_STEPS="${BUILTIN_SUPERRES_STEPS:-46000}"
SEMANTIC2IMG_STEPS="${BUILTIN_SEMANTIC2IMG_STEPS:-46000}"
LAYOUT2IMG_STEPS="${BUILTIN_LAYOUT2IMG_STEPS:-8000}"
TRAINER_ARGS="${BUILTIN_TRAINER_ARGS:-}"
read -r -a TXT2IMG_OVERRIDES <<< "${BUILTIN_TXT2IMG_OVERRIDES:-}"
read -r -a TXT2IMG_TYPED_OVERRIDES <<< "${BUILTIN_TXT2IMG_TYPED_OVERRIDES:-}"
declare -A TASK_CONFIGS=([superres]=sr_shapes [semantic2img]=semantic2img_shapes [layout2img]=layout2img_shapes)
FIRST_STAGE="${BUILTIN_FIRST_STAGE_DIR:-$MODELS/first_stage_models/kl-f4-shapes}"
# The quality probes and sampling scripts judge the models; the runs' own image grids are skipped.
NO_IMAGE_LOG="lightning.callbacks.image_logger.params.disabled=true"
START=$(date +%s)

say() { echo; echo "=== [$(( ($(date +%s) - START) / 60 )) min] $*"; }

# train NAME CONFIG STEPS [overrides...]: a fresh run, or `-r` of the unfinished run of that name.
train() {
  local name="$1" config="$2" steps="$3"; shift 3
  local run
  run=$(ls -d "$LOGS"/*_"$name" 2>/dev/null | sort | tail -n 1 || true)
  if [ -n "$run" ] && [ -f "$run/checkpoints/last.ckpt" ]; then
    say "$name: resuming $run to $steps steps"
    # shellcheck disable=SC2086
    python main.py -r "$run" -t --no-test --max_steps "$steps" $TRAINER_ARGS "$NO_IMAGE_LOG" "$@"
  else
    say "$name: $steps steps of $config"
    # shellcheck disable=SC2086
    python main.py --base "$config" -t --no-test -n "$name" -l "$LOGS" --max_steps "$steps" $TRAINER_ARGS \
      "$NO_IMAGE_LOG" "$@"
    run=$(ls -d "$LOGS"/*_"$name" | sort | tail -n 1)
  fi
  LAST_RUN="$run"
}

for stage in $STAGES; do
  case "$stage" in
    first_stage)
      train builtin_first_stage configs/autoencoder/autoencoder_kl_shapes_f4.yaml "$FIRST_STAGE_STEPS"
      python scripts/export_weights.py --overwrite "$LAST_RUN/checkpoints/last.ckpt" --model-dir "$FIRST_STAGE" --dtype fp16
      ;;
    txt2img)
      # The canonical captions first, where shape is learned soonest (on typed captions from the start it came
      # ~1,000 steps later: typed-captions-scratch against z8-v-batch128), then runs on the typed captions from
      # those weights, each a fresh optimizer (typed-finetune, typed-finetune-2, typed-finetune-4/5-raised in
      # bench/results/convergence.md):
      # the model then reads prompts as people write them (words left out, synonyms, counts, case, punctuation).
      train builtin_txt2img configs/latent-diffusion/txt2img.yaml "$TXT2IMG_STEPS" \
        "model.params.first_stage_config.params.ckpt_path=$FIRST_STAGE/model.safetensors" \
        data.params.train.params.caption_style=canonical "${TXT2IMG_OVERRIDES[@]}"
      schedule=model.params.scheduler_config.params
      typed=0
      for run_spec in $TXT2IMG_TYPED_RUNS; do
        typed=$((typed + 1))
        IFS=: read -r steps rate hold <<< "$run_spec"
        hold="${hold:-0}"
        # txt2img.yaml's base rate is 1e-3: the schedule's factors are rate / 1e-3, down to 1e-5 / 1e-3. With a
        # HOLD the rate stays there for HOLD steps (after the warm-up), then decays over the rest.
        factor=$(python -c "print($rate / 1e-3)")
        if [ "$hold" -gt 0 ]; then
          cycles="$schedule.warm_up_steps=[100,1] $schedule.cycle_lengths=[$hold,$((steps - hold))]"
          cycles+=" $schedule.f_start=[1.0e-6,$factor] $schedule.f_max=[$factor,$factor] $schedule.f_min=[$factor,0.01]"
        else
          cycles="$schedule.warm_up_steps=[100] $schedule.cycle_lengths=[$steps] $schedule.f_start=[1.0e-6]"
          cycles+=" $schedule.f_max=[$factor] $schedule.f_min=[0.01]"
        fi
        read -r -a cycle_overrides <<< "$cycles"
        train "builtin_txt2img_typed$typed" configs/latent-diffusion/txt2img.yaml "$steps" \
          "model.params.first_stage_config.params.ckpt_path=$FIRST_STAGE/model.safetensors" \
          "model.params.ckpt_path=$LAST_RUN/checkpoints/last.ckpt" "${cycle_overrides[@]}" "${TXT2IMG_TYPED_OVERRIDES[@]}"
      done
      # --share-first-stage: the built-in models share one first stage file (the wheel carries it once).
      python scripts/export_weights.py --overwrite "$LAST_RUN/checkpoints/last.ckpt" --model-dir "$MODELS/ldm/txt2img-shapes" \
        --dtype fp16 --share-first-stage
      ;;
    inpainting)
      # Starts from the txt2img model above (Stable Diffusion's inpainting recipe).
      train builtin_inpainting configs/latent-diffusion/inpainting_txt.yaml "$INPAINTING_STEPS" \
        "model.params.first_stage_config.params.ckpt_path=$FIRST_STAGE/model.safetensors" \
        "model.params.init_from_text_model=$MODELS/ldm/txt2img-shapes/model.safetensors"
      python scripts/export_weights.py --overwrite "$LAST_RUN/checkpoints/last.ckpt" --model-dir "$MODELS/ldm/inpainting-shapes" \
        --dtype fp16 --share-first-stage
      ;;
    superres|semantic2img|layout2img)
      # Conditioned on pixels, label maps or boxes instead of text; each its own model on the shared first stage.
      steps_var="${stage^^}_STEPS"
      init=()  # the layout model's U-Net starts from the text-to-image model's (see its config)
      [ "$stage" = layout2img ] && init=("model.params.ckpt_path=$MODELS/ldm/txt2img-shapes/model.safetensors")
      train "builtin_$stage" "configs/latent-diffusion/${TASK_CONFIGS[$stage]}.yaml" "${!steps_var}" \
        "model.params.first_stage_config.params.ckpt_path=$FIRST_STAGE/model.safetensors" "${init[@]}"
      python scripts/export_weights.py --overwrite "$LAST_RUN/checkpoints/last.ckpt" --model-dir "$MODELS/ldm/$stage-shapes" \
        --dtype fp16 --share-first-stage
      ;;
    *) echo "unknown stage '$stage' in BUILTIN_STAGES (use first_stage, txt2img, inpainting, superres, semantic2img," \
         "layout2img)" >&2; exit 2 ;;
  esac
done
say "done; models in $MODELS"
