"""Closed-form Grad-CAM of a decoder's final norm and LM head rows (``AnswerTokenHead`` and
``Sequential(norm, Linear)``) against the plain-autograd double-backward path."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sort_fast.heads import AnswerTokenHead
from sort_fast.ops import head_gradcam as hg
from sort_fast.ops.head_gradcam import head_gradcam
from sort_fast.ops.head_structure import closed_form_terms
from sort_fast.reference import gradients_or_zeros, reference_head_gradcam

NORMS = {
    "rms": lambda d: nn.RMSNorm(d),  # eps None: F.rms_norm takes the dtype's machine epsilon
    "rms_eps": lambda d: nn.RMSNorm(d, eps=1e-2),
    "rms_no_affine": lambda d: nn.RMSNorm(d, eps=1e-5, elementwise_affine=False),
    "layer": lambda d: nn.LayerNorm(d),
    "layer_no_bias": lambda d: nn.LayerNorm(d, eps=1e-3, bias=False),
    "layer_no_affine": lambda d: nn.LayerNorm(d, elementwise_affine=False),
}
TOL = dict(atol=1e-10, rtol=1e-10)  # float64 against autograd: tighter than the 1e-9 asked


def _sizes(seed):
    """Fresh ragged ``(T, D, V, A)``; seed 0 has a single row."""
    gen = torch.Generator().manual_seed(1000 + seed)
    t = 1 if seed == 0 else int(torch.randint(2, 40, (1,), generator=gen))
    d = int(torch.randint(2, 24, (1,), generator=gen))
    v = int(torch.randint(2, 60, (1,), generator=gen))
    a = int(torch.randint(1, 12, (1,), generator=gen))
    return t, d, v, a


def _norm(name, d):
    """A norm with random (trained-looking) affine parameters."""
    norm = NORMS[name](d)
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0, 0.3)
    return norm


def _head(kind, norm, d, v, a, bias):
    """``AnswerTokenHead`` with ``a`` answer tokens (repeats included) of an ``[v, d]`` LM head,
    or ``Sequential(norm, Linear(d, v))``; the number of scores."""
    lm_head = nn.Linear(d, v, bias=bias)
    if kind == "sequential":
        return nn.Sequential(norm, lm_head), v
    tokens = torch.randint(0, v, (a,))
    tokens = torch.cat([tokens, tokens[:1]])  # a repeated answer token
    return AnswerTokenHead(norm, lm_head, tokens), a + 1




def _compare(head, a, t, d, times_input=False, dtype=torch.float64, tol=TOL, backend="torch"):
    """Values, gradient and the second-order gradients of a random downstream loss w.r.t.
    ``h`` and every head parameter, closed form against autograd."""
    head = head.to(dtype)
    h = (torch.randn(t, d, dtype=dtype) * 2 + 0.3).requires_grad_()
    classes = torch.randint(0, a, (t,))
    r1 = torch.randn(t, a, dtype=dtype)
    r2 = torch.randn(t, d, dtype=dtype)
    tensors = [h, *head.parameters()]

    def loss(scores, grad):
        return (scores * r1).sum() + (grad * r2).sum() + (grad * h).pow(2).sum()

    scores, grad = head_gradcam(head, h, classes, backend=backend, times_input=times_input)
    ref_scores, ref_grad = reference_head_gradcam(head, h, classes, times_input)
    assert scores.dtype == ref_scores.dtype and grad.dtype == ref_grad.dtype
    torch.testing.assert_close(scores, ref_scores, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    for got, want in zip(gradients_or_zeros(loss(scores, grad), tensors),
                         gradients_or_zeros(loss(ref_scores, ref_grad), tensors)):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["answer_tokens", "sequential"])
@pytest.mark.parametrize("norm", NORMS)
def test_matches_autograd_double_backward(norm, kind, bias, seed):
    torch.manual_seed(seed)
    t, d, v, a = _sizes(seed)
    head, a = _head(kind, _norm(norm, d), d, v, a, bias)
    assert not isinstance(closed_form_terms(head), str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no autograd fallback
        _compare(head, a, t, d, times_input=seed % 2 == 1)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU()])
def test_rmsnorm_inside_a_smooth_head(act):
    """``Linear -> RMSNorm -> ReLU|GELU -> [Dropout] -> Linear`` takes the same closed form as
    the LayerNorm heads."""
    torch.manual_seed(6)
    norm = _norm("rms_eps", 9)
    head = nn.Sequential(nn.Linear(5, 9), norm, act, nn.Dropout(0.0), nn.Linear(9, 4))
    assert not isinstance(closed_form_terms(head), str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compare(head, 4, 11, 5, times_input=True)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_float32(norm):
    """float32 closed form against float32 autograd (same data)."""
    torch.manual_seed(7)
    head, a = _head("answer_tokens", _norm(norm, 32), 32, 100, 10, True)
    _compare(head, a, 17, 32, dtype=torch.float32, tol=dict(atol=1e-5, rtol=1e-4))


@pytest.mark.parametrize("h_in_autocast", [True, False])
@pytest.mark.parametrize("norm", ["rms", "rms_eps", "layer"])
def test_bf16_autocast(norm, h_in_autocast):
    """A body output (bf16 under autocast, or float32 made outside it) and an fp32 head under
    CPU bf16 autocast: the scores are autocast's bf16 ``nn.Linear`` of the answer rows, ``g`` is in
    ``h``'s dtype, and values and second-order gradients match autograd's double backward under
    the same autocast (bf16 rounding: 2e-2 of each tensor's largest entry)."""
    torch.manual_seed(8)
    d, v = 24, 80
    head, a = _head("answer_tokens", _norm(norm, d), d, v, 9, True)
    body = nn.Linear(10, d)
    x = torch.randn(15, 10)
    classes = torch.randint(0, a, (15,))
    r2 = torch.randn(15, d)
    results = []
    for closed_form in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = body(x) if h_in_autocast else None
        if h is None:
            h = body(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rms_norm: "Mismatch dtype ... fused"
            if closed_form:
                scores, grad = head_gradcam(head, h, classes)
            else:
                scores, grad = reference_head_gradcam(head, h, classes)
            assert scores.dtype == torch.bfloat16 and grad.dtype == h.dtype
            loss = ((grad.float() * r2).sum() + (grad.float() * h.float()).pow(2).sum()
                    + scores.float().square().mean())
        params = [*head.parameters(), *body.parameters()]
        results.append([t.detach() for t in (scores.float(), grad.float(),
                                              *torch.autograd.grad(loss, params))])
    for got, want in zip(*results):
        scale = want.abs().max().clamp_min(1e-6)
        assert float((got.float() - want.float()).abs().max() / scale) < 2e-2


def test_triton_backend_is_accepted():
    """The norm-first term has no matrix product for the Triton kernel: ``backend="triton"``
    (the interpreter on CPU) gives the torch backend's numbers."""
    pytest.importorskip("triton")
    torch.manual_seed(9)
    head, a = _head("answer_tokens", _norm("rms", 12), 12, 40, 5, True)
    head = head.double()
    h = torch.randn(6, 12, dtype=torch.float64)
    classes = torch.randint(0, a, (6,))
    for got, want in zip(head_gradcam(head, h, classes, backend="triton"),
                         head_gradcam(head, h, classes, backend="torch")):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


class _ShapeLog(TorchDispatchMode):
    """The shape of every tensor an aten op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_never_full_vocabulary(norm):
    """The LM head's forward is never called, and no tensor of the forward and the
    second-order backward has a ``T x V`` shape: the only ones of size ``V`` are the LM head's
    weight and bias gradients (``[V, D]``, ``[V]``, as autograd's are)."""
    torch.manual_seed(10)
    t, d, v, a = 5, 8, 997, 4
    head, a = _head("answer_tokens", _norm(norm, d), d, v, a, True)
    head = head.double()

    def refuse(*args, **kwargs):
        raise AssertionError("the full LM head was called")

    head.lm_head.forward = refuse
    h = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    classes = torch.randint(0, a, (t,))
    log = _ShapeLog()
    with log:
        scores, grad = head_gradcam(head, h, classes, times_input=True)
        loss = (scores.sum() + grad.pow(2).sum())
        grads = torch.autograd.grad(loss, [h, *head.parameters()])
    assert scores.shape == (t, a) and grad.shape == (t, d)
    assert all(g is not None for g in grads)
    with_v = {s for s in log.shapes if v in s}
    assert log.shapes and with_v <= {(v, d), (v,)}, with_v  # the LM head's weight and bias
    assert max(torch.Size(s).numel() for s in log.shapes) <= v * d


# ------------------------------------------------------------------------------- fallbacks
class _RMSNormSubclass(nn.RMSNorm):
    def forward(self, x):
        return super().forward(x) * 1.5


class _MyAnswerHead(AnswerTokenHead):
    def answer_logits(self, normed):
        return super().answer_logits(normed) * 2


def _hooked(norm):
    norm.register_forward_hook(lambda m, i, o: o * 2)
    return norm


@pytest.mark.parametrize("kind", ["answer_tokens", "sequential"])
@pytest.mark.parametrize("make_norm, match", [
    (lambda d: _hooked(nn.RMSNorm(d)), "hooks"),
    (lambda d: _hooked(nn.LayerNorm(d)), "hooks"),
    (lambda d: _RMSNormSubclass(d), "_RMSNormSubclass"),
])
def test_unrecognised_norm_falls_back(kind, make_norm, match, monkeypatch):
    """A hooked norm or a subclass with its own forward: autograd, with a one-time warning."""
    monkeypatch.setattr(hg, "_warned", set())
    torch.manual_seed(11)
    head, a = _head(kind, make_norm(6), 6, 20, 4, True)
    assert isinstance(closed_form_terms(head), str)
    with pytest.warns(UserWarning, match=match):
        _compare(head, a, 5, 6, times_input=True)
    with warnings.catch_warnings():  # warned once
        warnings.simplefilter("error")
        _compare(head, a, 5, 6)


def test_norm_not_over_the_last_dim_is_not_a_closed_form():
    for head in (AnswerTokenHead(nn.RMSNorm((2, 3)), nn.Linear(6, 4), torch.tensor([1, 2])),
                 nn.Sequential(nn.LayerNorm(7), nn.Linear(6, 3)),
                 nn.Sequential(nn.Linear(6, 5), nn.RMSNorm(6), nn.GELU(), nn.Linear(5, 3))):
        assert "is not over the last dim" in closed_form_terms(head)
    lm_head = nn.Linear(6, 20)
    terms = closed_form_terms(AnswerTokenHead(nn.RMSNorm(6), lm_head, torch.tensor([4, 4, 2])))
    assert len(terms) == 1 and terms[0].input_linear is None
    assert terms[0].output_linear is lm_head and terms[0].activation == "identity"
    assert (terms[0].in_features, terms[0].out_features) == (6, 3)


def test_overridden_answer_logits_falls_back(monkeypatch):
    monkeypatch.setattr(hg, "_warned", set())
    torch.manual_seed(12)
    head = _MyAnswerHead(_norm("rms", 6), nn.Linear(6, 20), torch.tensor([3, 1, 19]))
    with pytest.warns(UserWarning, match="answer_logits"):
        _compare(head, 3, 5, 6)


def test_llama_rmsnorm_falls_back(monkeypatch):
    """transformers' LlamaRMSNorm normalises in float32: not the closed form's (fp64-exact)
    ``nn.RMSNorm``, so it takes autograd."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    monkeypatch.setattr(hg, "_warned", set())
    torch.manual_seed(13)
    head = AnswerTokenHead(modeling.LlamaRMSNorm(6, eps=1e-6), nn.Linear(6, 20, bias=False),
                           torch.tensor([0, 5, 5, 7]))
    assert "LlamaRMSNorm" in closed_form_terms(head)
    with pytest.warns(UserWarning, match="LlamaRMSNorm"):
        _compare(head, 4, 5, 6)


# ------------------------------------------------------------------------------ the rest
def test_validation():
    head = AnswerTokenHead(nn.RMSNorm(6), nn.Linear(6, 20), torch.tensor([3, 1, 19]))
    with pytest.raises(ValueError, match="features"):
        head_gradcam(head, torch.randn(4, 5), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"classes\[1\]=3"):
        head_gradcam(head, torch.randn(4, 6), torch.tensor([0, 3, 1, 2]))
    with pytest.raises(TypeError, match="float64"):
        head_gradcam(head, torch.randn(4, 6).double(), torch.zeros(4, dtype=torch.int64))


def test_no_grad_and_empty_batch():
    head = AnswerTokenHead(_norm("layer", 6), nn.Linear(6, 20), torch.tensor([3, 1, 19]))
    h = torch.randn(5, 6)
    classes = torch.randint(0, 3, (5,))
    with torch.no_grad():
        scores, g = head_gradcam(head, h, classes)
    assert not scores.requires_grad and not g.requires_grad
    torch.testing.assert_close(g, head_gradcam(head, h, classes)[1])
    scores, g = head_gradcam(head, torch.randn(0, 6), torch.zeros(0, dtype=torch.int64))
    assert scores.shape == (0, 3) and g.shape == (0, 6)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fullgraph_compile(norm):
    """``torch.compile(fullgraph=True)`` of the closed form (the custom op's fake
    implementation) gives eager's values and gradients w.r.t. ``h`` and the head."""
    torch.manual_seed(14)
    head, a = _head("answer_tokens", _norm(norm, 9), 9, 30, 5, True)
    head = head.double()
    classes = torch.randint(0, a, (15,))
    h0 = torch.randn(15, 9, dtype=torch.float64)

    def fn(h):
        return head_gradcam(head, h, classes, times_input=True)

    torch._dynamo.reset()
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        h = h0.clone().requires_grad_()
        scores, grad = f(h)
        loss = (scores * torch.linspace(-1, 1, scores.numel(), dtype=torch.float64)
                .reshape(scores.shape)).sum() + F.softplus(grad).sum()
        results.append([scores, grad, *torch.autograd.grad(loss, [h, *head.parameters()])])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
