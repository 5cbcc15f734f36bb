"""Contrastive gradient loss and Grad-CAM similarity against the float64 plain-autograd loop
of :mod:`sort_fast.reference`."""
import pytest
import torch
import torch.nn.functional as F

import sort_fast
from conftest import TRITON_DEVICE
from sort_fast import contrastive_gradient_loss, gradcam_similarity
from sort_fast.reference import EPS, reference_loss, reference_similarity

triton = pytest.importorskip("triton")
from sort_fast.ops import contrastive_loss_kernels  # noqa: E402  (needs TRITON_INTERPRET first)
from test_kernel_scalars import gpu_scalar_params  # noqa: E402, F401  (a fixture)


@pytest.fixture(autouse=True)
def _gpu_scalars(gpu_scalar_params):
    """Every kernel here gets its float arguments typed as on a GPU (test_kernel_scalars.py),
    so that a scalar rounded to fp32 fails the float64 comparisons."""


# ----------------------------------------------------------------------------- inputs
def make_layout(sizes, num_sub):
    offsets = torch.tensor([0] + list(sizes)).cumsum(0)
    return offsets, torch.tensor(num_sub)


# sizes / num_sub: K=1, M=0 (no irrelevant), a pair-only group, and larger ragged groups
RAGGED = ([4, 2, 6, 3, 9, 5], [1, 1, 2, 2, 3, 4])


def make_inputs(sizes, num_sub, dim, dtype=torch.float64, zero_rows=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets, num_sub = make_layout(sizes, num_sub)
    T = int(offsets[-1])
    grad = torch.randn(T, dim, generator=gen, dtype=torch.float64)
    act = torch.rand(T, dim, generator=gen, dtype=torch.float64)
    for row in zero_rows:
        act[row] = 0.0
    return grad.to(dtype), act.to(dtype), offsets, num_sub


def run(fn, grad, act, *args, **kwargs):
    """``fn``'s output and gradients for a fixed random upstream gradient, returned on the CPU;
    ``backend="triton"`` runs on ``TRITON_DEVICE``."""
    device = TRITON_DEVICE if kwargs.get("backend") == "triton" else torch.device("cpu")
    grad = grad.detach().to(device).requires_grad_()
    act = act.detach().to(device).requires_grad_()
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(grad, act, *args, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64).to(device, out.dtype)
    dgrad, dact = torch.autograd.grad((out * upstream).sum(), (grad, act))
    return out.cpu(), dgrad.cpu(), dact.cpu()


def assert_close_all(got, want, rtol, atol):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype or g.dtype != torch.float64
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol)


BACKENDS = ["torch", "triton"]
# float64 inputs: both backends accumulate in float64
FLOAT64 = dict(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- values and grads
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["contrastive", "sq_only"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_loss_matches_reference(backend, mode, reduction, margin):
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=19, seed=hash((mode, margin)) % 1000)
    kw = dict(margin=margin, mode=mode, reduction=reduction)
    got = run(contrastive_gradient_loss, grad, act, offsets, num_sub, backend=backend, **kw)
    want = run(reference_loss, grad, act, offsets, num_sub, **kw)
    # triton accumulates in float32 whatever the input dtype
    assert_close_all(got, want, **FLOAT64)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0  # the case is not degenerate


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_matches_reference(backend):
    grad, act, offsets, _ = make_inputs(*RAGGED, dim=23, seed=3)
    got = run(gradcam_similarity, grad, act, offsets, backend=backend)
    want = run(reference_similarity, grad, act, offsets)
    assert_close_all(got, want, **FLOAT64)
    # and the cosine has torch.nn.functional.cosine_similarity semantics
    G = grad * act
    first = F.cosine_similarity(G[1:4], G[0:1], dim=1, eps=EPS)
    torch.testing.assert_close(got[0][1:4].double(), first, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_layouts(backend, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(1, 7, (1,), generator=gen))
    sizes = torch.randint(2, 12, (n,), generator=gen).tolist()
    num_sub = [int(torch.randint(1, s, (1,), generator=gen)) for s in sizes]
    dim = int(torch.randint(1, 40, (1,), generator=gen))
    grad, act, offsets, num_sub = make_inputs(sizes, num_sub, dim, seed=seed)
    margin = float(torch.rand(1, generator=gen)) * 0.5
    got = run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=margin,
              backend=backend)
    want = run(reference_loss, grad, act, offsets, num_sub, margin=margin)
    assert_close_all(got, want, **FLOAT64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradcam_vectors(backend):
    # a zero reasoning row (group 0) and zero candidate rows (groups 2 and 4)
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=11, zero_rows=(0, 8, 13, 17))
    for fn, ref, args in ((contrastive_gradient_loss, reference_loss, (offsets, num_sub)),
                          (gradcam_similarity, reference_similarity, (offsets,))):
        got = run(fn, grad, act, *args, backend=backend)
        want = run(ref, grad, act, *args)
        assert all(torch.isfinite(t).all() for t in got)
        assert_close_all(got, want, **FLOAT64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_counted_group_gives_zero_mean(backend):
    grad, act, offsets, num_sub = make_inputs([3, 2], [2, 1], dim=5)
    loss, dgrad, dact = run(contrastive_gradient_loss, grad, act, offsets, num_sub,
                            backend=backend)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dgrad) == 0 and torch.count_nonzero(dact) == 0


@pytest.mark.parametrize("dim", [70, 3, 16])
def test_multi_tile_groups_in_the_kernel(monkeypatch, dim):
    """Groups larger than one row tile, several column chunks with a ragged tail (70 = 4 x 16
    + 6), a width below the vector width (3) and exactly one chunk (16)."""
    monkeypatch.setattr(contrastive_loss_kernels, "BLOCK_Q", 4)
    monkeypatch.setattr(contrastive_loss_kernels, "MAX_BLOCK_D", 16)
    cfg = contrastive_loss_kernels.launch_config(dim, torch.float32)
    assert (cfg["BLOCK_Q"], cfg["BLOCK_D"], cfg["N_CHUNKS"]) == (4, 16, -(-dim // 16))
    grad, act, offsets, num_sub = make_inputs([13, 2, 5, 11], [3, 1, 1, 9], dim=dim, seed=5)
    for mode in ("contrastive", "sq_only"):
        got = run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=0.1, mode=mode,
                  backend="triton")
        want = run(reference_loss, grad, act, offsets, num_sub, margin=0.1, mode=mode)
        assert_close_all(got, want, **FLOAT64)
    got = run(gradcam_similarity, grad, act, offsets, backend="triton")
    assert_close_all(got, run(reference_similarity, grad, act, offsets), **FLOAT64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_group(backend):
    grad, act, offsets, num_sub = make_inputs([7], [2], dim=21, seed=8)
    got = run(contrastive_gradient_loss, grad, act, offsets, num_sub, backend=backend, margin=0.2)
    assert_close_all(got, run(reference_loss, grad, act, offsets, num_sub, margin=0.2), **FLOAT64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_bitwise_repeatable(backend):
    """Fixed-order sums, no atomics: two runs give identical bits."""
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=300, dtype=torch.float32, seed=9)
    first = run(contrastive_gradient_loss, grad, act, offsets, num_sub, backend=backend)
    second = run(contrastive_gradient_loss, grad, act, offsets, num_sub, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("backend", BACKENDS)
# group 0: its reasoning row, a sub-question, an irrelevant one
@pytest.mark.parametrize("row", [0, 1, 3])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_loss(backend, row, value):
    """A NaN or inf in a Grad-CAM vector that a group's loss uses makes that loss NaN, as in
    plain PyTorch (the hinge never masks it); the other groups keep their values."""
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=7, seed=12)
    grad[row, 0] = value
    got = run(contrastive_gradient_loss, grad, act, offsets, num_sub, backend=backend,
              reduction="none")[0]
    want = reference_loss(grad, act, offsets, num_sub, reduction="none")
    assert torch.isnan(want[0]) and torch.isnan(got[0])
    torch.testing.assert_close(got[1:].double(), want[1:], **FLOAT64)
    for reduction in ("mean", "sum"):
        device = TRITON_DEVICE if backend == "triton" else "cpu"
        loss = contrastive_gradient_loss(grad.to(device), act.to(device), offsets.to(device),
                                         num_sub.to(device), reduction=reduction,
                                         backend=backend)
        assert torch.isnan(loss)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("row", [0, 1, 3])  # a reasoning row, a sub-question, an irrelevant one
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_poisons_the_same_elements_in_both_backends(row, value):
    """The same NaN/inf pattern in the loss and both gradients: a non-finite Grad-CAM vector
    poisons its whole gradient row (and its group's reasoning row) in either backend."""
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=7, seed=12)
    grad[row, 0] = value
    got = {backend: run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=0.2,
                        backend=backend, reduction="none") for backend in BACKENDS}
    for by_torch, by_triton in zip(got["torch"], got["triton"]):
        assert torch.equal(torch.isnan(by_torch), torch.isnan(by_triton))
        assert torch.equal(torch.isinf(by_torch), torch.isinf(by_triton))
    for backend in BACKENDS:
        _, dgrad, dact = got[backend]
        assert torch.isnan(dgrad[row]).all() and torch.isnan(dgrad[0]).all(), backend
        assert torch.isnan(dact[row]).all(), backend
        assert not torch.isnan(dgrad[offsets[1]:]).any(), backend  # other groups stay finite


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_layout_tensors(backend):
    """Strided ``offsets``/``num_sub`` views are read by value, not as raw memory."""
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=9, seed=13)
    spread_offsets = torch.stack([offsets, torch.full_like(offsets, 99)], 1).flatten()[::2]
    spread_sub = torch.stack([num_sub, torch.full_like(num_sub, 99)], 1).flatten()[::2]
    assert not spread_offsets.is_contiguous() and torch.equal(spread_offsets, offsets)
    got = run(contrastive_gradient_loss, grad, act, spread_offsets, spread_sub, backend=backend,
              reduction="none")
    assert_close_all(got, run(reference_loss, grad, act, offsets, num_sub, reduction="none"),
                     **FLOAT64)
    expanded = torch.tensor([1]).expand(2)
    offsets2 = torch.tensor([0, 3, 6])
    got = run(contrastive_gradient_loss, grad[:6], act[:6], offsets2, expanded, backend=backend,
              reduction="none")
    want = run(reference_loss, grad[:6], act[:6], offsets2, torch.tensor([1, 1]), reduction="none")
    assert_close_all(got, want, **FLOAT64)


# Low precision: inputs are rounded to the dtype, the reference sees the same rounded values in
# float64; both backends accumulate in float32, so the stated tolerances cover float32 sums only.
# Gradients are returned in the input dtype, which adds its rounding (bf16: 8 bits of mantissa).
LOW_PRECISION = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
def test_low_precision_inputs(backend, dtype):
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=33, dtype=dtype, seed=11)
    got = run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=0.2, backend=backend)
    want = run(reference_loss, grad.double(), act.double(), offsets, num_sub, margin=0.2)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype
    tol = LOW_PRECISION[dtype]
    torch.testing.assert_close(got[0].double(), want[0], **tol)
    scale = want[1].abs().max()  # gradient tolerances relative to the largest entry
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double() / scale, w / scale, **tol)


def test_mixed_input_dtypes():
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=9, seed=4)
    got = run(contrastive_gradient_loss, grad.float(), act.half(), offsets, num_sub,
              backend="torch")
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float16
    want = run(reference_loss, grad.float().double(), act.half().double(), offsets, num_sub)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- long rows
# Row factors: a reasoning row (0), a member of its group (2, just under the long-row bound
# 2^63 ~ 9.2e18 once multiplied), a member of group 2 (7), the reasoning row of group 4 (15)
# and a sub-question of group 4 (18): their float32 squares overflow (from ~1.8e19).
LONG_ROWS = {0: 1e20, 2: 3e18, 7: 1e25, 15: 1e30, 18: 2e19}


def long_row_inputs(dtype=torch.float32):
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=19, seed=31)
    for row, factor in LONG_ROWS.items():
        grad[row] *= factor
    return grad.to(dtype), act.to(dtype), offsets, num_sub


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_float32_rows_match_float64(backend):
    """float32 Grad-CAM entries past ~2e18 (squared norms past the float32 range) give the
    float64 reference's loss and gradients, not NaN or zero gradient rows."""
    grad, act, offsets, num_sub = long_row_inputs()
    got = run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=0.2,
              backend=backend, reduction="none")
    want = run(reference_loss, grad.double(), act.double(), offsets, num_sub, margin=0.2,
               reduction="none")
    assert all(torch.isfinite(t).all() for t in got)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-5)
    for g, w in zip(got[1:], want[1:]):  # each row relative to its largest entry
        row_max = w.abs().amax(1, keepdim=True)
        assert (row_max[list(LONG_ROWS)] > 0).all()  # the long rows have gradients
        row_max = torch.where(row_max > 0, row_max, 1.0)
        torch.testing.assert_close(g.double() / row_max, w / row_max, rtol=1e-4, atol=1e-5)
    sim = run(gradcam_similarity, grad, act, offsets, backend=backend)
    want_sim = run(reference_similarity, grad.double(), act.double(), offsets)
    torch.testing.assert_close(sim[0].double(), want_sim[0], rtol=1e-4, atol=1e-5)


def test_rows_that_are_not_long_keep_their_bits():
    """Ordinary float32 rows take exactly the plain formulas (Table 1 reproduces bit for bit):
    none of them is long, and even rescaling every row by its power of two (what a long row
    gets) leaves every output bit unchanged: the scaling is exact."""
    from sort_fast.ops import contrastive_loss_torch

    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=300, dtype=torch.float32, seed=9)
    G = grad * act
    norm = torch.linalg.vector_norm(G, dim=1)
    assert contrastive_loss_torch.long_rows(norm).numel() == 0
    start = offsets[:-1]
    gid = torch.repeat_interleave(torch.arange(num_sub.numel()), offsets.diff())
    cos = torch.einsum("td,td->t", G, G[start][gid]) / (
        norm.clamp_min(EPS) * norm[start][gid].clamp_min(EPS))  # the plain formula
    cos[start] = 1.0
    assert torch.equal(gradcam_similarity(grad, act, offsets, backend="torch"), cos)
    plain = run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=0.2,
                backend="torch", reduction="none")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(contrastive_loss_torch, "long_rows",
                      lambda norm: torch.arange(norm.numel()))
        G_all = G.clone()
        scale, _ = contrastive_loss_torch.scale_rows(G_all, torch.arange(G.shape[0]))
        assert (scale != 1).all()
        scaled = run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=0.2,
                     backend="torch", reduction="none")
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("mode", ["contrastive", "sq_only"])
def test_gradcheck_torch_backend(mode):
    # a margin keeps every hinge away from its kink, where finite differences are undefined
    grad, act, offsets, num_sub = make_inputs([4, 3, 5], [1, 1, 2], dim=6, seed=2)
    fn = lambda g, a: contrastive_gradient_loss(g, a, offsets, num_sub, margin=0.5, mode=mode,  # noqa: E731
                                                reduction="none", backend="torch")
    assert torch.autograd.gradcheck(fn, (grad.requires_grad_(), act.requires_grad_()))
    sim = lambda g, a: gradcam_similarity(g, a, offsets, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(sim, (grad, act))


def test_inputs_are_not_modified():
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=8)
    before = [t.clone() for t in (grad, act, offsets, num_sub)]
    g, a = grad.requires_grad_(), act.requires_grad_()
    contrastive_gradient_loss(g, a, offsets, num_sub, backend="torch").backward()
    for t, b in zip((grad, act, offsets, num_sub), before):
        assert torch.equal(t.detach(), b)


def test_module_wrapper():
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=8)
    module = sort_fast.ContrastiveGradientLoss(margin=0.1, mode="contrastive", reduction="sum")
    torch.testing.assert_close(module(grad, act, offsets, num_sub),
                               reference_loss(grad, act, offsets, num_sub, margin=0.1,
                                              reduction="sum"))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(offsets=torch.tensor([0, 30, 29])), ValueError, "group 1 has offsets\\[1\\]=30"),
        (dict(offsets=torch.tensor([0, 4, 29], dtype=torch.int32)), ValueError, "int64"),
        (dict(offsets=torch.tensor([1, 4, 29])), ValueError, "offsets\\[0\\] must be 0"),
        (dict(offsets=torch.tensor([0, 4, 30])), ValueError, "does not match the 29 rows"),
        (dict(offsets=[0, 4, 29]), TypeError, "offsets must be a torch.Tensor"),
        (dict(num_sub=torch.tensor([1, 0])), ValueError, "group 1 has num_sub=0"),
        (dict(num_sub=torch.tensor([4, 1])), ValueError, "group 0 has num_sub=4 but only 3"),
        (dict(num_sub=torch.tensor([1])), ValueError, "one entry per group"),
        (dict(grad=torch.zeros(29, 5, dtype=torch.int64)), TypeError, "grad must be float"),
        (dict(act=torch.zeros(28, 5)), ValueError, "differ in shape"),
        (dict(act=torch.zeros(29)), ValueError, r"act must be \[T, D\]"),
        (dict(act=torch.zeros(29, 5, 1)), ValueError, "differ in shape"),
        (dict(grad=(torch.zeros(29, 5),)), TypeError, "pair or a GradCAM"),
        (dict(mode="both"), ValueError, "mode must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(eps=0.0), ValueError, "eps must be a positive"),
        (dict(margin=float("nan")), ValueError, "margin must be a finite"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(change, exc, match):
    args = dict(grad=torch.randn(29, 5), act=torch.randn(29, 5),
                offsets=torch.tensor([0, 4, 29]), num_sub=torch.tensor([1, 2]))
    args.update(change)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("grad", "act", "offsets", "num_sub")}
    with pytest.raises(exc, match=match):
        contrastive_gradient_loss(args["grad"], args["act"], args["offsets"], args["num_sub"],
                                  **kwargs)


def test_gradcam_object_pair_and_conv_maps():
    """The losses take what GradCAM gives (the object or a (grad, act) pair) and conv-shaped
    activations [T, C, H, W], flattened per row: the same values and gradients."""
    grad, act, offsets, num_sub = make_inputs(*RAGGED, dim=2 * 3 * 4, seed=21)
    want = run(contrastive_gradient_loss, grad, act, offsets, num_sub, margin=0.1)
    conv = run(lambda g, a, *rest, **kw: contrastive_gradient_loss(
        g.reshape(-1, 2, 3, 4), a.reshape(-1, 2, 3, 4), *rest, **kw),
        grad, act, offsets, num_sub, margin=0.1)
    pair = run(lambda g, a, *rest, **kw: contrastive_gradient_loss((g, a), *rest, **kw),
               grad, act, offsets, num_sub, margin=0.1)
    assert_close_all(conv, want, **FLOAT64)
    assert_close_all(pair, want, **FLOAT64)

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 5)).double()
    images = torch.randn(int(offsets[-1]), 1, 4, 4, dtype=torch.float64)
    classes = torch.randint(0, 5, (images.shape[0],))
    with sort_fast.GradCAM(model, "1") as cam:  # the ReLU's [T, 2, 4, 4] output
        cam.vectors(model(images), classes)
        by_object = contrastive_gradient_loss(cam, offsets, num_sub, reduction="none")
        by_tensors = contrastive_gradient_loss(cam.gradient, cam.activation, offsets, num_sub,
                                               reduction="none")
        sim = gradcam_similarity(cam, offsets)
        sim_tensors = gradcam_similarity(cam.gradient.flatten(1), cam.activation.flatten(1),
                                         offsets)
        criterion = sort_fast.SOrTLoss()
        scores, targets = model(images), torch.rand(images.shape[0], 5, dtype=torch.float64)
        total = criterion(scores, targets, cam, offsets, num_sub).total
    torch.testing.assert_close(by_object, by_tensors)
    torch.testing.assert_close(sim, sim_tensors)
    assert sim.shape == (images.shape[0],) and torch.isfinite(total)
    (dconv,) = torch.autograd.grad(total, model[0].weight)
    assert dconv.abs().sum() > 0  # second order reaches the conv weights
