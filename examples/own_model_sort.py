"""Add SOrT to your own VQA model: GradCAM hooks on the fusion layer, SOrTLoss, ranking metrics.

    python examples/own_model_sort.py
"""
import torch
from torch import nn

import sort_fast


class TinyVQA(nn.Module):
    """Image regions and a bag-of-words question, fused by an element-wise product."""

    def __init__(self, vocab: int = 50, regions: int = 16, dim: int = 32, answers: int = 8):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(regions * 4, dim), nn.ReLU())
        self.question = nn.EmbeddingBag(vocab, dim)
        self.fusion = nn.Identity()                   # the layer whose Grad-CAM SOrT aligns
        self.classifier = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, answers))

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fusion(self.image(regions) * self.question(tokens)))


def main(steps: int = 20) -> dict:
    torch.manual_seed(0)
    # Packed layout: 6 groups, each a reasoning question, its sub-questions (num_sub), then its
    # irrelevant questions, all about one image; the rows of a group are contiguous.
    sizes, num_sub = torch.tensor([5, 6, 4, 7, 5, 6]), torch.tensor([2, 1, 1, 3, 2, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    rows = int(offsets[-1])
    regions = torch.rand(len(sizes), 16, 4).repeat_interleave(sizes, 0)
    tokens = torch.randint(0, 50, (rows, 6))
    targets = torch.zeros(rows, 8)
    targets[torch.arange(rows), torch.randint(0, 8, (rows,))] = 1.0
    classes = targets.argmax(1)                      # the ground-truth answer of every row

    model = TinyVQA()
    criterion = sort_fast.SOrTLoss(margin=0.2)       # contrastive term + per-role BCE
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with sort_fast.GradCAM(model, "fusion") as cam:
            scores = model(regions, tokens)
            cam.vectors(scores, classes)             # dy_c/dA at the fusion layer, with graph
            loss = criterion(scores, targets, cam, offsets, num_sub)
        loss.total.backward()                        # second-order gradients reach the model
        optimizer.step()
        losses.append(float(loss.contrastive.detach()))

    with sort_fast.GradCAM(model, "fusion") as cam:
        cam.vectors(model(regions, tokens), classes, create_graph=False)
        similarity = sort_fast.gradcam_similarity(cam, offsets)
    return {"contrastive": losses,
            "ranking": sort_fast.metrics.ranking_metrics_packed(similarity, offsets, num_sub)}


if __name__ == "__main__":
    result = main()
    print(f"contrastive loss {result['contrastive'][0]:.4f} -> {result['contrastive'][-1]:.4f}")
    print({k: round(float(v), 3) for k, v in result["ranking"].items()})
