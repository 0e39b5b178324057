#!/usr/bin/env bash
# Sample 50,000 ImageNet-256 images from cin256-v2 with DDIM (the baseline) and with FasterDiffusion,
# then score each set with the ADM evaluator, as the published run_image_sample.sh does.
#
# Settings come from the environment:
#   RUN=all|baseline|fd              what to run (default all)
#   FD_SETTINGS=both|published|paired which FasterDiffusion runs (default both):
#     published: the fork's settings (reference context layout, guidance 6, batch 4, key steps ldm250),
#                to reproduce its table;
#     paired:    our corrected context layout, with guidance FD_PAIRED_SCALE (default 1.5, the baseline's
#                scale: a choice of ours, not a published setting), batch 4, key steps ldm250.
#   NUM_GPUS (8), NUM_SAMPLES (50000), SEED (0), PRECISION (fp32), DDIM_STEPS (250),
#   CONFIG_PATH, MODEL_PATH, REF_BATCH (the evaluator's reference .npz), PYTHON (python), MPIEXEC (mpiexec),
#   SAMPLE_ARGS (extra flags for every image_sample.py run, e.g. "--resume").
set -euo pipefail
cd "$(dirname "$0")"

NUM_GPUS=${NUM_GPUS:-8}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
SEED=${SEED:-0}
PRECISION=${PRECISION:-fp32}
DDIM_STEPS=${DDIM_STEPS:-250}
CONFIG_PATH=${CONFIG_PATH:-configs/latent-diffusion/cin256-v2.yaml}
MODEL_PATH=${MODEL_PATH:-models/ldm/cin256-v2/model.ckpt}
REF_BATCH=${REF_BATCH:-evaluations/VIRTUAL_imagenet256_labeled.npz}
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
RUN=${RUN:-all}
FD_SETTINGS=${FD_SETTINGS:-both}
FD_PAIRED_SCALE=${FD_PAIRED_SCALE:-1.5}
SAMPLE_ARGS=${SAMPLE_ARGS:-}

case $RUN in all|baseline|fd) ;; *) echo "error: RUN must be all, baseline or fd, not '$RUN'" >&2; exit 2;; esac
case $FD_SETTINGS in both|published|paired) ;;
    *) echo "error: FD_SETTINGS must be both, published or paired, not '$FD_SETTINGS'" >&2; exit 2;; esac

export NCCL_P2P_DISABLE=1  # as upstream; harmless

# sample_and_evaluate OUTPUT_DIR [image_sample.py flags...]
sample_and_evaluate() {
    local out=$1
    shift
    # shellcheck disable=SC2086  # SAMPLE_ARGS is a list of flags
    "$MPIEXEC" -n "$NUM_GPUS" "$PYTHON" scripts/image_sample.py \
        --config_path "$CONFIG_PATH" --model_path "$MODEL_PATH" --num_samples "$NUM_SAMPLES" --seed "$SEED" \
        --precision "$PRECISION" --ddim_steps "$DDIM_STEPS" --ddim_eta 0.0 --tqdm_disable True \
        --output_dir "$out" "$@" $SAMPLE_ARGS
    "$PYTHON" evaluations/evaluator.py "$REF_BATCH" "$out/samples_${NUM_SAMPLES}x256x256x3.npz" \
        | tee "$out/evaluation.txt"
}

if [[ $RUN == all || $RUN == baseline ]]; then
    sample_and_evaluate output_ldm_eval --batch_size 16 --classifier_scale 1.5 --use_faster_diffusion False
fi
if [[ $RUN == all || $RUN == fd ]]; then
    if [[ $FD_SETTINGS == both || $FD_SETTINGS == published ]]; then
        sample_and_evaluate output_ldm_fdiffusion_eval --batch_size 4 --classifier_scale 6 \
            --use_faster_diffusion True --key_steps ldm250 --context_layout reference
    fi
    if [[ $FD_SETTINGS == both || $FD_SETTINGS == paired ]]; then
        sample_and_evaluate output_ldm_fdiffusion_paired_eval --batch_size 4 --classifier_scale "$FD_PAIRED_SCALE" \
            --use_faster_diffusion True --key_steps ldm250 --context_layout paired
    fi
fi
