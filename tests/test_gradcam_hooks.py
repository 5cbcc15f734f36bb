"""GradCAM: Grad-CAM vectors of a named layer through a forward hook."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sort_fast.gradcam import GradCAM
from sort_fast.heads import pythia_classifier
from sort_fast.ops.head_gradcam import head_gradcam


class ToyVQA(nn.Module):
    """Image and question features fused by an element-wise product, then a Pythia head."""

    def __init__(self, d_img=6, d_q=5, d=8, answers=7):
        super().__init__()
        self.img = nn.Linear(d_img, d)
        self.q = nn.Linear(d_q, d)
        self.fusion = nn.Identity()
        self.classifier = pythia_classifier(d, 9, 10, answers, dropout=0.3)

    def forward(self, img, q):
        return self.classifier(self.fusion(torch.relu(self.img(img)) * torch.relu(self.q(q))))


def _inputs(t=11):
    return torch.randn(t, 6, dtype=torch.float64), torch.randn(t, 5, dtype=torch.float64)


def _grads(loss, tensors):
    out = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(out, tensors)]


def _loss(G):
    return F.cosine_similarity(G[1:], G[:1].expand_as(G[1:]), dim=1).sum() + G.pow(2).sum()


def test_vectors_match_manual_double_backward():
    model = ToyVQA().double().train()
    img, q = _inputs()
    classes = torch.randint(0, 7, (img.shape[0],))
    params = list(model.parameters())

    torch.manual_seed(3)
    with GradCAM(model, layer="fusion") as cam:
        scores = model(img, q)
        G = cam.vectors(scores, classes)
        torch.testing.assert_close(G, cam.gradient * cam.activation)
        got = _grads(_loss(G), params)

    torch.manual_seed(3)
    acts = {}
    handle = model.fusion.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    ref_scores = model(img, q)
    handle.remove()
    a = acts["a"]
    (g,) = torch.autograd.grad(ref_scores.gather(1, classes[:, None]).sum(), a, create_graph=True)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    torch.testing.assert_close(G, g * a, rtol=1e-12, atol=1e-12)
    for x, y in zip(got, _grads(_loss(g * a), params)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_agrees_with_closed_form_head():
    model = ToyVQA().double().eval()
    img, q = _inputs()
    classes = torch.randint(0, 7, (img.shape[0],))
    with GradCAM(model, layer="fusion") as cam:
        scores = model(img, q)
        G = cam.vectors(scores, classes)
        scores2, G2 = head_gradcam(model.classifier, cam.activation, classes, times_input=True)
    torch.testing.assert_close(scores2, scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G2, G, rtol=1e-12, atol=1e-12)


def test_hooks_removed_and_activation_freed():
    model = ToyVQA().double()
    img, q = _inputs()
    classes = torch.randint(0, 7, (img.shape[0],))
    with GradCAM(model, layer="fusion") as cam:
        assert len(model.fusion._forward_hooks) == 1
        G = cam.vectors(model(img, q), classes)
        ref = weakref.ref(cam.activation)
        _loss(G).backward()
    assert len(model.fusion._forward_hooks) == 0
    del G
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError, match="no activation"):
        cam.activation
    model(img, q)  # no hook left: nothing is captured
    assert cam._activation is None


def test_hooks_removed_on_exception():
    model = ToyVQA().double()
    with pytest.raises(KeyError):
        with GradCAM(model, layer="classifier") as cam:
            model(*_inputs())
            raise KeyError("boom")
    assert len(model.classifier._forward_hooks) == 0
    assert cam._activation is None and cam._gradient is None


def test_layer_on_input_without_grad():
    """An Identity applied to an input that does not require grad is still differentiable."""
    head = nn.Sequential(nn.Identity(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    classes = torch.randint(0, 3, (5,))
    with GradCAM(head, layer="0") as cam:
        G = cam.vectors(head(x), classes)
    _, ref = head_gradcam(head[1:], x, classes, times_input=True)
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)
    assert not x.requires_grad


def test_errors():
    model = ToyVQA().double()
    with pytest.raises(ValueError, match="no submodule 'fuse'"):
        GradCAM(model, layer="fuse")
    with pytest.raises(TypeError, match="nn.Module"):
        GradCAM(object(), layer="fusion")
    img, q = _inputs(4)
    with GradCAM(model, layer=model.fusion) as cam:
        with pytest.raises(RuntimeError, match="no activation"):
            cam.activation
        with pytest.raises(RuntimeError, match="already open"):
            cam.__enter__()
        scores = model(img, q)
        with pytest.raises(RuntimeError, match="no gradient"):
            cam.gradient
        with pytest.raises(TypeError, match="int64"):
            cam.vectors(scores, torch.zeros(4, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"shape \[4\]"):
            cam.vectors(scores, torch.zeros(3, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"\[0, 7\)"):
            cam.vectors(scores, torch.tensor([0, 7, 0, 0]))
        with pytest.raises(ValueError, match="2-D"):
            cam.vectors(scores[:, 0], torch.zeros(4, dtype=torch.int64))


def test_captum_layer_gradcam():
    captum_attr = pytest.importorskip("captum.attr")
    model = ToyVQA().double().eval()
    img, q = _inputs()
    classes = torch.randint(0, 7, (img.shape[0],))
    with GradCAM(model, layer="fusion") as cam:
        G = cam.vectors(model(img, q), classes)
    # captum sums the (channel) Grad-CAM over the feature dimension of a 2-D activation
    ref = captum_attr.LayerGradCam(model, model.fusion).attribute((img, q), target=classes)
    torch.testing.assert_close(G.sum(1, keepdim=True), ref.reshape(-1, 1), rtol=1e-10, atol=1e-12)


def test_exit_without_enter_is_a_runtime_error():
    cam = GradCAM(ToyVQA(), layer="fusion")
    with pytest.raises(RuntimeError, match="not open"):
        cam.__exit__(None, None, None)
    with cam:
        pass
    with pytest.raises(RuntimeError, match="not open"):      # closed twice
        cam.__exit__(None, None, None)
