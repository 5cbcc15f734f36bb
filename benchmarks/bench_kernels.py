"""Kernel-only GPU timings with ``triton.testing.do_bench`` (CUDA events; median, 20th and 80th
percentiles), beside the fraction of the HBM floor each loss kernel pass reaches.

    python benchmarks/bench_kernels.py --out DIR      # on a CUDA machine (gpu.sh runs it)

* ``loss``: the contrastive-loss ops (forward launches, backward launch) on the layout of
  ``bench_loss.py`` at D = 5000, ``pythia`` (64 groups) and ``pythia_x8`` (512), fp32 and
  bf16. Floor = bytes that must move (forward reads grad and act, backward also writes both
  gradients) / the copy bandwidth measured here (``torch.Tensor.copy_`` of a 1 GiB buffer).
  Two runs of forward + backward are compared bit for bit (no atomics: deterministic).
* ``sweep``: the loss kernels' forward + backward time at ``pythia`` for other tile settings
  (``BLOCK_Q``, widest ``BLOCK_D``, warps) than the shipped ones: evidence for the next choice.
* ``head``: closed-form head Grad-CAM (``head_gradcam``) against autograd double backward
  (``autograd.grad(..., create_graph=True)``) for the Pythia classifier, forward + backward of
  a loss on G, fp32 and bf16.

Writes ``kernels.json`` and ``kernels.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import packed_layout  # noqa: E402

from sort_fast import contrastive_gradient_loss, head_gradcam  # noqa: E402
from sort_fast.heads import pythia_classifier  # noqa: E402
from sort_fast.ops import contrastive_loss as cl  # noqa: E402

DIM = 5000
SIZES = {"pythia": 64, "pythia_x8": 512}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench(fn) -> Dict[str, float]:
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80}


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB."""
    src = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))["ms"]
    return 2 * src.numel() * 4 / (ms * 1e-3)


def loss_rows(bandwidth: float) -> List[dict]:
    rows = []
    for size, groups in SIZES.items():
        offsets, num_sub = packed_layout(groups, device=torch.device("cuda"))
        t = int(offsets[-1])
        for name, dtype in DTYPES.items():
            grad = torch.randn(t, DIM, device="cuda").to(dtype)
            act = torch.rand(t, DIM, device="cuda").to(dtype)
            loss, cos, norm, weight = cl.contrastive_loss_fwd(grad, act, offsets, num_sub, 0.0,
                                                              1e-8, True, "triton")
            scale = torch.rand_like(loss)
            fwd = bench(lambda: cl.contrastive_loss_fwd(grad, act, offsets, num_sub, 0.0, 1e-8,
                                                        True, "triton"))
            bwd = bench(lambda: cl.gradcam_cosine_bwd(grad, act, offsets, cos, norm, weight,
                                                      scale, 1e-8, "triton"))
            fwd_bytes = 2 * grad.numel() * grad.element_size()
            bwd_bytes = 2 * fwd_bytes
            floor_ms = (fwd_bytes + bwd_bytes) / bandwidth * 1e3

            def step():
                g = grad.detach().requires_grad_()
                a = act.detach().requires_grad_()
                out = contrastive_gradient_loss(g, a, offsets, num_sub)
                return (out, *torch.autograd.grad(out, (g, a)))

            first, second = step(), step()
            rows.append(dict(size=size, dtype=name, rows=t, forward=fwd, backward=bwd,
                             floor_ms=floor_ms,
                             floor_fraction=floor_ms / (fwd["ms"] + bwd["ms"]),
                             bitwise_repeatable=all(torch.equal(x, y)
                                                    for x, y in zip(first, second))))
    return rows


SWEEP = [(16, 256, 4), (8, 256, 4), (16, 128, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8)]


def sweep_rows() -> List[dict]:
    """fwd + bwd kernel time at ``pythia`` for each ``(BLOCK_Q, MAX_BLOCK_D, NUM_WARPS)``."""
    from sort_fast.ops import contrastive_loss_kernels as k

    shipped = (k.BLOCK_Q, k.MAX_BLOCK_D, k.NUM_WARPS)
    offsets, num_sub = packed_layout(SIZES["pythia"], device=torch.device("cuda"))
    t = int(offsets[-1])
    rows = []
    try:
        for name, dtype in DTYPES.items():
            grad = torch.randn(t, DIM, device="cuda").to(dtype)
            act = torch.rand(t, DIM, device="cuda").to(dtype)
            for block_q, block_d, warps in SWEEP:
                k.BLOCK_Q, k.MAX_BLOCK_D, k.NUM_WARPS = block_q, block_d, warps
                _, cos, norm, weight = k.forward(grad, act, offsets, num_sub, 0.0, 1e-8, True)
                scale = torch.ones(num_sub.numel(), device="cuda")

                def both():
                    k.forward(grad, act, offsets, num_sub, 0.0, 1e-8, True)
                    k.backward(grad, act, offsets, cos, norm, weight, scale, 1e-8)

                rows.append(dict(dtype=name, block_q=block_q, max_block_d=block_d, warps=warps,
                                 shipped=(block_q, block_d, warps) == shipped, **bench(both)))
    finally:
        k.BLOCK_Q, k.MAX_BLOCK_D, k.NUM_WARPS = shipped
    return rows


def head_rows() -> List[dict]:
    torch.manual_seed(0)
    offsets, num_sub = packed_layout(64, device=torch.device("cuda"))
    t = int(offsets[-1])
    rows = []
    for name, dtype in DTYPES.items():
        head = pythia_classifier(DIM, 5000, 5000, 3129, dropout=0.0).cuda().to(dtype)
        h = torch.randn(t, DIM, device="cuda", dtype=dtype, requires_grad=True)
        classes = torch.randint(0, 3129, (t,), device="cuda")

        def closed():
            scores, grad = head_gradcam(head, h, classes)
            contrastive_gradient_loss(grad, h, offsets, num_sub).backward()

        def autograd():
            scores = head(h)
            (grad,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), h,
                                          create_graph=True)
            contrastive_gradient_loss(grad, h, offsets, num_sub).backward()

        closed_t, autograd_t = bench(closed), bench(autograd)
        rows.append(dict(dtype=name, rows=t, closed=closed_t, autograd=autograd_t,
                         speedup=autograd_t["ms"] / closed_t["ms"]))
    return rows


def markdown(result: dict) -> str:
    lines = [f"GPU: {result['gpu']}; copy bandwidth {result['bandwidth'] / 1e12:.2f} TB/s", "",
             "| size | dtype | T | fwd ms | bwd ms | floor ms | fraction of floor | "
             "bitwise repeatable |", "|---|---|---|---|---|---|---|---|"]
    for r in result["loss"]:
        lines.append(f"| {r['size']} | {r['dtype']} | {r['rows']} | {r['forward']['ms']:.4f} | "
                     f"{r['backward']['ms']:.4f} | {r['floor_ms']:.4f} | "
                     f"{r['floor_fraction']:.0%} | {r['bitwise_repeatable']} |")
    lines += ["", "| sweep dtype | BLOCK_Q | max BLOCK_D | warps | fwd+bwd ms | shipped |",
              "|---|---|---|---|---|---|"]
    for r in result["sweep"]:
        lines.append(f"| {r['dtype']} | {r['block_q']} | {r['max_block_d']} | {r['warps']} | "
                     f"{r['ms']:.4f} | {'yes' if r['shipped'] else ''} |")
    lines += ["", "| head dtype | closed ms | autograd ms | speed-up |", "|---|---|---|---|"]
    for r in result["head"]:
        lines.append(f"| {r['dtype']} | {r['closed']['ms']:.3f} | {r['autograd']['ms']:.3f} | "
                     f"{r['speedup']:.2f}x |")
    lines += [f"\nerror in {name}: {message}" for name, message in result["errors"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu-out", help="output folder")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA device; nothing to measure")
        return 2
    os.makedirs(args.out, exist_ok=True)
    bandwidth = copy_bandwidth()
    result = dict(gpu=torch.cuda.get_device_name(), bandwidth=bandwidth, errors={})
    # each part on its own: one that fails leaves the others' numbers
    for name, part in (("loss", lambda: loss_rows(bandwidth)), ("sweep", sweep_rows),
                       ("head", head_rows)):
        try:
            result[name] = part()
        except Exception as e:  # recorded in the output, not lost
            result[name], result["errors"][name] = [], f"{type(e).__name__}: {e}"
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
