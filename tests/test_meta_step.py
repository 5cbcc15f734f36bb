"""A whole SOrT training step on PyTorch's ``meta`` device (tensors without data: an operator
that must read a value fails there) counted at the dispatcher: no operator moves data between
host and device or reads a device value (docs/ops.md, "What is proven without a GPU")."""
import pytest
import torch

from sort_fast.data import SyntheticIntrospect, collate_groups
from sort_fast.models import LlavaVQAConfig, PythiaConfig, PythiaVQA
from sort_fast.train import _warmup
from sort_fast.training import Objective
from sort_fast.training.op_census import OpCensus
from sort_fast.training.static_step import make_optimizer, train_step


def _setup(loss: str, device: str, model_kind: str = "pythia"):
    ds = SyntheticIntrospect(seed=0, split="val", num_groups=8)
    batch = collate_groups(list(ds)).pin_memory() if torch.cuda.is_available() else \
        collate_groups(list(ds))
    torch.manual_seed(0)
    if model_kind == "llava":
        model = LlavaVQAConfig(len(ds.vocab), ds.num_answers, ds.feature_dim, hidden_size=16,
                               intermediate_size=32, num_layers=2, num_heads=2,
                               num_kv_heads=1).build().to(device).train()
    else:
        model = PythiaVQA(PythiaConfig(len(ds.vocab), ds.num_answers,
                                       feature_dim=ds.feature_dim, embed_dim=8, text_hidden=8,
                                       attention_hidden=8, joint_dim=16,
                                       classifier_text_hidden=8,
                                       classifier_image_hidden=8)).to(device).train()
    objective = Objective(loss, lambda_reasoning=2.27, lambda_sub=2.27,
                          lambda_irrelevant=3e-4, margin=0.1, lambda_attention=0.5,
                          naive=False)
    return model, batch, objective


def _step_census(loss: str, device: str, capturable: bool, model_kind: str = "pythia"
                 ) -> OpCensus:
    model, batch, objective = _setup(loss, device, model_kind)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-3,
                               capturable=capturable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(4))
    moved = batch.to(device, non_blocking=True)
    with OpCensus() as census:
        for _ in range(2):  # the second step runs with the optimizer state in place
            census.phase = "objective"
            loss_value, parts = train_step(model, moved, objective, optimizer, grad_clip=0.25,
                                           mark=lambda phase: setattr(census, "phase", phase))
    scheduler.step()
    assert loss_value.device.type == device and set(parts) >= {"loss", "grad_norm"}
    assert census.kernels("objective") > 50 and census.kernels("backward") > 50
    assert census.kernels("optimizer") > 0
    return census


@pytest.mark.parametrize("loss", ["sort", "sort-sq", "squint", "role-bce", "bce"])
def test_training_step_on_meta_moves_nothing_between_host_and_device(loss):
    """The trainer's step (forward, closed-form Grad-CAM, fused loss, backward, clipping,
    Adamax as the trainer builds it: its step counter stays on the host, which is no
    device read)."""
    census = _step_census(loss, "meta", capturable=False)
    assert census.transfers == []


@pytest.mark.parametrize("loss", ["sort", "bce"])
def test_decoder_vlm_step_on_meta_moves_nothing_between_host_and_device(loss):
    """The same for the LLaVA-style decoder (shared image prefix, closed-form Grad-CAM through
    the final norm and the answer rows of the LM head)."""
    census = _step_census(loss, "meta", capturable=False, model_kind="llava")
    assert census.transfers == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable optimizers need a GPU")
def test_capturable_step_on_gpu_moves_nothing():
    census = _step_census("sort", "cuda", capturable=True)
    assert census.transfers == []


def test_census_sees_host_device_traffic():
    """The guard guards: a batch moved inside the census, a value read back, an operator
    mixing host and device tensors and the LSTM packing found from device lengths are all
    counted."""
    model, batch, _ = _setup("sort", "meta")
    with OpCensus() as census:
        moved = batch.to("meta")
    # one copy per tensor of the batch, nothing else (the validated layout is not copied)
    assert len(census.transfers) == len([v for v in vars(batch).values()
                                         if isinstance(v, torch.Tensor)])
    with OpCensus() as census, pytest.raises(RuntimeError, match="meta"):
        moved.offsets[-1].item()
    assert [t.op for t in census.transfers] == ["aten._local_scalar_dense.default"]
    with OpCensus() as census:
        torch.zeros(3, device="meta").index_select(0, torch.tensor([0, 1]))
    assert len(census.transfers) == 1
    bare = moved.replace(question_tokens=moved.question_tokens,
                         question_lengths=moved.question_lengths)  # no host-side packing
    with OpCensus() as census, pytest.raises((RuntimeError, NotImplementedError)):
        model(bare)
    assert census.transfers
