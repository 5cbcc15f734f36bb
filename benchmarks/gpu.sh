#!/usr/bin/env bash
# Every GPU check in one call (at most eight minutes on one H200): build the extension, run the
# CUDA correctness tests of the kernels, run every benchmark suite on CUDA, print a table last.
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
# Results (JSON, Markdown, logs) go to $OUT (default benchmarks/gpu-out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"

# no network there: build with the setuptools and pybind11 already installed
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2

# correctness of the Triton kernels on CUDA (the CPU suite runs them in the interpreter)
python3 -m pytest -q -x tests/test_contrastive_loss.py tests/test_sort_loss.py \
    $(ls tests/test_head_gradcam.py 2>/dev/null) 2>&1 | tee "$OUT/tests.log" | tail -5

suites=$(ls benchmarks/bench_loss.py benchmarks/bench_gradcam.py benchmarks/bench_step.py 2>/dev/null)
timeout 360 python3 -m pytest $suites --benchmark-only -q \
    --benchmark-json "$OUT/bench.json" 2>&1 | tail -3 > "$OUT/bench.log" || true
python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/summary.md"
