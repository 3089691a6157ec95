#!/usr/bin/env bash
# The GPU checks as one run on a lent device machine (docs/benchmarks.md, "GPU, second round").
# Here, once: `make device-wheels` (the packages it lacks, into .whl/). There, with .whl carried:
#   bash benchmarks/device.sh
# Writes card.txt, bench-gpu.json (after each section) and bench-gpu.log to $OUT (build/ without it).
# BENCH_* variables pass through to benchmarks/gpu.py; BENCH_TIMEOUT (s) stops it inside the lease.
set -uo pipefail
out=${OUT:-build}
mkdir -p "$out"
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'make device-wheels' first and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# The second round's sections by default: the first round's (encoder, cached, workflows) are in
# docs/benchmarks.md already; BENCH_SECTIONS=... asks for others.
export BENCH_SECTIONS=${BENCH_SECTIONS:-volume,training,study}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
BENCH_OUT="$out/bench-gpu.json" timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/gpu.py 2>&1 | tee "$out/bench-gpu.log"
