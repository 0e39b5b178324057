#!/usr/bin/env bash
# GPU profile: one cin256-v2 UNet forward (356 rows, fp16 stored weights, random weights) under
# benchmarks/profile_forward.py in the variants that decide where the time goes: eager and compiled, with cuDNN's
# autotuner off and on, attention through SDPA and through plain matmuls. Each run's table goes to stdout and to
# $OUT_DIR/<time>/<variant>.txt (OUT_DIR: outputs/gpu_profile); the whole script stops after LIMIT seconds (540).
#
#     bash benchmarks/gpu_profile.sh                  # from the repository root, with .venv (or PYTHON=...)
#     bash benchmarks/gpu_profile.sh --rows 128       # extra flags go to every profile_forward.py run
#
# Compiled code is cached in outputs/cache/torch_compile, so only the first compiled variant of each attention
# backend compiles from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/find_gpu_python.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/outputs/cache/torch_compile}
OUT=${OUT_DIR:-outputs/gpu_profile}/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
deadline=$((SECONDS + ${LIMIT:-540}))
status=0
for variant in "compiled" "compiled --cudnn_benchmark" "compiled --attention matmul" \
               "compiled --attention matmul --cudnn_benchmark" "eager" "eager --attention matmul"; do
    left=$((deadline - SECONDS))
    if [ "$left" -le 10 ]; then
        echo "gpu_profile: out of time before: $variant" >&2
        status=124
        break
    fi
    name=$(echo "$variant" | tr -d '-' | tr ' ' '_')
    flags=${variant/#eager/}
    flags=${flags/#compiled/--compile}
    echo "== $variant"
    # shellcheck disable=SC2086  # flags are words on purpose
    timeout "$left" "$PY" benchmarks/profile_forward.py --device cuda $flags --top 15 "$@" | tee "$OUT/$name.txt" \
        || status=$?
done
echo "tables: $OUT"
exit "$status"
