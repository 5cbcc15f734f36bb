"""Kernel-only GPU timings with ``triton.testing.do_bench`` (CUDA events, L2 flushed; median,
20th and 80th percentiles), beside the fraction of the HBM floor each loss kernel pass reaches.

    python benchmarks/bench_kernels.py --out kernels.jsonl [--part loss --part head]
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --tiny --out k.jsonl   # CPU smoke run

Parts (default: all three, in this order):

* ``loss``: the contrastive-loss ops (forward launches, backward launch) on the layout of
  ``bench_loss.py`` at D = 5000, ``pythia`` (64 groups) and ``pythia_x8`` (512), fp32 and
  bf16. Floor = bytes that must move (forward reads grad and act, backward also writes both
  gradients) / the copy bandwidth measured here (``torch.Tensor.copy_`` of a 1 GiB buffer).
  Two runs of forward + backward are compared bit for bit (no atomics: deterministic).
* ``sweep``: the loss kernels' forward + backward time at ``pythia`` for other tile settings
  (``BLOCK_Q``, widest ``BLOCK_D``, warps) than the shipped ones: evidence for the next choice.
* ``head``: forward + backward of the contrastive loss on the closed-form Grad-CAM of Pythia's
  classifier (5000-d input, two 5000-wide branches, 3129 answers, no dropout) at ``pythia``,
  fp32 and bf16: ``closed_triton`` (``head_gradcam(backend="triton")``: the Triton
  gathered-matmul kernel on tensor cores in bf16, cuBLAS in fp32, where the kernel does not
  serve), ``closed_torch`` (``backend="torch"``, bf16 only) and ``autograd``
  (``autograd.grad(..., create_graph=True)``). Before timing, each path's Grad-CAM gradient and
  the gradients of a linear function of it (w.r.t. the input and every head parameter) are
  compared with float64 autograd on the same (upcast) weights: ``err`` is the largest
  ``|x - ref|`` over ``max |ref|`` of any of those tensors, ``ok`` whether it is within
  :data:`HEAD_TOLERANCE`.

Each measurement is appended to ``--out`` as one JSON line as soon as it is taken (``part``
names its part; a failed measurement is a line with ``error``), so a run stopped by a time
limit keeps what it finished. ``--tiny``: the same parts at tiny sizes on the CPU, the Triton
kernels in the interpreter (``TRITON_INTERPRET=1``), timed with ``time.perf_counter``: checks
that the script runs (``gpu.sh --dry-run``); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, packed_layout  # noqa: E402
from sort_fast import contrastive_gradient_loss, head_gradcam  # noqa: E402
from sort_fast.heads import pythia_classifier  # noqa: E402
from sort_fast.ops import contrastive_loss as cl  # noqa: E402
from sort_fast.ops.gather_mm import kernel_supported  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}
PARTS = ("loss", "sweep", "head")


@dataclass(frozen=True)
class Sizes:
    """Row width of the loss inputs, groups per named loss size, and the head's input width,
    hidden width (each branch), answers and groups."""

    dim: int
    groups: Dict[str, int]
    head: Tuple[int, int, int, int]


FULL = Sizes(5000, {"pythia": 64, "pythia_x8": 512}, (5000, 5000, 3129, 64))
TINY = Sizes(64, {"pythia": 2, "pythia_x8": 4}, (32, 32, 20, 2))


def bench(fn: Callable[[], object], device: torch.device) -> Dict[str, float]:
    """Median, 20th and 80th percentile milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25,
                                                rep=200)
    else:  # the interpreter (smoke runs): one warm-up call, one timed call
        fn()
        start = time.perf_counter()
        fn()
        p50 = p20 = p80 = (time.perf_counter() - start) * 1e3
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a copy (read + write) of 1 GiB (4 MiB on the CPU)."""
    src = torch.empty(2 ** 28 if device.type == "cuda" else 2 ** 20, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)["ms"]
    return 2 * src.numel() * 4 / (ms * 1e-3)


Measurement = Tuple[Dict[str, object], Callable[[], dict]]


def loss_records(sizes: Sizes, device: torch.device) -> Iterator[Measurement]:
    """``(labels, measure)`` per loss size and dtype (the first: the copy bandwidth)."""
    bandwidth: List[float] = []

    def measure_bandwidth() -> dict:
        bandwidth.append(copy_bandwidth(device))
        return dict(bandwidth=bandwidth[0])

    yield {}, measure_bandwidth
    for size, groups in sizes.groups.items():
        for name in DTYPES:
            yield dict(size=size, dtype=name), (
                lambda groups=groups, name=name: loss_record(sizes.dim, groups, name,
                                                             bandwidth[0], device))


def loss_record(dim: int, groups: int, name: str, bandwidth: float,
                device: torch.device) -> dict:
    dtype = DTYPES[name]
    offsets, num_sub = packed_layout(groups, device=device)
    t = int(offsets[-1])
    grad = torch.randn(t, dim, device=device).to(dtype)
    act = torch.rand(t, dim, device=device).to(dtype)
    loss, cos, norm, weight = cl.contrastive_loss_fwd(grad, act, offsets, num_sub, 0.0, 1e-8,
                                                      True, "triton")
    scale = torch.rand_like(loss)
    fwd = bench(lambda: cl.contrastive_loss_fwd(grad, act, offsets, num_sub, 0.0, 1e-8, True,
                                                "triton"), device)
    bwd = bench(lambda: cl.gradcam_cosine_bwd(grad, act, offsets, cos, norm, weight, scale,
                                              1e-8, "triton"), device)
    fwd_bytes = 2 * grad.numel() * grad.element_size()
    floor_ms = 3 * fwd_bytes / bandwidth * 1e3  # forward reads 2, backward reads 2, writes 2

    def step():
        g = grad.detach().requires_grad_()
        a = act.detach().requires_grad_()
        out = contrastive_gradient_loss(g, a, offsets, num_sub, backend="triton")
        return (out, *torch.autograd.grad(out, (g, a)))

    first, second = step(), step()
    return dict(groups=groups, rows=t, dim=dim, forward=fwd,
                backward=bwd, floor_ms=floor_ms, floor_fraction=floor_ms / (fwd["ms"] + bwd["ms"]),
                bitwise_repeatable=all(torch.equal(x, y) for x, y in zip(first, second)))


SWEEP = [(16, 256, 4), (8, 256, 4), (16, 128, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8)]


def sweep_records(sizes: Sizes, device: torch.device) -> Iterator[Measurement]:
    """fwd + bwd kernel time at ``pythia`` for each ``(BLOCK_Q, MAX_BLOCK_D, NUM_WARPS)``."""
    for name in DTYPES:
        for block_q, block_d, warps in SWEEP:
            yield dict(dtype=name, block_q=block_q, max_block_d=block_d, warps=warps), (
                lambda name=name, setting=(block_q, block_d, warps): sweep_record(
                    sizes, name, setting, device))


def sweep_record(sizes: Sizes, name: str, setting: Tuple[int, int, int],
                 device: torch.device) -> dict:
    from sort_fast.ops import contrastive_loss_kernels as k

    dtype = DTYPES[name]
    shipped = (k.BLOCK_Q, k.MAX_BLOCK_D, k.NUM_WARPS)
    offsets, num_sub = packed_layout(sizes.groups["pythia"], device=device)
    t = int(offsets[-1])
    grad = torch.randn(t, sizes.dim, device=device).to(dtype)
    act = torch.rand(t, sizes.dim, device=device).to(dtype)
    try:
        k.BLOCK_Q, k.MAX_BLOCK_D, k.NUM_WARPS = setting
        _, cos, norm, weight = k.forward(grad, act, offsets, num_sub, 0.0, 1e-8, True)
        scale = torch.ones(num_sub.numel(), device=device)

        def both():
            k.forward(grad, act, offsets, num_sub, 0.0, 1e-8, True)
            k.backward(grad, act, offsets, cos, norm, weight, scale, 1e-8)

        timing = bench(both, device)
    finally:
        k.BLOCK_Q, k.MAX_BLOCK_D, k.NUM_WARPS = shipped
    return dict(shipped=setting == shipped, **timing)


def head_records(sizes: Sizes, device: torch.device) -> Iterator[Measurement]:
    """``(labels, measure)`` per dtype and Grad-CAM path of the Pythia classifier."""
    for name in DTYPES:
        for path in (("closed_triton", "closed_torch", "autograd") if name == "bf16"
                     else ("closed_triton", "autograd")):
            yield dict(dtype=name, path=path), (
                lambda name=name, path=path: head_record(sizes, name, path, device))


def _gradcam(path: str, head: torch.nn.Module, h: torch.Tensor, classes: torch.Tensor
             ) -> torch.Tensor:
    """The differentiable Grad-CAM gradient ``d scores[t, c_t] / d h_t`` by ``path``."""
    if path == "autograd":
        (grad,) = torch.autograd.grad(head(h).gather(1, classes[:, None]).sum(), h,
                                      create_graph=True)
        return grad
    return head_gradcam(head, h, classes, backend=path.split("_")[1])[1]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _gradients(path: str, head: torch.nn.Module, h: torch.Tensor, classes: torch.Tensor,
               probe: torch.Tensor) -> List[torch.Tensor]:
    """Grad-CAM gradient, then the gradients of ``sum(grad * probe)`` w.r.t. ``h`` and every
    head parameter (a linear function of the gradient: no hinge kink to amplify rounding)."""
    h = h.detach().requires_grad_()
    grad = _gradcam(path, head, h, classes)
    inputs = [h, *head.parameters()]
    # the output bias does not move the gradient: its entry is None, as zeros
    grads = torch.autograd.grad((grad.to(probe.dtype) * probe).sum(), inputs, allow_unused=True)
    return [grad.detach(), *(torch.zeros_like(x) if g is None else g
                             for x, g in zip(inputs, grads))]


def head_record(sizes: Sizes, name: str, path: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    dim, hidden, answers, groups = sizes.head
    offsets, num_sub = packed_layout(groups, device=device)
    t = int(offsets[-1])
    dtype = DTYPES[name]
    head = pythia_classifier(dim, hidden, hidden, answers, dropout=0.0).to(device, dtype)
    h = torch.randn(t, dim, device=device).relu_().to(dtype).requires_grad_()
    classes = torch.randint(0, answers, (t,), device=device)
    probe = torch.randn(t, dim, device=device, dtype=torch.float64)
    want = _gradients("autograd", copy.deepcopy(head).double(), h.double(), classes, probe)
    got = _gradients(path, head, h, classes, probe.to(torch.float32))
    err = max(_relative_error(g, w) for g, w in zip(got, want))

    def step():
        head.zero_grad(set_to_none=True)
        h.grad = None
        contrastive_gradient_loss(_gradcam(path, head, h, classes), h, offsets,
                                  num_sub).backward()

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return dict(rows=t, dim=dim, hidden=hidden, answers=answers,
                kernel=path == "closed_triton" and kernel_supported(dtype, capability),
                err=err, tolerance=HEAD_TOLERANCE[name], ok=err <= HEAD_TOLERANCE[name],
                **bench(step, device))


MEASUREMENTS = {"loss": loss_records, "sweep": sweep_records, "head": head_records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON-lines file the results go to "
                        "(appended)")
    parser.add_argument("--part", action="append", choices=PARTS,
                        help="part to run (repeatable; default: all, in order)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes on the CPU, Triton in its interpreter (smoke run)")
    args = parser.parse_args()
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("bench_kernels.py: --tiny runs the kernels in Triton's interpreter: set "
                  "TRITON_INTERPRET=1")
            return 2
        device, sizes = torch.device("cpu"), TINY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), FULL
    else:
        print("bench_kernels.py: no CUDA device; nothing to measure (--tiny: a CPU smoke run)")
        return 2
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    failed = 0
    for part in args.part or PARTS:
        # each measurement on its own: one that fails leaves the others' numbers
        for labels, measure in MEASUREMENTS[part](sizes, device):
            record = dict(part=part, device=gpu, **labels)
            try:
                record.update(measure())
                failed += record.get("ok") is False  # a head path off its float64 reference
            except Exception as e:  # recorded in the output, not lost
                failed += 1
                record["error"] = f"{type(e).__name__}: {e}"
            append_jsonl(args.out, record)
            print(record, flush=True)
    return 1 if failed else 0  # every measurement was still taken and written


if __name__ == "__main__":
    sys.exit(main())
