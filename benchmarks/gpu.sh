#!/usr/bin/env bash
# Every GPU check in one call (about five minutes on one H200): build the extension, run the
# CUDA correctness tests of the kernels and custom ops (opcheck, fullgraph compile), time the
# kernels alone (do_bench, fraction of the HBM floor), run the loss / Grad-CAM / step benchmark
# suites, train 30 steps on CUDA, print the summary last, and pack everything into one archive.
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
# Results go to $OUT (default benchmarks/gpu-out); $OUT/gpu-results.tar.gz holds all of them.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "gpu.sh: no CUDA GPU visible to PyTorch here; run it on a machine with one"
    exit 2
fi
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"

# no network there: build with the setuptools and pybind11 already installed
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2

# correctness of the Triton kernels and custom ops on CUDA (the CPU suite runs the kernels in
# the interpreter and compiles the ops on the CPU)
timeout 100 python3 -m pytest -q -x tests/test_contrastive_loss.py tests/test_sort_loss.py \
    tests/test_head_gradcam.py tests/test_custom_ops.py > "$OUT/tests.log" 2>&1 \
    || echo "tests: exit $?"
tail -3 "$OUT/tests.log"

# kernel-only timings and the fraction of the HBM floor
timeout 120 python3 benchmarks/bench_kernels.py --out "$OUT" > "$OUT/kernels.log" 2>&1 \
    || echo "bench_kernels: exit $?"

# one JSON per suite, so a suite cut short by its time limit does not lose the others
# (bench_ranking measures CPU code and is left to the CPU runs)
for suite in loss:45 gradcam:40 step:45; do
    name=${suite%%:*}
    timeout "${suite##*:}" python3 -m pytest "benchmarks/bench_$name.py" --benchmark-only -q \
        -k "not cpu" --benchmark-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 \
        || echo "bench_$name: exit $?"
done
# the trainer's CUDA path end to end (fused Grad-CAM and loss kernels, 30 steps)
timeout 40 python3 -m sort_fast.train --device cuda --max-steps 30 --eval-every 0 --overwrite \
    --out "$OUT/train-cuda" > "$OUT/train-cuda.log" 2>&1 || echo "train on cuda: exit $?"
tail -3 "$OUT/train-cuda.log"
{
    cat "$OUT/kernels.md" 2>/dev/null
    for name in loss gradcam step; do
        if [ -s "$OUT/$name.json" ]; then python3 benchmarks/summarize.py "$OUT/$name.json"; fi
    done
} | tee "$OUT/summary.md"
tar -czf "$OUT/gpu-results.tar.gz" -C "$OUT" --exclude gpu-results.tar.gz . \
    && echo "archive: $OUT/gpu-results.tar.gz"
