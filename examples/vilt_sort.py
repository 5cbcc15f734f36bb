"""SOrT fine-tuning of a Hugging Face ViLT VQA model with sort_fast, in a few lines.

    pip install "sort_fast[hf]" && python examples/vilt_sort.py

A small random-initialised ``transformers.ViltForQuestionAnswering`` (no download) on packed
groups of synthetic pixels and tokens: each group is one image with a reasoning question, its
sub-questions and irrelevant questions (docs/ops.md, the packed layout). The Grad-CAM vectors
come from one of two places:

- ``pooled``: the pooled multimodal vector that ViLT's answer head (Linear -> LayerNorm ->
  GELU -> Linear) reads, with the closed form ``head_gradcam`` (no double backward);
- ``patches``: the image-patch tokens entering the last layer (its ``layernorm_before``
  output; the tokens it emits reach the answer only through the pooled first token),
  flattened, through ``GradCAM`` hooks.

``SOrTLoss`` is the drop-in total loss; the ranking metrics of the Grad-CAM cosines come last.
"""
from __future__ import annotations

import argparse
from typing import Dict, List

import torch
from transformers import ViltConfig, ViltForQuestionAnswering

import sort_fast

TEXT_LEN, IMAGE, ANSWERS = 8, 64, 10


def make_batch(groups: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """``groups`` groups of 1 reasoning + 1-3 sub + 2-4 irrelevant questions on one image."""
    num_sub = torch.randint(1, 4, (groups,), generator=gen)
    sizes = 1 + num_sub + torch.randint(2, 5, (groups,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    rows = int(offsets[-1])
    images = torch.rand(groups, 3, IMAGE, IMAGE, generator=gen)
    targets = torch.zeros(rows, ANSWERS)
    targets[torch.arange(rows), torch.randint(0, ANSWERS, (rows,), generator=gen)] = 1.0
    return dict(offsets=offsets, num_sub=num_sub, targets=targets,
                input_ids=torch.randint(1, 100, (rows, TEXT_LEN), generator=gen),
                pixel_values=images.repeat_interleave(sizes, 0))


def gradcam(model: ViltForQuestionAnswering, batch: Dict[str, torch.Tensor], where: str):
    """Scores ``[T, A]`` and the Grad-CAM pair ``(grad, act)`` (``[T, D]``, differentiable)."""
    classes = batch["targets"].argmax(1)
    inputs = dict(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    if where == "pooled":
        pooled = model.vilt(**inputs).pooler_output
        scores, grad = sort_fast.head_gradcam(model.classifier, pooled, classes)
        return scores, grad, pooled
    last = f"vilt.encoder.layer.{model.config.num_hidden_layers - 1}.layernorm_before"
    with sort_fast.GradCAM(model, last) as cam:                  # [T, text + 1 + patches, D]
        scores = model(**inputs).logits
        cam.vectors(scores, classes)
        patches = slice(TEXT_LEN + 1, None)                      # after the image [CLS] token
        return scores, cam.gradient[:, patches].flatten(1), cam.activation[:, patches].flatten(1)


def main(steps: int = 5, where: str = "pooled", seed: int = 0) -> Dict[str, object]:
    """Fine-tunes for ``steps`` steps; returns the losses, the final Grad-CAM cosines and
    their ranking metrics."""
    torch.manual_seed(seed)
    config = ViltConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=ANSWERS, image_size=IMAGE,
                        patch_size=16)
    model = ViltForQuestionAnswering(config)
    batch = make_batch(8, torch.Generator().manual_seed(seed))
    criterion = sort_fast.SOrTLoss(margin=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses: List[float] = []
    for _ in range(steps):
        optimizer.zero_grad()
        scores, grad, act = gradcam(model, batch, where)
        loss = criterion(scores, batch["targets"], grad, act, batch["offsets"], batch["num_sub"])
        loss.total.backward()
        optimizer.step()
        losses.append(float(loss.total.detach()))
    model.eval()
    _, grad, act = gradcam(model, batch, where)
    similarity = sort_fast.gradcam_similarity(grad.detach(), act.detach(), batch["offsets"])
    metrics = sort_fast.metrics.ranking_metrics_packed(similarity, batch["offsets"],
                                                       batch["num_sub"])
    return {"losses": losses, "similarity": similarity, "metrics": metrics}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default: 5)")
    parser.add_argument("--where", choices=("pooled", "patches"), default="pooled",
                        help="Grad-CAM layer: the pooled vector (closed form) or the last "
                             "layer's patch tokens (hooks); default: pooled")
    args = parser.parse_args()
    result = main(args.steps, args.where)
    print("losses:", " ".join(f"{x:.4f}" for x in result["losses"]))
    print("ranking:", {k: round(float(v), 4) for k, v in result["metrics"].items()})
