# Set-up and checks from nothing but Python. `make test` sets up when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA machine takes torch from PyPI's default index; elsewhere the CPU wheel,
# so that pip never pulls a multi-GB CUDA build onto a CPU machine.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.8' || echo 'torch==2.13.0')

.PHONY: setup test test-fast lint demo bench bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

test: setup
	$(PY) -m ruff check bundle tests benchmarks
	$(PY) -m ruff format --check bundle tests benchmarks
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check bundle tests benchmarks
	$(PY) -m ruff format --check bundle tests benchmarks

demo: setup
	cd bundle && ../$(PY) -m scripts.demo

# Ratios of the fast paths against their baselines, side by side; BENCH_QUICK=1 for a short run.
bench: setup
	$(PY) benchmarks/bench.py

# Full-size ViT-B/L/H, AMP and activation checkpointing on a CUDA card; writes bench-gpu.json.
bench-gpu: setup
	$(PY) benchmarks/gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
