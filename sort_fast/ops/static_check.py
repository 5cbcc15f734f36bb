"""Static GPU check, no GPU needed: every kernel launch the public API makes for the
Pythia-size workload, compiled ahead of time for sm_75, sm_80 and sm_90 with Triton's own
compiler and the ``ptxas`` inside the triton wheel.

The launches come from the launchers themselves (``forward_launches``, ``backward_launches``,
``gather_mm_launch``), and each argument is specialised exactly as Triton's JIT would
specialise it (16-byte-aligned pointers and integers divisible by 16 get the divisibility hint),
so the check compiles the very kernels a GPU would run (an annotated scalar, ``eps:
tl.float64``, takes its annotation's type, as in the JIT). For each it reports registers, spill
bytes, shared memory, the widest global load/store, the tensor-core instructions and the
kernel's float scalar parameters by width (``.param .f32`` / ``.param .f64`` in the PTX).

    python -m sort_fast.ops.static_check                 # table (Markdown) on stdout
    python -m sort_fast.ops.static_check --json out.json # and every record as JSON

Needs the triton package, and ``TRITON_INTERPRET`` unset or ``0`` (the interpreter replaces the
kernels by Python functions, which cannot be compiled).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

ARCHS = (75, 80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The loss kernels also run float64 inputs (float64 accumulation).
LOSS_DTYPES = {**DTYPES, "fp64": torch.float64}
# The Pythia-size workload of benchmarks/bench_loss.py and bench_gradcam.py: 64 groups of
# 1 + 1..4 sub-questions + 6..8 irrelevant questions, joint width 5000, classifier 5000 -> 3129.
NUM_GROUPS, DIM, HIDDEN, ANSWERS = 64, 5000, 5000, 3129
HBM_BYTES_PER_S = 4.8e12  # H200


@dataclass
class Record:
    """What one compiled launch looks like on one architecture."""

    kernel: str
    variant: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    widest_load_bits: int
    widest_store_bits: int
    mma: int
    wgmma: int
    fma_f32: int
    f32_params: int
    f64_params: int
    error: str = ""


def _layout(num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    num_sub = torch.randint(1, 5, (num_groups,), generator=gen)
    sizes = 1 + num_sub + torch.randint(6, 9, (num_groups,), generator=gen)
    return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]), num_sub


def loss_launches() -> Iterator[Tuple[str, str, Any]]:
    """``(kernel, variant, launch)`` of the loss ops at the Pythia size, per input dtype (the
    finish kernel, which reads only accumulation-dtype buffers, for fp32 and fp64)."""
    from . import contrastive_loss_kernels as k

    offsets, num_sub = _layout(NUM_GROUPS)
    rows = int(offsets[-1])
    for name, dtype in LOSS_DTYPES.items():
        own_finish = name in ("fp32", "fp64")
        grad = torch.empty(rows, DIM, dtype=dtype)
        act = torch.empty(rows, DIM, dtype=dtype)
        for mode, sub in (("loss", num_sub), ("similarity", None)):
            launches, (cos, norm, weight, _) = k.forward_launches(grad, act, offsets, sub, 0.0,
                                                                  1e-8, True)
            if mode == "loss" or own_finish:
                for launch in launches:
                    if own_finish or "partial" in _name(launch.kernel):
                        yield _name(launch.kernel), f"{name} {mode}", launch
            if mode == "loss":
                scale = torch.empty(NUM_GROUPS, dtype=cos.dtype)
                (launch,), _ = k.backward_launches(grad, act, offsets, cos, norm, weight, scale,
                                                   1e-8)
                yield _name(launch.kernel), f"{name} loss", launch


def head_launches() -> Iterator[Tuple[str, str, Any]]:
    """``(kernel, variant, launch)`` of the head Grad-CAM kernel (fp16/bf16: fp32 products go
    to cuBLAS) for the Pythia image branch: forward, ``dL/dW1`` and ``dL/dW2`` products."""
    from . import head_gradcam_kernels as k

    offsets, _ = _layout(NUM_GROUPS)
    rows = int(offsets[-1])
    classes = torch.zeros(rows, dtype=torch.int64)
    for name in ("bf16", "fp16"):
        dtype = DTYPES[name]
        w2, w1 = torch.empty(ANSWERS, HIDDEN, dtype=dtype), torch.empty(HIDDEN, DIM, dtype=dtype)
        mask, upstream = torch.empty(rows, HIDDEN, dtype=dtype), torch.empty(rows, DIM, dtype=dtype)
        products = {
            "g=(M*W2[c])W1": (w2, classes, mask, w1, None, False, dtype),
            "dW1=(M*W2[c])^T U": (w2, classes, mask, upstream, None, True, dtype),
            "dV=(U W1^T)*M": (upstream, None, None, w1.t(), mask, False, torch.float32),
        }
        for product, args in products.items():
            launch, _ = k.gather_mm_launch(*args, tuned=True)
            yield _name(launch.kernel), f"{name} {product}", launch


def _name(kernel: Any) -> str:
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def _configs(launch: Any) -> List[Tuple[str, Dict[str, Any], int, int]]:
    """``(label, constexprs, num_warps, num_stages)`` for every config the launch may run."""
    configs = getattr(launch.kernel, "configs", None)
    if configs is None:
        return [("", {}, launch.num_warps or 4, 3)]
    return [(",".join(f"{k}={v}" for k, v in c.kwargs.items()) + f",w{c.num_warps}s{c.num_stages}",
             dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]


def _compile(kernel: Any, args: Dict[str, Any], arch: int, num_warps: int,
             num_stages: int) -> Tuple[str, int]:
    """PTX and shared-memory bytes of ``kernel`` specialised on ``args`` as the JIT would, for
    ``sm_<arch>``."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.runtime.jit import JITFunction

    args = dict(args)
    while not isinstance(kernel, JITFunction):  # autotune / heuristics wrappers
        for name, fn in getattr(kernel, "values", {}).items():
            args[name] = fn(args)
        kernel = kernel.fn
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        if param.annotation_type:  # typed by its annotation, unspecialised (float scalars)
            signature[name] = param.annotation_type
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False,
                                            not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = kind
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    src = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    return compiled.asm["ptx"], int(compiled.metadata.shared)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``sm_<arch>`` (the wheel ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _inspect(ptx: str, shared: int, arch: int) -> Dict[str, int]:
    """Registers, spills and shared memory from ``ptxas -v``; access widths and instruction
    kinds from the PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", path, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"ptxas: {done.stderr.strip().splitlines()[-1]}")
        out = done.stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    static_shared = re.search(r"(\d+) bytes smem", out)

    def widest(op: str) -> int:
        bits = 0
        access = rf"\b{op}\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b"
        for vec, width in re.findall(access, ptx):
            bits = max(bits, int(vec or 1) * int(width))
        if op == "ld":  # asynchronous global -> shared copies of pipelined loads (sm_80+)
            for size in re.findall(r"cp\.async\.c[ag]\.shared\.global[^\[]*\[[^\]]*\],\s*"
                                   r"\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
                bits = max(bits, 8 * int(size, 0))
        return bits

    return dict(registers=registers, spill_bytes=spills,
                shared_bytes=max(int(static_shared.group(1)) if static_shared else 0, shared),
                widest_load_bits=widest("ld"), widest_store_bits=widest("st"),
                mma=len(re.findall(r"\bmma\.sync\b", ptx)),
                wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                fma_f32=len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
                f32_params=len(re.findall(r"\.param \.f32\b", ptx)),
                f64_params=len(re.findall(r"\.param \.f64\b", ptx)))


def _check_one(job: Tuple[str, str, Any, int, str, Dict[str, Any], int, int]) -> Record:
    if isinstance(job[0], int):  # (index, archs) from a worker process: rebuild the job there
        job = jobs(job[1])[job[0]]
    kernel_name, variant, launch, arch, label, extra, warps, stages = job
    variant = f"{variant} [{label}]" if label else variant
    try:
        ptx, shared = _compile(launch.kernel, {**launch.args, **extra}, arch, warps, stages)
        return Record(kernel_name, variant, arch, **_inspect(ptx, shared, arch))
    except Exception as e:  # reported, and the test fails on it
        return Record(kernel_name, variant, arch, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                      error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


@functools.lru_cache(maxsize=None)  # a worker process builds the list once, not per job
def jobs(archs: Tuple[int, ...] = ARCHS) -> List[Tuple]:
    """Every (launch, config, architecture) to compile. The head products are not built for
    sm_75: Triton emits no tensor-core instructions for them there (it spills and uses
    ``fma.f32``), so the API runs them through ``torch.matmul`` below sm_80."""
    out = []
    for source in (loss_launches, head_launches):
        for kernel_name, variant, launch in source():
            for arch in archs:
                if arch < 80 and source is head_launches:
                    continue  # the API runs these products through torch.matmul below sm_80
                for label, extra, warps, stages in _configs(launch):
                    out.append((kernel_name, variant, launch, arch, label, extra, warps, stages))
    return out


def run(archs: Sequence[int] = ARCHS, workers: int = 0) -> List[Record]:
    """Compiles every job (in ``workers`` processes; 0: one per CPU) and returns the records."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the static check needs TRITON_INTERPRET unset (or 0)")
    todo = jobs(tuple(archs))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_check_one(j) for j in todo]
    with ProcessPoolExecutor(workers) as pool:  # jobs hold tensors: send indices
        return list(pool.map(_check_one, [(i, tuple(archs)) for i in range(len(todo))]))


def roofline() -> List[Dict[str, Any]]:
    """Bytes the loss kernels must move (forward reads grad and act; backward reads them and
    writes both gradients) and the time that takes at the H200's HBM bandwidth."""
    out = []
    for size, groups in (("pythia", NUM_GROUPS), ("pythia_x8", 8 * NUM_GROUPS)):
        rows = int(_layout(groups)[0][-1])
        for name, dtype in DTYPES.items():
            elems = rows * DIM
            fwd, bwd = 2 * elems * dtype.itemsize, 4 * elems * dtype.itemsize
            out.append(dict(size=size, dtype=name, rows=rows, forward_bytes=fwd,
                            backward_bytes=bwd,
                            floor_us=(fwd + bwd) / HBM_BYTES_PER_S * 1e6))
    return out


def markdown(records: Sequence[Record]) -> str:
    lines = ["| kernel | variant | sm | regs | spill B | smem B | widest ld/st bits | mma | wgmma"
             " | fma.f32 | f32/f64 scalar params | error |", "|" + "---|" * 12]
    for r in records:
        lines.append(f"| {r.kernel} | {r.variant} | {r.arch} | {r.registers} | {r.spill_bytes} "
                     f"| {r.shared_bytes} | {r.widest_load_bits}/{r.widest_store_bits} | {r.mma} "
                     f"| {r.wgmma} | {r.fma_f32} | {r.f32_params}/{r.f64_params} | {r.error} |")
    lines += ["", "| size | dtype | rows T | fwd bytes | bwd bytes | HBM floor fwd+bwd (us, "
              "4.8 TB/s) |", "|---|---|---|---|---|---|"]
    for r in roofline():
        lines.append(f"| {r['size']} | {r['dtype']} | {r['rows']} | {r['forward_bytes']:,} | "
                     f"{r['backward_bytes']:,} | {r['floor_us']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sort_fast.ops.static_check",
        description="Compile every kernel launch of the Pythia-size workload for NVIDIA GPUs "
                    "ahead of time (no GPU needed) and report registers, spills, shared "
                    "memory, access widths and tensor-core instructions.")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="compute capabilities to compile for (default: 75 80 90)")
    parser.add_argument("--json", metavar="FILE", help="also write every record as JSON")
    parser.add_argument("--workers", type=int, default=0,
                        help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)
    records = run(args.arch, args.workers)
    print(markdown(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": [asdict(r) for r in records], "roofline": roofline()}, f,
                      indent=1)
    return 1 if any(r.error for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
