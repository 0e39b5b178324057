# Set-up, tests and the demo; everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CKPT := models/ldm/cin256-v2/model.ckpt
DIGITS := models/digits32
TORCH ?= torch==2.13.0
# An index for torch alone, e.g. https://download.pytorch.org/whl/cpu (PyPI's Linux wheel is the CUDA build).
TORCH_INDEX ?=

# The kernels of a CPU without AVX-512 (an AVX2-only AMD EPYC), on any x86 CPU: torch's, oneDNN's, MKL's, OpenBLAS's.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell

.PHONY: test test-avx2 demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A torch already in .venv (e.g. a CUDA build installed first) is kept; else the pinned version.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -q

# The suite again with AVX2-only kernels: a result that depends on the CPU's kernels beyond float error fails here
# on an AVX-512 machine too (and bfloat16 runs emulated, as on such a CPU).
# Its own pytest cache: inductor's cached CPU kernels do not say which vector width they were compiled for.
test-avx2: venv
	$(AVX2_ONLY) $(PY) -m pytest -q -o cache_dir=.pytest_cache/avx2

# With the cin256-v2 checkpoint: the published demo. Without it: the shipped digits model, offline.
demo: venv
	@if [ -f $(CKPT) ]; then \
		$(PY) infer_ldm.py --compare --out outputs/compare.png; \
	else \
		echo "No cin256-v2 checkpoint at $(CKPT) (scripts/download_model.py fetches it): demo of the shipped digits model."; \
		$(PY) infer_ldm.py --config $(DIGITS)/config.yaml --ckpt $(DIGITS)/model.safetensors --classes 0 1 2 3 4 5 6 7 8 9 \
			--n_per_class 2 --steps 50 --scale 3 --compare --out outputs/compare.png; \
	fi

clean:
	rm -rf $(VENV) outputs .pytest_cache
