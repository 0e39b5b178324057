# Set-up, tests and the demo; everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CKPT := models/ldm/cin256-v2/model.ckpt
TORCH ?= torch==2.13.0

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A torch already in .venv (e.g. a CUDA build installed first) is kept; else the pinned CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	test -f $(CKPT) || $(PY) scripts/download_model.py
	$(PY) infer_ldm.py --compare --out outputs/compare.png

clean:
	rm -rf $(VENV) outputs .pytest_cache
