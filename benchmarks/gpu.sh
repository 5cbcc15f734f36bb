#!/usr/bin/env bash
# Every GPU check in one call (at most eight minutes on one H200): build the extension, run the
# CUDA correctness tests of the kernels, run every benchmark suite on CUDA, train 30 steps on
# CUDA, print a table last.
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
    tests/test_head_gradcam.py 2>&1 | tee "$OUT/tests.log" | tail -5 || echo "tests failed"

# one JSON per suite, so a suite cut short by its time limit does not lose the others
# (bench_ranking measures CPU code and is left to the CPU runs)
for suite in loss:150 gradcam:110 step:120; do
    name=${suite%%:*}
    timeout "${suite##*:}" python3 -m pytest "benchmarks/bench_$name.py" --benchmark-only -q \
        --benchmark-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "bench_$name: exit $?"
done
# the trainer's CUDA path end to end (fused Grad-CAM and loss kernels, 30 steps, evaluation)
timeout 60 python3 -m sort_fast.train --device cuda --max-steps 30 --eval-every 0 --overwrite \
    --out "$OUT/train-cuda" > "$OUT/train-cuda.log" 2>&1 || echo "train on cuda: exit $?"
tail -3 "$OUT/train-cuda.log"
for name in loss gradcam step; do
    if [ -s "$OUT/$name.json" ]; then python3 benchmarks/summarize.py "$OUT/$name.json"; fi
done | tee "$OUT/summary.md"
