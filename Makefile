# Set-up and checks from nothing but Python. `make test` sets up when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# MONAI Label's server has its own environment (its dependencies clash with this one's).
LABEL_VENV ?= .venv-label
STUDIES ?=
PORT ?= 8000
FL_WORKDIR ?= build/fl
# A CUDA machine takes torch from PyPI's default index; elsewhere the CPU wheel,
# so that pip never pulls a multi-GB CUDA build onto a CPU machine.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.8' || echo 'torch==2.13.0')

# A stamp per torch spec: `make setup TORCH_SPEC=...` with another spec reinstalls torch.
TORCH_STAMP = .torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)

.PHONY: setup test test-fast lint demo bench bench-gpu device-wheels label label-setup fl clean

setup: $(VENV)/.installed

$(VENV)/$(TORCH_STAMP):
	mkdir -p $(VENV)
	rm -f $(VENV)/.torch-*
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/$(TORCH_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# The suite on TEST_WORKERS processes (pytest-xdist), a test file to a worker at a time so that a
# file's fixtures (the MONAI Label server) start once, with one torch thread each: most tests
# run one process that keeps one core busy, so two workers halve the time on two cores. The
# generalist the tests share is pretrained first, alone on every core (cached after the first
# time: beside another job its torch threads wait on each other, 8 times slower). MONAI
# Label's environment is set up by its tests' fixture (`make label-setup`), on one worker while
# the other tests on.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PY) -m ruff check bundle tests benchmarks label fl
	$(PY) -m ruff format --check bundle tests benchmarks label fl
	cd bundle && ../$(PY) -m scripts.demo.generalist > /dev/null
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(PY) -m ruff check bundle tests benchmarks label fl
	$(PY) -m ruff format --check bundle tests benchmarks label fl

demo: setup
	cd bundle && ../$(PY) -m scripts.demo

# Ratios of the fast paths against their baselines, side by side; BENCH_QUICK=1 for a short run.
bench: setup
	$(PY) benchmarks/bench.py

# Full-size ViT-B/L/H, AMP and activation checkpointing on a CUDA card; writes bench-gpu.json.
bench-gpu: setup
	$(PY) benchmarks/gpu.py

# The packages a lent GPU machine lacks (it has torch, numpy, scipy, matplotlib, but no MONAI),
# as wheels for its Python 3.12 in .whl/, at this environment's versions: benchmarks/device.sh
# installs them there. See docs/benchmarks.md, "GPU, second round".
DEVICE_PACKAGES := monai pytorch-ignite nibabel pydicom segment-anything
device-wheels: setup
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(shell $(PY) -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in '$(DEVICE_PACKAGES)'.split()))")

label-setup: $(LABEL_VENV)/.installed

$(LABEL_VENV)/$(TORCH_STAMP):
	mkdir -p $(LABEL_VENV)
	rm -f $(LABEL_VENV)/.torch-*
	touch $@

$(LABEL_VENV)/.installed: label/setup_env.sh pyproject.toml $(LABEL_VENV)/$(TORCH_STAMP)
	bash label/setup_env.sh $(LABEL_VENV) "$(TORCH_SPEC)"
	touch $@

# The MONAI Label server on 127.0.0.1:$(PORT) with bundle/ as its model `ptsam`; images in $(STUDIES).
label: label-setup
	@test -n "$(STUDIES)" || { echo "usage: make label STUDIES=<folder of images> [PORT=8000] [ENCODER_ENGINE=onnxruntime] [ENCODER_INT8=true] [ENCODER_BF16=true] [ALLOW_OTHER_KIND=true]"; exit 2; }
	$(LABEL_VENV)/bin/python label/start.py --studies "$(STUDIES)" --port $(PORT)

clean:
	rm -rf $(VENV) $(LABEL_VENV) .pytest_cache .ruff_cache

# Federated prompt tuning on NVIDIA FLARE's simulator (fl/): two synthetic sites, three rounds,
# scored on held-out images; the run stays in $(FL_WORKDIR). nvflare is in the `fl` extra (dev has it).
fl: setup
	$(PY) fl/run.py --workdir $(FL_WORKDIR)
