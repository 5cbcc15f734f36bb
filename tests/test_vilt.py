"""SOrT on a Hugging Face ViLT VQA model: the closed-form Grad-CAM of its answer head
(Linear -> LayerNorm -> GELU -> Linear) and the drop-in example (skipped without the [hf]
extra)."""
import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sort_fast  # noqa: E402
from test_head_gradcam import _compare  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "vilt_sort.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("vilt_sort", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_vilt(seed=0):
    torch.manual_seed(seed)
    config = transformers.ViltConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=10, image_size=64,
                                     patch_size=16)
    return transformers.ViltForQuestionAnswering(config)


def test_vilt_head_closed_form_matches_double_backward():
    """float64, values and second-order gradients of every head parameter and the input."""
    head = small_vilt().classifier
    _compare(head, (23, 64, 128, 10), times_input=True)
    _compare(head, (23, 64, 128, 10), times_input=False)


def test_pooled_closed_form_equals_hooks(example):
    """Grad-CAM of the pooled vector: head_gradcam on model.classifier equals GradCAM hooks on
    the pooler with autograd (float32)."""
    model = small_vilt(1).eval()
    batch = example.make_batch(3, torch.Generator().manual_seed(1))
    scores, grad, act = example.gradcam(model, batch, "pooled")
    with sort_fast.GradCAM(model, "vilt.pooler") as cam:
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        G = cam.vectors(logits, batch["targets"].argmax(1))
    torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad * act, G, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("where", ["pooled", "patches"])
def test_example_fine_tunes(example, where):
    result = example.main(steps=3, where=where)
    losses = result["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    metrics = result["metrics"]
    assert metrics["groups"] == 8 and 0 <= metrics["mp1"] <= 1
    # the Grad-CAM vectors are not zero: the candidates' cosines differ (all-zero vectors
    # would tie every cosine at 0)
    candidates = result["similarity"][result["similarity"] != 1.0]
    assert candidates.numel() > 20 and float(candidates.std()) > 1e-3
