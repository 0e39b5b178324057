#!/usr/bin/env bash
# GPU check: on one NVIDIA GPU, images/s and MFU of DDIM, FasterDiffusion (ldm250 key steps) and DeepCache (N=5)
# at S=250, guidance 1.5, random cin256-v2 weights, batch 1, 4, 16 and auto, in fp32 (TF32) and fp16, eager and
# compiled (benchmarks/gpu_table.py). One table, on stdout and in outputs/gpu_check/; at most LIMIT seconds (480):
# rows that would not fit the BUDGET (420 s) are listed as not run, and rows print as they finish.
#
#     bash benchmarks/gpu_check.sh                    # from the repository root, with .venv (or PYTHON=...)
#     bash benchmarks/gpu_check.sh --variants eager   # extra flags go to gpu_table.py
#
# Compiled code is cached in outputs/cache/torch_compile: a second run on the same machine compiles far faster.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/find_gpu_python.sh
mkdir -p outputs/gpu_check
OUT=outputs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ).md
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
status=0
timeout "${LIMIT:-480}" "$PY" benchmarks/gpu_table.py --budget "${BUDGET:-420}" --out "$OUT" "$@" || status=$?
[ "$status" = 124 ] && echo "gpu_check: stopped after ${LIMIT:-480} s; the rows above are complete" >&2
echo "table: $OUT"
exit "$status"
