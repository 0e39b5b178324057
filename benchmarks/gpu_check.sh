#!/usr/bin/env bash
# GPU check: on a machine with one NVIDIA GPU and PyTorch installed, time plain DDIM and FasterDiffusion
# (published `ldm250` key steps, 250 steps) at batch 4 in fp32 and fp16, on the full cin256-v2 architecture
# (random weights unless CKPT is set), the UNet's throughput per precision, peak memory with and without
# decoder chunking, and torch.compile / channels-last against eager fp32. About 5-7 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
CKPT_ARG=${CKPT:+--ckpt $CKPT}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo
$PY benchmarks/bench_sampler.py --device cuda --steps "${STEPS:-250}" --batch 4 --scale 1.5 --key_steps ldm250 \
    --modes ddim,ddim+fd,ddim@fp16,ddim+fd@fp16 --repeats "${REPEATS:-2}" --warmup 1 $CKPT_ARG
echo
$PY benchmarks/bench_precision.py --device cuda --repeats 10 --quality_steps 50 $CKPT_ARG \
    --tiny_config "${TINY_CONFIG:-tests/fixtures/tiny/config.yaml}" --tiny_ckpt "${TINY_CKPT:-tests/fixtures/tiny/model.ckpt}"
echo
$PY benchmarks/bench_memory.py --device cuda --batch 4 --chunks 0,32,16 $CKPT_ARG
echo
timeout "${COMPILE_TIMEOUT:-180}" $PY benchmarks/check_compile.py --device cuda --steps 50 --batch 4 $CKPT_ARG \
    || echo "check_compile did not finish within ${COMPILE_TIMEOUT:-180} s"
