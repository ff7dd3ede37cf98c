# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
# `make gpu-check` on a CUDA machine: the CUDA-only tests, NCCL with 2 GPUs, short benchmarks, one JSON file.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint gpu-check venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, and only when the venv has none (a local CPU build here; the usual build elsewhere)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,plot,serve]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m nanoseek demo

test: lint
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check nanoseek tests benchmarks

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info
