"""SOrTLoss (paper Eq. 3) against a plain-autograd reference, including second-order gradients."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sort_fast import SOrTLoss
from sort_fast.reference import reference_loss
from test_contrastive_loss import RAGGED, make_inputs  # noqa: I001


def reference_total(scores, targets, grad, act, offsets, num_sub, lambdas, mode, margin):
    per_role = [[], [], []]
    for g in range(num_sub.numel()):
        a, b, k = int(offsets[g]), int(offsets[g + 1]), int(num_sub[g])
        for row in range(a, b):
            role = 0 if row == a else (1 if row <= a + k else 2)
            per_role[role].append(F.binary_cross_entropy_with_logits(
                scores[row].double(), targets[row].double(), reduction="sum"))
    bce = [torch.stack(v).mean() if v else scores.sum() * 0 for v in per_role]
    cg = reference_loss(grad, act, offsets, num_sub, margin=margin, mode=mode)
    return cg + sum(lam * b for lam, b in zip(lambdas, bce)), cg, bce


def head_and_batch(seed=0):
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    grad_unused, h, offsets, num_sub = make_inputs(*RAGGED, dim=12, seed=seed)
    targets = torch.rand(h.shape[0], 6, dtype=torch.float64)
    targets[targets < 0.6] = 0.0
    return head, h, offsets, num_sub, targets


def gradcam_step(head, h, targets):
    h = h.detach().clone().requires_grad_()
    scores = head(h)
    classes = targets.argmax(1)
    (grad,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), h, create_graph=True)
    return h, scores, grad


@pytest.mark.parametrize("mode, margin", [("contrastive", 0.0), ("contrastive", 0.2),
                                          ("sq_only", 0.0)])
def test_sort_loss_matches_reference_second_order(mode, margin):
    head, h0, offsets, num_sub, targets = head_and_batch()
    lambdas = (2.27, 1.5, 3e-4)
    loss_fn = SOrTLoss(*lambdas, margin=margin, mode=mode, backend="torch")

    h, scores, grad = gradcam_step(head, h0, targets)
    out = loss_fn(scores, targets, grad, h, offsets, num_sub)
    got = torch.autograd.grad(out.total, [h, *head.parameters()])

    h_ref, scores_ref, grad_ref = gradcam_step(head, h0, targets)
    total, cg, bce = reference_total(scores_ref, targets, grad_ref, h_ref, offsets, num_sub,
                                     lambdas, mode, margin)
    want = torch.autograd.grad(total, [h_ref, *head.parameters()])

    torch.testing.assert_close(out.total, total)
    torch.testing.assert_close(out.contrastive, cg)
    for part, ref in zip((out.bce_reasoning, out.bce_sub, out.bce_irrelevant), bce):
        torch.testing.assert_close(part, ref)
    for g, w in zip(got, want):  # includes the second-order path through dy_c/dA
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    parts = [f.name for f in dataclasses.fields(out)]
    assert parts == ["total", "contrastive", "bce_reasoning", "bce_sub", "bce_irrelevant"]
    assert all(getattr(out, name).shape == () for name in parts)  # scalars, on the device


def test_sort_loss_under_autocast():
    head, h0, offsets, num_sub, targets = head_and_batch(1)
    head = head.float()
    loss_fn = SOrTLoss()
    h, scores, grad = gradcam_step(head, h0.float(), targets.float())
    exact = loss_fn(scores, targets.float(), grad, h, offsets, num_sub).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, scores, grad = gradcam_step(head, h0.float(), targets.float())
        assert scores.dtype == torch.bfloat16
        out = loss_fn(scores, targets.float(), grad, h, offsets, num_sub)
    assert out.total.dtype == torch.float32
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    # bf16 matmuls in the head: a loose, stated tolerance
    torch.testing.assert_close(out.total, exact.detach(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(mode="triplet"), "mode must be one of"), (dict(lambda_sub=-1.0), "lambda_sub"),
     (dict(lambda_reasoning=float("nan")), "lambda_reasoning must be a finite"),
     (dict(lambda_irrelevant=float("inf")), "lambda_irrelevant must be a finite"),
     (dict(margin=float("nan")), "margin must be a finite"),
     (dict(eps=0.0), "eps must be a positive"), (dict(eps=-1e-8), "eps must be a positive"),
     (dict(backend="cuda"), "backend must be one of"), (dict(lambda_sub=True), "lambda_sub")],
)
def test_sort_loss_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SOrTLoss(**kwargs)


def test_sort_loss_bad_shapes():
    head, h0, offsets, num_sub, targets = head_and_batch()
    h, scores, grad = gradcam_step(head, h0, targets)
    with pytest.raises(ValueError, match="differ in shape"):
        SOrTLoss()(scores, targets[:, :3], grad, h, offsets, num_sub)
    with pytest.raises(ValueError, match="rows but grad has"):
        SOrTLoss()(scores[:-1], targets[:-1], grad, h, offsets, num_sub)


def test_role_bce_objective_is_sort_without_its_gradcam_term():
    """``--loss role-bce`` (the Table 1 control) is SOrT's loss with the contrastive Grad-CAM
    term removed: the same per-role BCE terms and weights."""
    from sort_fast.data import SyntheticIntrospect, collate_groups
    from sort_fast.models import PythiaConfig, PythiaVQA
    from sort_fast.training import Objective

    ds = SyntheticIntrospect(seed=0, split="val", num_groups=8)
    batch = collate_groups(list(ds))
    torch.manual_seed(0)
    model = PythiaVQA(PythiaConfig(len(ds.vocab), ds.num_answers, embed_dim=8, text_hidden=8,
                                   attention_hidden=8, joint_dim=16, classifier_text_hidden=8,
                                   classifier_image_hidden=8)).double().eval()
    batch = dataclasses.replace(batch, image_features=batch.image_features.double(),
                                targets=batch.targets.double())
    weights = dict(lambda_reasoning=0.5, lambda_sub=2.0, lambda_irrelevant=3.0, margin=0.0,
                   lambda_attention=0.0, naive=False)
    control, control_parts = Objective("role-bce", **weights)(model, batch)
    sort, sort_parts = Objective("sort", **weights)(model, batch)
    torch.testing.assert_close(control, sort - sort_parts["contrastive"])
    for name in ("bce_reasoning", "bce_sub", "bce_irrelevant"):
        torch.testing.assert_close(control_parts[name], sort_parts[name])
    torch.testing.assert_close(control, 0.5 * control_parts["bce_reasoning"]
                               + 2.0 * control_parts["bce_sub"]
                               + 3.0 * control_parts["bce_irrelevant"])


def test_layout_changed_behind_the_version_counter_is_refused():
    """Issue 23, D10: a collated batch's layout written through numpy (which shares the
    memory) or through ``.data`` moves no version counter; the remembered validation must not
    let the loss run on it (it gave a loss of [0.0, 0.0])."""
    from sort_fast import contrastive_gradient_loss
    from sort_fast.data import SyntheticIntrospect, collate_groups
    from sort_fast.heads import pythia_classifier
    from sort_fast.ops.head_gradcam import head_gradcam

    batch = collate_groups(list(SyntheticIntrospect(seed=0, split="val", num_groups=2)))
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(batch.num_questions, 6, generator=gen)
    act = torch.randn(batch.num_questions, 6, generator=gen)
    before = contrastive_gradient_loss(grad, act, batch.offsets, batch.num_sub, reduction="none")
    assert bool((before > 0).any())
    batch.num_sub.numpy()[:] = [3, 0]
    with pytest.raises(ValueError, match="group 1 has num_sub=0"):
        contrastive_gradient_loss(grad, act, batch.offsets, batch.num_sub, reduction="none")
    batch.num_sub.numpy()[:] = [1, 1]
    contrastive_gradient_loss(grad, act, batch.offsets, batch.num_sub)  # valid again
    batch.offsets.data[1] = batch.offsets[2] + 1
    with pytest.raises(ValueError, match="strictly increasing"):
        contrastive_gradient_loss(grad, act, batch.offsets, batch.num_sub)
    head = pythia_classifier(6, 4, 4, 5)
    head_gradcam(head, act, batch.classes.clamp(max=4))
    classes = batch.classes.clamp(max=4)
    head_gradcam(head, act, classes)
    classes.data[0] = 7
    with pytest.raises(ValueError, match="classes\\[0\\]=7"):
        head_gradcam(head, act, classes)
