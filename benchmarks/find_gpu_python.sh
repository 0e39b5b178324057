# Sourced by the GPU scripts from the repository root: sets PY to $PYTHON, .venv/bin/python or python3, and exits
# with one line unless that Python's torch sees a CUDA device.
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "$(basename "$0" .sh): no CUDA device visible to PyTorch ($PY);" \
         "this needs an NVIDIA GPU and a CUDA build of torch" >&2
    exit 1
fi
