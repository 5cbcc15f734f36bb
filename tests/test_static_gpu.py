"""Static GPU check (no GPU needed): every kernel launch of the Pythia-size workload compiles
for sm_75/80/90 with Triton's compiler and ptxas, without spills, with 128-bit global accesses
in the loss kernels, tensor-core instructions in the head kernel and float64 scalar parameters
in the float64 loss kernels."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "sort_fast.ops.static_check", "--json",
                           str(out)], capture_output=True, text=True, env=env, timeout=900)
    print(done.stdout)  # the table, in the test output
    assert out.exists(), done.stderr[-2000:]
    return json.loads(out.read_text())["records"]


def test_every_launch_compiles_without_spills(records):
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_gradcam_cosine_fwd_partial_kernel", "_gradcam_cosine_fwd_finish_kernel",
                       "_gradcam_cosine_bwd_kernel", "_gather_mm_kernel"}
    assert {r["arch"] for r in records} == {75, 80, 90}
    for r in records:
        assert not r["error"], r
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r


def test_loss_kernels_move_128_bit_vectors(records):
    """At D = 5000 (not a power of two) every grad/act tile is read (and, in the backward,
    written) with 128-bit accesses, for fp32, bf16 and fp16."""
    for r in records:
        if r["kernel"] in ("_gradcam_cosine_fwd_partial_kernel", "_gradcam_cosine_bwd_kernel"):
            assert r["widest_load_bits"] == 128, r
        if r["kernel"] == "_gradcam_cosine_bwd_kernel":
            assert r["widest_store_bits"] == 128, r


def test_head_kernel_uses_tensor_cores(records):
    head = [r for r in records if r["kernel"] == "_gather_mm_kernel"]
    assert {r["arch"] for r in head} == {80, 90}  # sm_75 runs torch.matmul (see the docs)
    for r in head:
        assert (r["wgmma"] if r["arch"] >= 90 else r["mma"]) > 0, r
        assert r["widest_load_bits"] == 128 and r["fma_f32"] == 0, r


LOSS_KERNELS = {"_gradcam_cosine_fwd_partial_kernel", "_gradcam_cosine_fwd_finish_kernel",
                "_gradcam_cosine_bwd_kernel"}


def test_float64_loss_kernels_take_no_fp32_scalar(records):
    """``margin``/``eps`` reach the float64 kernels as ``.param .f64`` (a Python float would be
    an fp32 parameter, rounded: 0.3 -> 0.30000001192); no kernel has an fp32 scalar left."""
    fp64 = [r for r in records if r["variant"].startswith("fp64")]
    assert {r["kernel"] for r in fp64} == LOSS_KERNELS
    assert {r["arch"] for r in fp64} == {75, 80, 90}
    for r in records:
        assert r["f32_params"] == 0, r
    scalars = {"_gradcam_cosine_fwd_finish_kernel": 2, "_gradcam_cosine_bwd_kernel": 1,
               "_gradcam_cosine_fwd_partial_kernel": 0}  # (margin, eps), (eps), none
    for r in records:
        if r["kernel"] in scalars:
            assert r["f64_params"] == scalars[r["kernel"]], r
