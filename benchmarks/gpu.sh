#!/usr/bin/env bash
# Every GPU check in one call, under 5 minutes by its own clock (one H200):
#   bash benchmarks/gpu.sh [OUTDIR]             # on the GPU machine (default benchmarks/gpu-out)
#   bash benchmarks/gpu.sh --dry-run OUTDIR     # the same parts on the CPU at tiny sizes
# The build is checked first (pip install -e ., at most 60 s; a failure is one line, exit 1).
# Then the parts, most important first, each under its own time limit (seconds; 290 in all,
# and every part ends by 285 s after the start: the last gets what is left) and each writing its
# result file as it goes, so a part that fails or runs out of time leaves the others' results
# and the later parts run:
#   loss   40  loss kernels against the HBM floor at pythia and pythia_x8        -> loss.jsonl
#   step   50  SOrT step, fused vs plain autograd on the shared-input model, eager -> step.jsonl
#   graph  60  the CUDA-graph step at the default size (compiled in its warm-up)  -> step.jsonl
#   head   45  head Grad-CAM fp32 and bf16 (the Triton kernel), checked in fp64   -> head.jsonl
#   tests  50  the CUDA tests of the kernels and custom ops, without -x           -> tests.txt
#   train  25  30 training steps on CUDA                                          -> train.txt
#   vlm    20  the decoder VLM's SOrT step at width 2048 (closed form, autograd,
#              per-question sequences, plain transformers' three passes)           -> step.jsonl
# OUTDIR then holds 8 files: those, log.txt (environment, every part's output and status
# line), summary.md (the key figures, printed last) and gpu-results.tar.gz with all of them.
# --dry-run: the CPU, Triton in its interpreter, tiny sizes, one round per benchmark, a few
# tests, 2 training steps, twice the time limits; its build step compiles nothing (it checks
# the build tools and the installed extension). Without a GPU and without --dry-run: one
# line, exit 2.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
case "${1:-}" in
    -*) echo "gpu.sh: unknown option $1 (usage: bash benchmarks/gpu.sh [--dry-run] [OUTDIR])"
        exit 2 ;;
esac
OUT=${1:-}
case "$OUT" in
    "" | /*) ;;
    *) OUT=$PWD/$OUT ;;  # relative to where the script was started
esac
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/benchmarks/gpu-out}
RESULTS="log.txt loss.jsonl step.jsonl head.jsonl tests.txt train.txt summary.md"

if [ "$DRY" = 0 ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
        2>/dev/null; then
    echo "gpu.sh: no CUDA GPU visible to PyTorch here; run it on a machine with one" \
         "(or --dry-run on the CPU)"
    exit 2
fi
mkdir -p "$OUT" || exit 2
for f in $RESULTS gpu-results.tar.gz; do rm -f "$OUT/$f"; done
LOG=$OUT/log.txt
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LIMIT=285  # seconds since the script started (bash's SECONDS) by which every part has ended
SCALE=1    # of the budgets and LIMIT
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 SORT_BENCH_SMOKE=1 CUDA_VISIBLE_DEVICES=""
    SCALE=2  # the interpreter on a shared CPU is slower than the GPU parts the budgets bound
else
    export TRITON_INTERPRET=0
fi

{
    echo "gpu.sh $([ "$DRY" = 1 ] && echo "--dry-run ")$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
         "$(git status --porcelain 2>/dev/null | grep -q . && echo '(uncommitted changes)')"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton',
        triton.__version__, 'cuda', torch.version.cuda)" 2>&1 | tail -1
    if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    fi
} > "$LOG"
cat "$LOG"

# -- build: one clear line and stop when it fails
fail_build() {
    echo "gpu.sh: build failed: $1 (full output in $LOG)" | tee -a "$LOG"
    exit 1
}
if ! python3 -c "import setuptools, pybind11.setup_helpers" >> "$LOG" 2>&1; then
    fail_build "setuptools/pybind11 not importable: $(tail -1 "$LOG")"
fi
if [ "$DRY" = 0 ]; then
    # no network there: build with the setuptools and pybind11 already installed
    if ! timeout 60 python3 -m pip install -q --no-build-isolation --no-deps -e . \
            >> "$LOG" 2>&1; then
        fail_build "pip install -e . exited non-zero: $(tail -1 "$LOG")"
    fi
fi
if ! python3 -c "import sort_fast, sort_fast._ranking" >> "$LOG" 2>&1; then
    fail_build "import sort_fast: $(tail -1 "$LOG")"
fi
echo "gpu.sh part build: ok after $SECONDS s" | tee -a "$LOG"

# part NAME BUDGET OUTPUT CMD...: runs CMD under min(BUDGET, time left) (both times SCALE),
# its stdout and stderr appended to OUTPUT, and records one status line
part() {
    local name=$1 budget=$(($2 * SCALE)) output=$3
    shift 3
    local left=$((LIMIT * SCALE - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "gpu.sh part $name: skipped, no time left" | tee -a "$LOG"
        return
    fi
    # timeout's kill comes 5 s after its budget
    [ "$budget" -gt "$((left - 5))" ] && budget=$((left - 5))
    echo "== $name: $*" >> "$LOG"
    local began=$SECONDS rc=0
    timeout -k 5 "$budget" "$@" >> "$output" 2>&1 || rc=$?
    # a part stopped mid-line (a progress dot) leaves no newline: the status line starts its own
    [ -n "$(tail -c 1 "$output")" ] && echo >> "$output"
    local status="exit $rc"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="stopped by its time limit"
    echo "gpu.sh part $name: $status after $((SECONDS - began)) s (budget $budget s)" \
        | tee -a "$LOG"
}

KERNELS=(python3 benchmarks/bench_kernels.py)
STEP=(python3 -m pytest benchmarks/bench_step.py --benchmark-only -q -p no:cacheprovider)
VLM=(python3 -m pytest benchmarks/bench_vlm.py --benchmark-only -q -p no:cacheprovider -k step)
TESTS=(tests/test_contrastive_loss.py tests/test_sort_loss.py tests/test_head_gradcam.py
       tests/test_custom_ops.py)
if [ "$DRY" = 1 ]; then
    KERNELS+=(--tiny)
    STEP_SIZES="small"
    # one or two quick tests per file: the imports, the fixtures and one path of each op
    quick="test_single_group or test_triton_half or test_sort_loss_under_autocast"
    TESTS+=(-k "$quick or test_loss_ops_are_differentiable_once")
    TRAIN=(--device cpu --max-steps 2 --batch-groups 8 --synthetic-train-groups 64
           --synthetic-val-groups 16)
else
    STEP+=(--benchmark-full)
    STEP_SIZES="small or pythia"
    TRAIN=(--device cuda --max-steps 30 --synthetic-val-groups 200)
fi

part loss 40 "$LOG" "${KERNELS[@]}" --part loss --out "$OUT/loss.jsonl"
SORT_BENCH_JSONL=$OUT/step.jsonl part step 50 "$LOG" "${STEP[@]}" \
    -k "($STEP_SIZES) and (vectorized_shared or fused) and not compiled and not cuda_graph"
SORT_BENCH_JSONL=$OUT/step.jsonl part graph 60 "$LOG" "${STEP[@]}" \
    -k "small and cuda_graph"
part head 45 "$LOG" "${KERNELS[@]}" --part head --out "$OUT/head.jsonl"
part tests 50 "$OUT/tests.txt" python3 -m pytest -v -p no:cacheprovider "${TESTS[@]}"
part train 25 "$OUT/train.txt" python3 -m sort_fast.train "${TRAIN[@]}" --eval-every 0 \
    --save-every 0 --no-plots --overwrite --out "$SCRATCH/train"
SORT_BENCH_JSONL=$OUT/step.jsonl part vlm 20 "$LOG" "${VLM[@]}"

echo "gpu.sh: parts done after $SECONDS s" | tee -a "$LOG"
python3 benchmarks/gpu_summary.py "$OUT" > "$OUT/summary.md" 2>> "$LOG" \
    || echo "gpu.sh: the summary failed: $(tail -1 "$LOG")"
present=()
for f in $RESULTS; do [ -e "$OUT/$f" ] && present+=("$f"); done
tar -czf "$OUT/gpu-results.tar.gz" -C "$OUT" "${present[@]}" \
    && echo "archive: $OUT/gpu-results.tar.gz (${present[*]})"
cat "$OUT/summary.md"
