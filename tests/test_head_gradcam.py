"""Closed-form Grad-CAM of classifier heads against the plain-autograd double-backward path."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TRITON_DEVICE
from sort_fast.heads import BranchSum, mlp_head, pythia_classifier
from sort_fast.ops import head_gradcam as hg
from sort_fast.ops.gather_mm import kernel_supported, masked_gather_mm
from sort_fast.ops.head_gradcam import head_gradcam
from sort_fast.ops.head_structure import closed_form_terms
from sort_fast.reference import gradients_or_zeros, reference_head_gradcam

SHAPES = [(1, 3, 4, 2), (7, 5, 6, 9), (23, 8, 16, 11)]  # (T, D, H, A)


def _nested(d, h, a):  # Pythia's ReLUWithWeightNormFC layout: Sequential(Sequential(L, ReLU), L)
    first = nn.utils.parametrizations.weight_norm(nn.Linear(d, h, bias=False), dim=None)
    return nn.Sequential(nn.Sequential(first, nn.ReLU(inplace=True)), nn.Linear(h, a))


HEADS = {
    "linear": lambda d, h, a: nn.Linear(d, a),
    "mlp": lambda d, h, a: mlp_head(d, h, a).eval(),
    "mlp_dropout_train": lambda d, h, a: mlp_head(d, h, a, dropout=0.4).train(),
    "mlp_weight_norm": lambda d, h, a: mlp_head(d, h, a, weight_norm=True),
    "dropout_before_relu": lambda d, h, a: nn.Sequential(
        nn.Linear(d, h), nn.Dropout(0.5), nn.ReLU(), nn.Linear(h, a)
    ).train(),
    "nested_sequential": _nested,
    "pythia_train": lambda d, h, a: pythia_classifier(d, h, h + 3, a, dropout=0.3).train(),
    "branchsum_linear_mlp": lambda d, h, a: BranchSum(nn.Linear(d, a), mlp_head(d, h, a)),
    # ViLT/BERT-style answer heads: Linear -> LayerNorm -> GELU -> [Dropout] -> Linear
    "ln_gelu": lambda d, h, a: _smooth(d, h, a, nn.LayerNorm(h), nn.GELU()),
    "ln_gelu_tanh_dropout_train": lambda d, h, a: _smooth(
        d, h, a, nn.LayerNorm(h), nn.GELU(approximate="tanh"), nn.Dropout(0.4)).train(),
    "ln_no_affine_gelu": lambda d, h, a: _smooth(
        d, h, a, nn.LayerNorm(h, elementwise_affine=False), nn.GELU()),
    "gelu_without_ln": lambda d, h, a: _smooth(d, h, a, None, nn.GELU(), nn.Dropout(0.3)).train(),
    "ln_relu_dropout_train": lambda d, h, a: _smooth(
        d, h, a, nn.LayerNorm(h), nn.ReLU(), nn.Dropout(0.3)).train(),
}


def _smooth(d, h, a, norm, act, dropout=None):
    """``Linear -> [LayerNorm] -> act -> [Dropout] -> Linear`` with a non-trivial LayerNorm
    affine (random gamma and beta), as after training."""
    layers = [nn.Linear(d, h), norm, act, dropout, nn.Linear(h, a)]
    head = nn.Sequential(*[m for m in layers if m is not None])
    if norm is not None and norm.elementwise_affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.3)
    return head


def _groups(t):
    """Ragged contiguous groups over ``t`` rows: the first row of each group is its reference."""
    sizes, left, k = [], t, 1
    while left:
        sizes.append(min(k, left))
        left -= sizes[-1]
        k = k % 4 + 1
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))])
    return torch.repeat_interleave(starts, torch.tensor(sizes))


def _loss(G, weights):
    """Cosine of every row with its group's reference row plus a weighted sum (second order)."""
    ref = _groups(G.shape[0])
    cos = F.cosine_similarity(G, G[ref], dim=1)
    return (cos * weights[:, 0]).sum() + (G * weights[:, 1:]).sum()


def _reference(head, h, classes, seed, times_input):
    torch.manual_seed(seed)  # the dropout masks of the closed form's forward
    return reference_head_gradcam(head, h, classes, times_input)


def _compare(head, shape, times_input, backend="torch", dtype=torch.float64, atol=1e-12,
             rtol=1e-10):
    t, d, _, a = shape
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    head = head.to(device, dtype)
    h = torch.randn(t, d, dtype=dtype).to(device).requires_grad_()
    classes = torch.randint(0, a, (t,)).to(device)
    weights = torch.randn(t, d + 1, dtype=dtype).to(device)
    tensors = [h, *head.parameters()]

    torch.manual_seed(123)
    scores, grad = head_gradcam(head, h, classes, backend=backend, times_input=times_input)
    ref_scores, ref_grad = _reference(head, h, classes, 123, times_input)
    torch.testing.assert_close(scores, ref_scores, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)

    loss = _loss(grad, weights) + (scores * 0.1).sum()
    ref_loss = _loss(ref_grad, weights) + (ref_scores * 0.1).sum()
    for got, want in zip(gradients_or_zeros(loss, tensors), gradients_or_zeros(ref_loss, tensors)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("times_input", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", HEADS)
def test_matches_autograd_double_backward(name, shape, times_input):
    _, d, hidden, a = shape
    _compare(HEADS[name](d, hidden, a), shape, times_input)


def test_dropout_mask_is_the_forward_mask():
    head = mlp_head(6, 32, 5, dropout=0.5).double().train()
    h = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    classes = torch.randint(0, 5, (10,))
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        scores, g = head_gradcam(head, h, classes)
        ref_scores, ref_g = _reference(head, h, classes, seed, False)
        torch.testing.assert_close(scores, ref_scores, atol=1e-12, rtol=0)
        torch.testing.assert_close(g, ref_g, atol=1e-12, rtol=0)
        results.append(g)
    assert not torch.allclose(*results)  # different masks really change g


def test_gradcheck_function():
    t, d, hidden, a = 5, 4, 6, 3
    z = torch.randn(t, hidden, dtype=torch.float64)
    mask = (z > 0).double() * torch.bernoulli(torch.full_like(z, 0.7)) / 0.7
    classes = torch.tensor([0, 2, 2, 1, 0])
    w2 = torch.randn(a, hidden, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(hidden, d, dtype=torch.float64, requires_grad=True)
    fn = masked_gather_mm
    assert torch.autograd.gradcheck(lambda w2, w1: fn(mask, classes, w2, w1, "torch"), (w2, w1))


def test_backward_is_once_differentiable():
    """Third-order derivatives through the closed form are refused, not silently wrong."""
    head = mlp_head(4, 6, 3).double()
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    _, g = head_gradcam(head, h, torch.randint(0, 3, (5,)))
    (grad_w1,) = torch.autograd.grad(g.pow(2).sum(), head[0].weight, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad_w1.sum().backward()


class _TanhHead(nn.Module):
    def __init__(self, d, a):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 7), nn.Tanh(), nn.Linear(7, a))

    def forward(self, x):
        return self.net(x)


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(hg, "_warned", set())
    head = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    with pytest.warns(UserWarning, match="Tanh"):
        _compare(head, (9, 5, 7, 4), times_input=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compare(head, (9, 5, 7, 4), times_input=False)
    with pytest.warns(UserWarning, match="_TanhHead"):
        _compare(_TanhHead(5, 4), (6, 5, 7, 4), times_input=False)


def test_hooked_module_falls_back(monkeypatch):
    monkeypatch.setattr(hg, "_warned", set())
    head = mlp_head(4, 5, 3).double()
    head[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.warns(UserWarning, match="hooks"):
        _compare(head, (6, 4, 5, 3), times_input=False)


@pytest.mark.parametrize("head", [mlp_head(4, 6, 3),
                                  nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))])
def test_no_grad_and_input_without_grad(head, monkeypatch):
    monkeypatch.setattr(hg, "_warned", set())
    warnings.simplefilter("ignore")
    h = torch.randn(5, 4)
    classes = torch.randint(0, 3, (5,))
    with torch.no_grad():
        scores, g = head_gradcam(head, h, classes)
    assert not scores.requires_grad and not g.requires_grad
    scores2, g2 = head_gradcam(head, h, classes)  # h is a plain input, the weights learn
    torch.testing.assert_close(g, g2)
    assert g2.requires_grad and not h.requires_grad


def test_auto_backend_on_cpu_is_torch():
    head = mlp_head(4, 6, 3).double()
    h = torch.randn(5, 4, dtype=torch.float64)
    classes = torch.randint(0, 3, (5,))
    assert torch.equal(head_gradcam(head, h, classes)[1],
                       head_gradcam(head, h, classes, backend="torch")[1])


def test_empty_batch():
    head = mlp_head(4, 6, 3)
    scores, g = head_gradcam(head, torch.randn(0, 4), torch.zeros(0, dtype=torch.int64))
    assert scores.shape == (0, 3) and g.shape == (0, 4)


@pytest.mark.parametrize(
    "h, classes, kwargs, error, match",
    [
        (torch.randn(5, 4), torch.zeros(5, dtype=torch.int32), {}, TypeError, "int64"),
        (torch.randn(5, 4), torch.zeros(4, dtype=torch.int64), {}, ValueError, r"shape \[5\]"),
        (torch.randn(5, 4), torch.tensor([0, 1, 3, 0, 0]), {}, ValueError, r"classes\[2\]=3"),
        (torch.randn(5, 4), torch.tensor([0, -1, 0, 0, 0]), {}, ValueError, r"classes\[1\]=-1"),
        (torch.randn(5), torch.zeros(5, dtype=torch.int64), {}, ValueError, "2-D"),
        (torch.ones(5, 4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), {}, TypeError,
         "floating"),
        (torch.randn(5, 6), torch.zeros(5, dtype=torch.int64), {}, ValueError, "features"),
        (torch.randn(5, 4).double(), torch.zeros(5, dtype=torch.int64), {}, TypeError, "float64"),
        (torch.randn(5, 4), [0, 1], {}, TypeError, "classes"),
        (torch.randn(5, 4), torch.zeros(5, dtype=torch.int64), {"backend": "cuda"}, ValueError,
         "backend"),
    ],
)
def test_validation(h, classes, kwargs, error, match):
    with pytest.raises(error, match=match):
        head_gradcam(mlp_head(4, 6, 3), h, classes, **kwargs)


def test_head_must_be_module():
    with pytest.raises(TypeError, match="nn.Module"):
        head_gradcam(lambda x: x, torch.randn(2, 3), torch.zeros(2, dtype=torch.int64))


# ----------------------------------------------------------------------- Triton (interpreter)

TRITON_HEADS = ["mlp_dropout_train", "pythia_train", "linear"]


@pytest.mark.parametrize("times_input", [False, True])
@pytest.mark.parametrize("name", TRITON_HEADS)
def test_triton_float32(name, times_input):
    pytest.importorskip("triton")
    _compare(HEADS[name](20, 24, 7), (13, 20, 24, 7), times_input, backend="triton",
             dtype=torch.float32, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_triton_half(dtype, tol):
    """Half inputs, float32 accumulation: compared with float32 math on the same rounded values,
    within ``tol`` relative to each tensor's largest entry."""
    pytest.importorskip("triton")
    t, d, hidden, a = 13, 20, 24, 7
    head = pythia_classifier(d, hidden, hidden, a, dropout=0.3).train().to(TRITON_DEVICE, dtype)
    head32 = pythia_classifier(d, hidden, hidden, a, dropout=0.3).train().to(TRITON_DEVICE)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    h = torch.randn(t, d).to(TRITON_DEVICE, dtype).requires_grad_()
    h32 = h.detach().float().requires_grad_()
    classes = torch.randint(0, a, (t,)).to(TRITON_DEVICE)
    weights = torch.randn(t, d + 1).to(TRITON_DEVICE)
    results = []
    for mod, x, backend in ((head, h, "triton"), (head32, h32, "torch")):
        torch.manual_seed(7)
        scores, G = head_gradcam(mod, x, classes, backend=backend, times_input=True)
        grads = gradients_or_zeros(_loss(G.float(), weights), [x, *mod.parameters()])
        results.append([G, *grads])
    for got, want in zip(*results):
        assert got.dtype == dtype
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got.float() - want).abs().max() / scale) < tol


@pytest.mark.parametrize("dtype, capability, kernel", [
    (torch.float16, (7, 5), False), (torch.bfloat16, (7, 5), False),
    (torch.float16, (8, 0), True), (torch.bfloat16, (9, 0), True),
    (torch.float32, (9, 0), False), (torch.float16, None, True),
])
def test_kernel_serves_tensor_core_gpus_only(dtype, capability, kernel):
    """sm_75 and float32 products run torch.matmul (the static GPU check shows why)."""
    assert kernel_supported(dtype, capability) is kernel


@pytest.mark.parametrize("name", [n for n in HEADS if n.startswith(("ln_", "gelu"))])
def test_layernorm_gelu_heads_take_the_closed_form(name):
    """No autograd fallback (which would warn) for the ViLT-style heads."""
    head = HEADS[name](5, 6, 4)
    assert not isinstance(closed_form_terms(head), str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head_gradcam(head.double(), torch.randn(3, 5, dtype=torch.float64), torch.zeros(3).long())


def test_gelu_before_dropout_only():
    """Dropout does not commute with GELU: dropout before a GELU is not a closed form."""
    head = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.2), nn.GELU(), nn.Linear(6, 3))
    assert "not Linear[-LayerNorm]" in closed_form_terms(head)
