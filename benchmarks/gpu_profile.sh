#!/usr/bin/env bash
# GPU profile: one cin256-v2 UNet forward (356 rows, fp16 stored weights, random weights) under
# benchmarks/profile_forward.py, compiled: as the sampling scripts run it (cuDNN's autotuner on, attention "auto":
# plain matmuls for cin256-v2's wide heads), then with inductor tuning its generated kernels' launch settings
# (coordinate_descent_tuning) and with the weights frozen into the graph as constants (freezing: inductor then
# joins matmuls that share an input, such as attention's q, k and v, and lays out the convolutions' weights once,
# at compile time). MAX_AUTOTUNE=1 adds inductor timing its own matmul and convolution templates
# against the libraries' (max_autotune, the longest compile, last); EAGER=1 adds the eager forward. Each run's
# table goes to stdout and to $OUT_DIR/<time>/<variant>.txt (OUT_DIR: outputs/gpu_profile); the flags of the
# fastest compiled forward go to $OUT_DIR/best_flags, for gpu_check.sh. The script stops after LIMIT seconds (300).
#
#     bash benchmarks/gpu_profile.sh                  # from the repository root, with .venv (or PYTHON=...)
#     bash benchmarks/gpu_profile.sh --rows 128       # extra flags go to every profile_forward.py run
#     bash benchmarks/gpu_check.sh $(cat outputs/gpu_profile/best_flags)
#
# Compiled code is cached in outputs/cache/torch_compile (by inductor option too): a second run compiles far faster.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/find_gpu_python.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/outputs/cache/torch_compile}
OUT_DIR=${OUT_DIR:-outputs/gpu_profile}
OUT=$OUT_DIR/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
deadline=$((SECONDS + ${LIMIT:-300}))
status=0
table_name() { echo "$1" | tr -d '-' | tr ' =' '__'; }  # "compiled --inductor a=True" -> compiled_inductor_a_True
variants=("compiled" "compiled --inductor coordinate_descent_tuning=True" "compiled --inductor freezing=True")
[ "${MAX_AUTOTUNE:-0}" = 1 ] && variants+=("compiled --inductor max_autotune=True")
[ "${EAGER:-0}" = 1 ] && variants+=("eager")
for variant in "${variants[@]}"; do
    left=$((deadline - SECONDS))
    if [ "$left" -le 10 ]; then
        echo "gpu_profile: out of time before: $variant" >&2
        status=124
        break
    fi
    name=$(table_name "$variant")
    flags=${variant/#eager/}
    flags=${flags/#compiled/--compile}
    echo "== $variant"
    # shellcheck disable=SC2086  # flags are words on purpose
    timeout "$left" "$PY" benchmarks/profile_forward.py --device cuda $flags --top 15 "$@" | tee "$OUT/$name.txt" \
        || status=$?
done
# the fastest compiled forward: its flags, without --compile, for gpu_check.sh
best=""
for variant in "${variants[@]}"; do
    name=$(table_name "$variant")
    ms=$(sed -n 's/^forward: \([0-9.]*\) ms.*/\1/p' "$OUT/$name.txt" 2>/dev/null | head -1)
    [ -n "$ms" ] && [ "${variant%% *}" = compiled ] && best+="$ms ${variant#compiled}"$'\n'
done
best=$(printf '%s' "$best" | sort -n | head -1)
if [ -n "$best" ]; then
    echo "${best#* }" | xargs > "$OUT_DIR/best_flags"  # xargs trims the spaces
    echo "fastest compiled forward: ${best%% *} ms; its flags for gpu_check.sh," \
         "'$(cat "$OUT_DIR/best_flags")', are in $OUT_DIR/best_flags"
else
    rm -f "$OUT_DIR/best_flags"
    echo "gpu_profile: no compiled forward finished; no best_flags" >&2
fi
echo "tables: $OUT"
exit "$status"
