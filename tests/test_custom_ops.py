"""The fused ops as PyTorch custom ops: opcheck, torch.compile(fullgraph=True) against eager,
autocast, and no host sync on a validated batch."""
import contextlib

import pytest
import torch
from torch import nn

import sort_fast
from conftest import TRITON_DEVICE
from sort_fast import contrastive_gradient_loss, gradcam_similarity, head_gradcam
from sort_fast.heads import mlp_head, pythia_classifier
from sort_fast.layout import check_layout, class_range
from sort_fast.ops import contrastive_loss as cl
from sort_fast.ops.gather_mm import gather_mm, masked_gather_mm
from sort_fast.ops.norm_act_gradcam import norm_act_gradcam

OFFSETS = torch.tensor([0, 4, 6, 12, 15])
NUM_SUB = torch.tensor([1, 1, 2, 1])


def leaves(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()


BACKEND_DEVICES = [("torch", torch.device("cpu")), ("triton", TRITON_DEVICE)]


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_opcheck_loss_ops(backend, device):
    pytest.importorskip("triton") if backend == "triton" else None
    grad, act = leaves(15, 9, seed=1).to(device), leaves(15, 9, seed=2).to(device)
    offsets, num_sub = OFFSETS.to(device), NUM_SUB.to(device)
    for contrastive in (True, False):
        torch.library.opcheck(cl.contrastive_loss_fwd,
                              (grad, act, offsets, num_sub, 0.1, 1e-8, contrastive, backend))
    torch.library.opcheck(cl.gradcam_similarity_fwd, (grad, act, offsets, 1e-8, backend))
    cos, norm = cl.gradcam_similarity_fwd(grad.detach(), act.detach(), offsets, 1e-8, backend)
    weight = torch.randn_like(cos)
    scale = torch.rand(4, dtype=cos.dtype, device=device)
    for group_scale in (None, scale):
        torch.library.opcheck(cl.gradcam_cosine_bwd, (grad.detach(), act.detach(), offsets, cos,
                                                      norm, weight, group_scale, 1e-8, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_head_ops(backend):
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    dtype = torch.float16 if backend == "triton" else torch.float64  # the kernel's dtypes
    mask = (torch.rand(7, 6) > 0.4).to(device, dtype)
    classes = torch.tensor([0, 2, 2, 1, 0, 1, 2]).to(device)
    w2 = (torch.randn(3, 6) / 3).to(device, dtype).requires_grad_()
    w1 = (torch.randn(6, 5) / 3).to(device, dtype).requires_grad_()
    # autograd's numeric gradcheck needs float64; the schema and fake checks run for half too
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic") \
        if dtype != torch.float64 else None
    kw = {} if tests is None else {"test_utils": tests}
    torch.library.opcheck(masked_gather_mm, (mask, classes, w2, w1, backend), **kw)
    upstream = torch.randn(7, 5).to(device, dtype)
    for args in ((w2, classes, mask, w1, None, False),        # g = (M * W2[c]) W1
                 (w2, classes, mask, upstream, None, True),   # dL/dW1 = (M * W2[c])^T U
                 (upstream, None, None, w1.t(), mask, False)):  # (U W1^T) * M
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(gather_mm, (*args, torch.float32, backend), **kw)


# ----------------------------------------------------------------------------- fullgraph
def compiled_matches_eager(fn, inputs, dynamic, rtol=1e-10, atol=1e-12):
    """``torch.compile(fn, fullgraph=True)`` (a fresh Dynamo cache: a function compiled before
    without fullgraph could hide a graph break) gives eager's values and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    results = []
    for f in (fn, compiled):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out = f(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        total = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64)
                     .reshape(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(total, [x for x in xs if x.requires_grad])
        results.append([*outs, *grads])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dynamic", [False, True])
def test_fullgraph_contrastive_loss(dynamic):
    def fn(grad, act):
        return contrastive_gradient_loss(grad, act, OFFSETS, NUM_SUB, margin=0.2, backend="torch")

    compiled_matches_eager(fn, [leaves(15, 9, seed=3), leaves(15, 9, seed=4)], dynamic)


def test_fullgraph_similarity_and_sq_only():
    def fn(grad, act):
        sim = gradcam_similarity(grad, act, OFFSETS)
        sq = contrastive_gradient_loss(grad, act, OFFSETS, NUM_SUB, mode="sq_only",
                                       reduction="none")
        return sim, sq

    compiled_matches_eager(fn, [leaves(15, 9, seed=5), leaves(15, 9, seed=6)], dynamic=False)


def test_fullgraph_head_gradcam():
    torch.manual_seed(0)
    head = pythia_classifier(9, 8, 12, 5, dropout=0.0).double()
    classes = torch.randint(0, 5, (15,))

    def fn(h):
        return head_gradcam(head, h, classes, times_input=True)

    compiled_matches_eager(fn, [leaves(15, 9, seed=7)], dynamic=False)


def test_fullgraph_sort_loss_step():
    """Head Grad-CAM, SOrTLoss (contrastive term and per-role BCE) and the backward, in one
    graph."""
    torch.manual_seed(0)
    head = mlp_head(9, 16, 5).double()
    classes = torch.randint(0, 5, (15,))
    targets = torch.rand(15, 5, dtype=torch.float64)
    criterion = sort_fast.SOrTLoss(margin=0.1)

    def fn(h):
        scores, grad = head_gradcam(head, h, classes)
        return criterion(scores, targets, grad, h, OFFSETS, NUM_SUB).total

    compiled_matches_eager(fn, [leaves(15, 9, seed=8)], dynamic=False)


# ----------------------------------------------------------------------------- autocast
def test_head_gradcam_under_cpu_autocast():
    """A bf16 body output and an fp32 head under autocast: the closed form computes in bf16,
    as nn.Linear does, and matches autograd's double backward under the same autocast
    (bf16 rounding: tolerance 2e-2 of each tensor's largest entry)."""
    torch.manual_seed(0)
    head = pythia_classifier(12, 16, 20, 6, dropout=0.0)
    body = nn.Linear(10, 12)
    x = torch.randn(15, 10)
    classes = torch.randint(0, 6, (15,))
    results = []
    for closed_form in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = body(x)
            assert h.dtype == torch.bfloat16
            if closed_form:
                scores, grad = head_gradcam(head, h, classes)
            else:
                scores = head(h)
                (grad,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), h,
                                              create_graph=True)
            loss = (contrastive_gradient_loss(grad, h, OFFSETS, NUM_SUB, margin=0.3)
                    + scores.float().square().mean())
        assert grad.dtype == torch.bfloat16
        params = [*head.parameters(), *body.parameters()]
        results.append([t.detach() for t in (scores.float(), grad.float(),
                                              *torch.autograd.grad(loss, params))])
    for got, want in zip(*results):
        scale = want.abs().max().clamp_min(1e-6)
        assert float((got.float() - want.float()).abs().max() / scale) < 2e-2


def test_mismatched_dtypes_without_autocast_still_raise():
    with pytest.raises(TypeError, match="bfloat16"):
        head_gradcam(mlp_head(4, 6, 3), torch.randn(5, 4).bfloat16(), torch.zeros(5).long())


# ----------------------------------------------------------------------------- host syncs
@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Every Python-level device-to-host read of a tensor raises while the block runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("host sync on the hot path")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        yield


def test_validated_batch_step_makes_no_host_sync(monkeypatch):
    """Layout and class range validated where the batch is built; the fused step (head
    Grad-CAM, SOrTLoss, backward) then reads nothing back from the device."""
    torch.manual_seed(0)
    head = pythia_classifier(9, 8, 12, 5, dropout=0.2)
    h = torch.randn(15, 9, requires_grad=True)
    classes = torch.randint(0, 5, (15,))
    targets = torch.rand(15, 5)
    check_layout(OFFSETS, NUM_SUB, 15)
    class_range(classes)
    criterion = sort_fast.SOrTLoss()
    with no_host_sync(monkeypatch):
        scores, grad = head_gradcam(head, h, classes)
        criterion(scores, targets, grad, h, OFFSETS, NUM_SUB).total.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    # an unvalidated layout is checked (with its one sync): the guard above really guards
    with no_host_sync(monkeypatch), pytest.raises(AssertionError, match="host sync"):
        contrastive_gradient_loss(grad, h, OFFSETS.clone(), NUM_SUB.clone())


def test_modified_layout_is_validated_again():
    offsets, num_sub = OFFSETS.clone(), NUM_SUB.clone()
    grad, act = torch.randn(15, 4), torch.randn(15, 4)
    contrastive_gradient_loss(grad, act, offsets, num_sub)
    num_sub[2] = 9  # in place: the remembered validation no longer holds
    with pytest.raises(ValueError, match="group 2 has num_sub=9"):
        contrastive_gradient_loss(grad, act, offsets, num_sub)


def test_loss_ops_are_differentiable_once():
    grad, act = leaves(15, 6, seed=9), leaves(15, 6, seed=10)
    loss = contrastive_gradient_loss(grad, act, OFFSETS, NUM_SUB, margin=0.3)
    (dgrad,) = torch.autograd.grad(loss, grad, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        dgrad.sum().backward()


@pytest.mark.parametrize("loss", ["sort", "sort-sq"])
def test_pythia_sort_step_has_no_graph_break(loss):
    """One SOrT step of the Pythia-style model (LSTM through Dynamo's RNN support, shared
    questions and image slots from collate, closed-form Grad-CAM, SOrTLoss) traces as one
    graph."""
    from sort_fast.data import SyntheticIntrospect, collate_groups
    from sort_fast.models import PythiaConfig, PythiaVQA
    from sort_fast.training import Objective

    ds = SyntheticIntrospect(seed=0, split="val", num_groups=6)
    batch = collate_groups(list(ds))
    model = PythiaVQA(PythiaConfig(len(ds.vocab), ds.num_answers, feature_dim=ds.feature_dim,
                                   embed_dim=8, text_hidden=8, attention_hidden=8, joint_dim=16,
                                   classifier_text_hidden=8, classifier_image_hidden=8))
    objective = Objective(loss, lambda_reasoning=2.27, lambda_sub=2.27, lambda_irrelevant=3e-4,
                          margin=0.1, lambda_attention=0.0, naive=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        explained = torch._dynamo.explain(objective)(model, batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_pythia_training_step_makes_no_host_sync(monkeypatch):
    """A whole training step of the trainer on a collated batch (model forward with the
    distinct questions and image slots found by collate, closed-form Grad-CAM, SOrTLoss,
    backward, gradient clipping) reads nothing back from the device. (The optimizer step reads
    its step counter with ``.item()``, but PyTorch keeps that counter on the CPU even when the
    parameters are on a GPU, so it is no device sync.)"""
    from sort_fast.data import SyntheticIntrospect, collate_groups
    from sort_fast.models import PythiaConfig, PythiaVQA
    from sort_fast.training import Objective

    ds = SyntheticIntrospect(seed=0, split="val", num_groups=6)
    batch = collate_groups(list(ds))
    model = PythiaVQA(PythiaConfig(len(ds.vocab), ds.num_answers, feature_dim=ds.feature_dim,
                                   embed_dim=8, text_hidden=8, attention_hidden=8, joint_dim=16,
                                   classifier_text_hidden=8, classifier_image_hidden=8))
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    objective = Objective("sort", lambda_reasoning=2.27, lambda_sub=2.27,
                          lambda_irrelevant=3e-4, margin=0.1, lambda_attention=0.0, naive=False)
    with no_host_sync(monkeypatch):
        loss, parts = objective(model, batch)
        loss.backward()
        parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    optimizer.step()
    assert torch.isfinite(torch.stack(list(parts.values()))).all()


@pytest.mark.parametrize("norm, affine", [("layer", True), ("layer", False), ("rms", True),
                                          ("rms", False), ("none", False)])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "identity"])
def test_norm_act_gradcam_op(norm, affine, activation):
    """The norm/activation op of the transformer heads and of a decoder's final norm (identity
    activation): opcheck (schema, fake, autograd registration) and its hand-written backward
    against finite differences (float64)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(7, generator=gen, dtype=torch.float64) + 0.5).requires_grad_() \
        if affine else None
    beta = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_() \
        if affine and norm == "layer" else None
    rows = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    args = (z, gamma, beta, rows, 1e-5, norm, activation)
    torch.library.opcheck(norm_act_gradcam, args)
    leaves = [t for t in (z, gamma, beta, rows) if t is not None]

    def first_output(*xs):
        it = iter(xs)
        full = [next(it) if t is not None else None for t in (z, gamma, beta, rows)]
        return norm_act_gradcam(*full, 1e-5, norm, activation)

    if activation != "relu":  # ReLU's kink makes finite differences meaningless at 0
        assert torch.autograd.gradcheck(first_output, leaves)


def test_norm_act_gradcam_rejects_unknown_kinds():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="norm must be one of"):
        norm_act_gradcam(z, None, None, z, 1e-5, "batch", "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        norm_act_gradcam(z, None, None, z, 1e-5, "rms", "tanh")
