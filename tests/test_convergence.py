"""Convergence of the fused training path against the plain-autograd one: a small PythiaVQA
trained for 20 steps on the synthetic benchmark from the same initialisation, on the same
batches and dropout masks, with the closed-form Grad-CAM (``naive=False``: ``head_gradcam``,
the loss's torch backend on the CPU) and with autograd's double backward (``naive=True``),
gives the same loss at every step and the same final weights."""
import dataclasses
from typing import List, Tuple

import pytest
import torch

from sort_fast.data import PackedBatch, SyntheticIntrospect, collate_groups
from sort_fast.models import PythiaConfig, PythiaVQA
from sort_fast.training import objective as objective_module
from sort_fast.training.objective import Objective
from sort_fast.training.static_step import make_optimizer, train_step

STEPS = 20
GROUPS_PER_BATCH = 4
# The paths need not round alike (a gathered row against a one-hot product, a hand-written
# backward against autograd's double backward), and 20 Adamax steps carry any rounding on.
FLOAT32 = dict(rtol=1e-5, atol=1e-6)
FLOAT64 = dict(rtol=1e-12, atol=1e-14)


@pytest.fixture(autouse=True)
def _one_thread():
    """The model's products are tiny: on a busy machine, waiting for a second thread costs
    more than the product (a step takes 30 times longer with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset() -> SyntheticIntrospect:
    return SyntheticIntrospect(seed=0, split="train", num_groups=STEPS * GROUPS_PER_BATCH)


def _batches(ds: SyntheticIntrospect, dtype: torch.dtype) -> List[PackedBatch]:
    groups = list(ds)
    out = []
    for step in range(STEPS):
        batch = collate_groups(groups[step * GROUPS_PER_BATCH:(step + 1) * GROUPS_PER_BATCH])
        out.append(dataclasses.replace(batch, image_features=batch.image_features.to(dtype),
                                       targets=batch.targets.to(dtype)))
    return out


def _train(ds: SyntheticIntrospect, loss: str, naive: bool, dtype: torch.dtype
           ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Per-step ``[STEPS, 2]`` (total loss, contrastive part), the initial and the final
    parameters of one training run."""
    torch.manual_seed(0)
    model = PythiaVQA(PythiaConfig(len(ds.vocab), ds.num_answers, feature_dim=ds.feature_dim,
                                   embed_dim=8, text_hidden=8, attention_hidden=8,
                                   joint_dim=16, classifier_text_hidden=8,
                                   classifier_image_hidden=8)).to(dtype).train()
    initial = [p.detach().clone() for p in model.parameters()]
    objective = Objective(loss, lambda_reasoning=2.27, lambda_sub=2.27, lambda_irrelevant=3e-4,
                          margin=0.1, lambda_attention=0.5, naive=naive)
    optimizer = make_optimizer(model.parameters(), 5e-3)
    per_step = []
    for step, batch in enumerate(_batches(ds, dtype)):
        torch.manual_seed(100 + step)  # the same dropout masks on both paths
        _, parts = train_step(model, batch, objective, optimizer, grad_clip=0.25)
        per_step.append(torch.stack([parts["loss"], parts["contrastive"]]))
    return torch.stack(per_step), initial, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, FLOAT32), (torch.float64, FLOAT64)],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("loss", ["sort", "sort-sq"])
def test_fused_and_autograd_paths_train_alike(dataset, monkeypatch, loss, dtype, tol):
    calls = []
    closed_form = objective_module.head_gradcam

    def counted(*args, **kwargs):
        calls.append(1)
        return closed_form(*args, **kwargs)

    monkeypatch.setattr(objective_module, "head_gradcam", counted)
    fused, initial, fused_params = _train(dataset, loss, False, dtype)
    assert len(calls) == STEPS  # the fused run took the closed form at every step
    plain, _, plain_params = _train(dataset, loss, True, dtype)
    assert len(calls) == STEPS  # and the plain run never did

    assert fused.dtype == dtype and torch.isfinite(fused).all()
    assert (fused[:, 1] > 0).all()  # the contrastive term is active at every step
    torch.testing.assert_close(fused, plain, **tol)
    moved = 0.0
    for start, a, b in zip(initial, fused_params, plain_params):
        torch.testing.assert_close(a, b, **tol)
        moved = max(moved, float((a - start).abs().max()))
    assert moved > 1e3 * tol["atol"]  # training moved the weights far beyond the tolerance
