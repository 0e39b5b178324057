#!/usr/bin/env bash
# Sample 50,000 ImageNet-256 images from cin256-v2 with DDIM (the baseline) and with FasterDiffusion,
# then score each set with the ADM evaluator, as the published run_image_sample.sh does.
#
# Before any sampling it checks the evaluator's inputs: the reference batch, and the Inception graph (fetched
# once if missing). Each run samples into the sampler's default folder under ./outputs/samples/ (named after
# its settings, relative to the current directory), so rerunning a finished run only scores it again; the
# sampler's last line names the .npz it wrote, and the scores go to evaluation.txt beside it, replaced only
# when the evaluator succeeds.
#
# Settings come from the environment:
#   RUN=all|baseline|fd              what to run (default all)
#   FD_SETTINGS=both|published|paired which FasterDiffusion runs (default both):
#     published: the fork's settings (reference context layout, guidance 6, batch 4, key steps ldm250),
#                to reproduce its table;
#     paired:    our corrected context layout, with guidance FD_PAIRED_SCALE (default 1.5, the baseline's
#                scale: a choice of ours, not a published setting), batch 4, key steps ldm250.
#   NUM_GPUS (8), NUM_SAMPLES (50000), SEED (0), PRECISION (fp32), DDIM_STEPS (250),
#   CONFIG_PATH, MODEL_PATH, REF_BATCH (the evaluator's reference .npz), INCEPTION_PATH (a local
#   classify_image_graph_def.pb; default: the evaluator's cached download), PYTHON (python),
#   MPIEXEC (mpiexec), SAMPLE_ARGS (extra flags for every image_sample.py run, e.g. "--resume").
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)

NUM_GPUS=${NUM_GPUS:-8}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
SEED=${SEED:-0}
PRECISION=${PRECISION:-fp32}
DDIM_STEPS=${DDIM_STEPS:-250}
CONFIG_PATH=${CONFIG_PATH:-$REPO/configs/latent-diffusion/cin256-v2.yaml}
MODEL_PATH=${MODEL_PATH:-$REPO/models/ldm/cin256-v2/model.ckpt}
REF_BATCH=${REF_BATCH:-$REPO/evaluations/VIRTUAL_imagenet256_labeled.npz}
INCEPTION_PATH=${INCEPTION_PATH:-}
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
RUN=${RUN:-all}
FD_SETTINGS=${FD_SETTINGS:-both}
FD_PAIRED_SCALE=${FD_PAIRED_SCALE:-1.5}
SAMPLE_ARGS=${SAMPLE_ARGS:-}

case $RUN in all|baseline|fd) ;; *) echo "error: RUN must be all, baseline or fd, not '$RUN'" >&2; exit 2;; esac
case $FD_SETTINGS in both|published|paired) ;;
    *) echo "error: FD_SETTINGS must be both, published or paired, not '$FD_SETTINGS'" >&2; exit 2;; esac
command -v "$MPIEXEC" >/dev/null || { echo "error: MPIEXEC '$MPIEXEC' not found" >&2; exit 2; }

export NCCL_P2P_DISABLE=1  # as upstream; harmless
EVALUATOR=("$PYTHON" "$REPO/evaluations/evaluator.py" ${INCEPTION_PATH:+--inception_path "$INCEPTION_PATH"})
WORK=$(mktemp -d)
PENDING=""  # an evaluation being written
trap 'rm -rf "$WORK" ${PENDING:+"$PENDING"}' EXIT

"${EVALUATOR[@]}" "$REF_BATCH" --check_only

# sample_and_evaluate [image_sample.py flags...]
sample_and_evaluate() {
    # shellcheck disable=SC2086  # SAMPLE_ARGS is a list of flags
    "$MPIEXEC" -n "$NUM_GPUS" "$PYTHON" "$REPO/scripts/image_sample.py" \
        --config_path "$CONFIG_PATH" --model_path "$MODEL_PATH" --num_samples "$NUM_SAMPLES" --seed "$SEED" \
        --precision "$PRECISION" --ddim_steps "$DDIM_STEPS" --ddim_eta 0.0 --tqdm_disable True \
        "$@" $SAMPLE_ARGS | tee "$WORK/sample.log"
    local npz
    npz=$(sed -n 's/^samples: //p' "$WORK/sample.log" | tail -n 1)
    if [[ -z $npz ]]; then
        echo "error: the sampler did not name the file it wrote" >&2
        exit 1
    fi
    PENDING="$(dirname "$npz")/.evaluation.txt.$$.tmp"
    "${EVALUATOR[@]}" "$REF_BATCH" "$npz" | tee "$PENDING"
    mv "$PENDING" "$(dirname "$npz")/evaluation.txt"
    PENDING=""
}

if [[ $RUN == all || $RUN == baseline ]]; then
    sample_and_evaluate --batch_size 16 --classifier_scale 1.5 --use_faster_diffusion False
fi
if [[ $RUN == all || $RUN == fd ]]; then
    if [[ $FD_SETTINGS == both || $FD_SETTINGS == published ]]; then
        sample_and_evaluate --batch_size 4 --classifier_scale 6 \
            --use_faster_diffusion True --key_steps ldm250 --context_layout reference
    fi
    if [[ $FD_SETTINGS == both || $FD_SETTINGS == paired ]]; then
        sample_and_evaluate --batch_size 4 --classifier_scale "$FD_PAIRED_SCALE" \
            --use_faster_diffusion True --key_steps ldm250 --context_layout paired
    fi
fi
