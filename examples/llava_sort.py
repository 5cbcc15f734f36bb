"""SOrT with LoRA on a LLaVA-style decoder VLM from a save_pretrained folder, with sort_fast.

    pip install "sort_fast[hf]" && python examples/llava_sort.py [--checkpoint DIR]

Without ``--checkpoint`` a small random ``transformers.LlavaForConditionalGeneration`` is
saved to a temporary folder first and stands in for yours (nothing is downloaded). The
folder's model becomes a :class:`sort_fast.models.LlavaVQA`: every question is one sequence of
its image's region tokens (the synthetic benchmark's region features through the projector),
its question tokens and an answer prompt; the answer is one token. The Grad-CAM vector is taken
at the last decoder layer's hidden state at the answer prompt, in closed form through the final
norm and the answer rows of the LM head (``head_gradcam``, no double backward). Only LoRA
adapters train; they are saved in ``peft``'s format at the end (docs/vlm.md).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

import sort_fast
from sort_fast.data import SyntheticIntrospect, collate_groups
from sort_fast.models import LlavaVQA, LlavaVQAConfig
from sort_fast.models.llava import load_hf_config


def stand_in_checkpoint(folder: Path, data: SyntheticIntrospect) -> Path:
    """A random Llava that fits ``data``, saved with ``save_pretrained`` into ``folder``."""
    config = LlavaVQAConfig(vocab_size=len(data.vocab), num_answers=len(data.answer_vocab),
                            feature_dim=data.feature_dim, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2)
    config.build().llava.save_pretrained(folder)
    return folder


def ranking(model: LlavaVQA, batch) -> Dict[str, float]:
    """The ranking metrics of the Grad-CAM cosines of ``batch`` (docs/metrics.md)."""
    with torch.enable_grad():
        out = model(batch, scores=False)
        _, grad = sort_fast.head_gradcam(model.classifier, out.joint, batch.classes)
    similarity = sort_fast.gradcam_similarity(grad.detach(), out.joint.detach(), batch.offsets)
    metrics = sort_fast.metrics.ranking_metrics_packed(similarity, batch.offsets, batch.num_sub)
    return {k: round(float(v), 4) for k, v in metrics.items()}


def main(steps: int = 30, checkpoint: Optional[str] = None, out: Optional[str] = None,
         seed: int = 0) -> Dict[str, object]:
    """LoRA-tunes ``checkpoint`` (a stand-in when ``None``) with SOrT for ``steps`` steps on 16
    groups of the synthetic benchmark; returns the contrastive losses, the ranking metrics of
    those groups before and after, and the folders the adapters and the merged model were
    saved to (in ``out``, a temporary folder when ``None``)."""
    torch.manual_seed(seed)
    data = SyntheticIntrospect(seed=seed, split="train", num_groups=16)
    out_dir = Path(out or tempfile.mkdtemp(prefix="llava_sort-"))
    folder = Path(checkpoint) if checkpoint else stand_in_checkpoint(out_dir / "base", data)
    config = LlavaVQAConfig(vocab_size=len(data.vocab), num_answers=len(data.answer_vocab),
                            feature_dim=data.feature_dim, hf_config=load_hf_config(str(folder)),
                            lora_rank=8, lora_alpha=16.0)
    model = LlavaVQA(config, pretrained=str(folder))
    criterion = sort_fast.SOrTLoss(margin=0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate_groups([data[i] for i in range(len(data))])
    before = ranking(model.eval(), batch)
    model.train()
    losses: List[float] = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(batch, scores=False)
        scores, grad = sort_fast.head_gradcam(model.classifier, out.joint, batch.classes)
        loss = criterion(scores, batch.targets, grad, out.joint, batch.offsets, batch.num_sub)
        loss.total.backward()            # second-order gradients reach the adapters
        optimizer.step()
        losses.append(float(loss.contrastive.detach()))
    after = ranking(model.eval(), batch)
    saved = model.save_pretrained(str(out_dir))
    return {"losses": losses, "before": before, "after": after, "saved": saved}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a local save_pretrained Llava folder (default: a random stand-in)")
    parser.add_argument("--out", metavar="DIR",
                        help="where the adapters and the merged model go (default: a new "
                             "temporary folder)")
    args = parser.parse_args()
    result = main(args.steps, args.checkpoint, args.out)
    losses = result["losses"]
    print(f"contrastive loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print("ranking of the tuned groups before:", result["before"])
    print("ranking of the tuned groups after: ", result["after"])
    print("saved:", " ".join(result["saved"]))
