"""The trainer's explicit state (docs/training.md, "Training state"): ``TrainState``'s
``state_dict``/``load_state_dict`` round trip continues a run bit for bit, ``every_n_steps``,
and the short loop of ``sort_fast/train.py`` (no function over 80 lines)."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from sort_fast.data import SyntheticIntrospect, collate_groups
from sort_fast.errors import CLIError
from sort_fast.models import PythiaConfig, PythiaVQA
from sort_fast.train import _warmup
from sort_fast.training import Objective, TrainState
from sort_fast.training.data import DataOrder
from sort_fast.training.state import every_n_steps
from sort_fast.training.static_step import make_optimizer, train_step


def _state(ds, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = PythiaVQA(PythiaConfig(len(ds.vocab), ds.num_answers, feature_dim=ds.feature_dim,
                                   embed_dim=8, text_hidden=8, attention_hidden=8,
                                   joint_dim=16, classifier_text_hidden=8,
                                   classifier_image_hidden=8, classifier_dropout=0.0,
                                   joint_dropout=0.0))
    optimizer = make_optimizer(model.parameters(), 3e-3)
    return TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(3)),
                      torch.amp.GradScaler("cpu", enabled=False), DataOrder(len(ds), 8, 0))


def _steps(state: TrainState, ds, count: int) -> None:
    objective = Objective("sort", lambda_reasoning=1.0, lambda_sub=1.0, lambda_irrelevant=0.1,
                          margin=0.0, lambda_attention=1.0, naive=False)
    for _ in range(count):
        batch = collate_groups([ds[i] for i in state.order.indices(state.step)])
        train_step(state.model, batch, objective, state.optimizer, grad_clip=0.25,
                   scaler=state.scaler)
        state.scheduler.step()
        state.step += 1


def test_state_dict_round_trip_continues_bit_for_bit():
    ds = SyntheticIntrospect(seed=0, split="train", num_groups=40)
    straight = _state(ds)
    _steps(straight, ds, 4)
    first = _state(ds)
    _steps(first, ds, 2)
    saved = copy.deepcopy(first.state_dict())
    assert saved["step"] == 2 and saved["data"]["position"] == 2
    resumed = _state(ds, seed=1)  # other initial weights: the checkpoint's replace them
    resumed.model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved)
    assert resumed.step == 2 and resumed.scheduler.last_epoch == 2
    _steps(resumed, ds, 2)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_load_state_dict_refuses_another_data_order():
    ds = SyntheticIntrospect(seed=0, split="train", num_groups=40)
    saved = _state(ds).state_dict()
    saved["data"] = {**saved["data"], "batch_groups": 16}
    with pytest.raises(CLIError, match="data order has batch_groups=16, this run 8"):
        _state(ds).load_state_dict(saved)


def test_older_checkpoint_without_scaler_loads():
    ds = SyntheticIntrospect(seed=0, split="train", num_groups=40)
    saved = _state(ds).state_dict()
    del saved["scaler"]
    state = _state(ds)
    state.load_state_dict(saved)
    assert state.step == 0


@pytest.mark.parametrize("step, n, due", [(3, 3, True), (6, 3, True), (4, 3, False),
                                          (5, 0, False), (0, 0, False), (1, 1, True)])
def test_every_n_steps(step, n, due):
    assert every_n_steps(step, n) is due


def test_train_py_has_no_function_over_80_lines():
    source = (Path(__file__).resolve().parents[1] / "sort_fast" / "train.py").read_text()
    long = [(node.name, node.end_lineno - node.lineno + 1)
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80]
    assert long == []
