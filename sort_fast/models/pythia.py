"""A Pythia-style VQA model over packed groups (the model the SOrT authors tuned).

question -> embedding -> LSTM -> self-attention pooling (``glimpses`` heads) -> ``q``;
regions -> per-image projection, shared by every question of the image; question-guided
softmax attention over the (masked) regions (``image_glimpses`` heads, concatenated) ->
attended feature ``v``;
``joint = relu_fc(v) * relu_fc(q)`` (the joint embedding, where Grad-CAM vectors are taken);
``scores = BranchSum(text_branch, image_branch)(joint)`` (Pythia's logit classifier).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import PackedSequence

from ..data.group import PackedBatch, lstm_packing
from ..heads import pythia_classifier

__all__ = ["PythiaConfig", "pythia_sizes", "PythiaOutput", "PythiaVQA", "INPUT_ABLATIONS"]


@dataclass
class PythiaConfig:
    """Sizes of :class:`PythiaVQA`; the defaults suit the synthetic benchmark."""

    vocab_size: int
    num_answers: int
    feature_dim: int = 64
    embed_dim: int = 64
    text_hidden: int = 128
    text_attention_hidden: int = 64
    text_glimpses: int = 2
    attention_hidden: int = 128
    joint_dim: int = 256
    classifier_text_hidden: int = 128
    classifier_image_hidden: int = 256
    classifier_dropout: float = 0.1
    joint_dropout: float = 0.1
    image_glimpses: int = 1
    # "none", or a shortcut probe: "text-only" (every region feature zeroed) or "image-only"
    # (every question replaced by one constant token)
    input_ablation: str = "none"

    def build(self) -> "PythiaVQA":
        """The model these sizes describe (:class:`~sort_fast.models.ModelSpec`)."""
        return PythiaVQA(self)


INPUT_ABLATIONS = ("none", "text-only", "image-only")


def pythia_sizes(vocab_size: int, num_answers: int = 3129) -> PythiaConfig:
    """Pythia v0.1's VQAv2 sizes: 2048-d regions, 300-d GloVe, 1024-d LSTM with 2 glimpses,
    5000-d attention and joint spaces, logit classifier with 300 (text) / 5000 (image) hidden
    units, no dropout."""
    return PythiaConfig(
        vocab_size=vocab_size, num_answers=num_answers, feature_dim=2048, embed_dim=300,
        text_hidden=1024, text_attention_hidden=512, text_glimpses=2, attention_hidden=5000,
        joint_dim=5000, classifier_text_hidden=300, classifier_image_hidden=5000,
        classifier_dropout=0.0, joint_dropout=0.0)


def relu_fc(in_dim: int, out_dim: int) -> nn.Sequential:
    """Pythia's ``ReLUWithWeightNormFC``: weight-normalised Linear then ReLU."""
    return nn.Sequential(weight_norm(nn.Linear(in_dim, out_dim), dim=None), nn.ReLU())


@dataclass
class PythiaOutput:
    """``scores [T, A]`` logits (``scores == model.classifier(joint)``; ``None`` when the
    forward was asked not to compute them), ``joint [T, D]``, ``attention`` region weights (0 on
    padded regions): ``[T, R]`` with one image glimpse, ``[T, G, R]`` with ``G > 1``."""

    scores: Optional[torch.Tensor]
    joint: torch.Tensor
    attention: torch.Tensor


class QuestionEncoder(nn.Module):
    """``tokens [T, L]``, ``lengths [T]`` -> ``[T, glimpses * hidden]`` (LSTM + self-attention
    pooling over the valid time steps)."""

    def __init__(self, cfg: PythiaConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.text_hidden, batch_first=True)
        self.attention = nn.Sequential(nn.Linear(cfg.text_hidden, cfg.text_attention_hidden),
                                       nn.ReLU(), nn.Linear(cfg.text_attention_hidden,
                                                            cfg.text_glimpses))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor,
                packing: Optional[Tuple[torch.Tensor, List[int]]] = None,
                static_shape: bool = False) -> torch.Tensor:
        """``packing``: ``(rows [P], batch_sizes)`` of
        :func:`~sort_fast.data.group.lstm_packing` for these ``lengths`` and the width ``L`` of
        ``tokens`` (``rows`` on the tokens' device), when the caller has it; else it is found
        from ``lengths`` read back to the host (a device sync). ``static_shape`` (and inside
        ``torch.compile``, which cannot trace sequence packing): the LSTM runs over all ``L``
        steps instead. It runs forwards in time, so its outputs at the valid steps (the only
        ones used below) do not depend on the padding after them: the same values, up to
        float rounding, with shapes that do not depend on the lengths."""
        embedded = self.embedding(tokens)
        if static_shape or torch.compiler.is_compiling():
            hidden = self.lstm(embedded)[0]                                   # [T, L, H]
        else:
            if packing is None:
                rows, batch_sizes = lstm_packing(lengths.tolist(), tokens.shape[1])
                packing = torch.tensor(rows, device=tokens.device), batch_sizes
            hidden = self._packed_lstm(embedded, *packing)                   # [T, L, H]
        valid = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
        logits = self.attention(hidden).masked_fill(~valid[:, :, None], float("-inf"))
        weights = logits.softmax(dim=1)                                      # [T, L, G]
        return torch.einsum("tlg,tlh->tgh", weights, hidden).flatten(1)

    def _packed_lstm(self, embedded: torch.Tensor, rows: torch.Tensor,
                     batch_sizes: List[int]) -> torch.Tensor:
        """The LSTM over the valid steps of ``embedded [B, L, E]``, 0 at the padded steps
        ``[B, L, H]``: the packed sequence and the LSTM call of ``pack_padded_sequence`` /
        ``pad_packed_sequence`` (same values, same bits), with their index tensors taken from
        the host-side packing instead of copied between host and device."""
        flat = embedded.flatten(0, 1)                                        # [B * L, E]
        packed = PackedSequence(flat.index_select(0, rows), torch.tensor(batch_sizes))
        out = self.lstm(packed)[0].data                                      # [P, H]
        hidden = out.new_zeros(flat.shape[0], out.shape[1]).index_copy_(0, rows, out)
        return hidden.view(*embedded.shape[:2], out.shape[1])


def _distinct_questions(tokens: torch.Tensor, lengths: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``first [U]``: the first row of each distinct ``(tokens, length)`` question, and
    ``inverse [T]``: the distinct question of every row (``rows == first[inverse]`` in
    content)."""
    # dense rank of each row in lexicographic order, one column at a time (the rank so far
    # stays below T, so rank * base + column fits int64); cheaper than unique(dim=0)
    base = int(tokens.max()) + 1 if tokens.numel() else 1
    inverse = lengths
    for column in tokens.unbind(1):
        inverse = torch.unique(inverse * base + column, return_inverse=True)[1]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    first = torch.full((int(inverse.max()) + 1,), tokens.shape[0], dtype=rows.dtype,
                       device=rows.device).scatter_reduce_(0, inverse, rows, "amin")
    return first, inverse


def _slots(image_index: torch.Tensor, num_images: int) -> Tuple[torch.Tensor, int]:
    """Position of every question among the questions of its image ``[T]`` and the largest
    number of questions on one image (lays the questions out as ``[I, Q, ...]``)."""
    order = torch.argsort(image_index, stable=True)
    counts = torch.bincount(image_index, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(image_index)
    slot[order] = torch.arange(image_index.numel(), device=image_index.device) - starts[
        image_index[order]]
    return slot, int(counts.max())


class PythiaVQA(nn.Module):
    """Pythia-style VQA over a :class:`~sort_fast.data.PackedBatch`, the first
    :class:`~sort_fast.models.VQAModel`.

    The image side (``image_projection`` of the regions) runs once per image of the batch, not
    once per question; questions reach their image's regions through ``batch.image_index``
    with batched matmuls, so nothing of size ``[T, R, F]`` is materialised. Likewise the
    question side (encoder and the two question projections) runs once per distinct question
    text of the batch (a question asked about several images, or in several groups, is
    encoded once; ``share_questions=False`` encodes every row).
    ``classifier`` is a :class:`~sort_fast.heads.BranchSum` of two
    ``Sequential(Linear(wn), ReLU, Dropout, Linear)`` branches over ``joint``.
    Deviation from Pythia: the attention scorer is linear in the image and question
    projections (no dropout between them), which is what lets it factor per image.
    """

    def __init__(self, config: PythiaConfig) -> None:
        super().__init__()
        self.config = cfg = config
        if cfg.image_glimpses < 1:
            raise ValueError(f"image_glimpses must be >= 1, got {cfg.image_glimpses}")
        if cfg.input_ablation not in INPUT_ABLATIONS:
            raise ValueError(f"input_ablation must be one of {INPUT_ABLATIONS}, got "
                             f"{cfg.input_ablation!r}")
        q_dim = cfg.text_glimpses * cfg.text_hidden
        self.question_encoder = QuestionEncoder(cfg)
        self.image_projection = relu_fc(cfg.feature_dim, cfg.attention_hidden)
        self.question_projection = relu_fc(q_dim, cfg.attention_hidden)
        self.attention_scorer = nn.Linear(cfg.attention_hidden, cfg.image_glimpses)
        self.image_fusion = relu_fc(cfg.image_glimpses * cfg.feature_dim, cfg.joint_dim)
        self.question_fusion = relu_fc(q_dim, cfg.joint_dim)
        self.joint_dropout = nn.Dropout(cfg.joint_dropout)
        self.classifier = pythia_classifier(cfg.joint_dim, cfg.classifier_text_hidden,
                                            cfg.classifier_image_hidden, cfg.num_answers,
                                            dropout=cfg.classifier_dropout)

    def forward(self, batch: PackedBatch, *, scores: bool = True,
                share_questions: bool = True) -> PythiaOutput:
        """``scores=False`` skips the classifier (``out.scores`` is ``None``): for callers that
        run it themselves, e.g. :func:`~sort_fast.ops.head_gradcam.head_gradcam` on
        ``out.joint``. ``share_questions=False`` runs the question side on every row instead of
        once per distinct question (same values; for comparisons)."""
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"PythiaVQA takes a PackedBatch, got {type(batch).__name__}")
        feats, mask, index = batch.image_features, batch.image_mask, batch.image_index
        if feats.shape[-1] != self.config.feature_dim:
            raise ValueError(f"image features have {feats.shape[-1]} dims, the model expects "
                             f"{self.config.feature_dim}")
        tokens, lengths = batch.question_tokens, batch.question_lengths
        if self.config.input_ablation == "text-only":
            feats = torch.zeros_like(feats)
        elif self.config.input_ablation == "image-only":
            tokens, lengths = torch.ones_like(tokens[:, :1]), torch.ones_like(lengths)
            share_questions = False  # the batch's distinct questions are those of the text
        packing = None
        if share_questions:
            if batch.question_first is not None:  # found where the batch was built
                first, inverse = batch.question_first, batch.question_inverse
                if batch.lstm_rows is not None:  # the encoder ignores it for static shapes
                    packing = batch.lstm_rows, batch.lstm_batch_sizes
            else:
                first, inverse = _distinct_questions(tokens, lengths)
            tokens, lengths = tokens[first], lengths[first]
        q = self.question_encoder(tokens, lengths, packing, batch.static_shape)    # [U, Dq]
        # one attention vector per glimpse: the scorer is linear, so it folds into the
        # question side
        qp = self.question_projection(q)[:, None] * self.attention_scorer.weight   # [U, G, H]
        qf = self.question_fusion(q)                                               # [U, D]
        if share_questions:
            qp, qf = qp[inverse], qf[inverse]                                      # [T, ...]
        img = self.image_projection(feats)                                         # [I, R, H]
        if batch.image_slot is not None:
            slot, per_image = batch.image_slot, batch.max_per_image
        else:
            slot, per_image = _slots(index, feats.shape[0])
        num_images, regions = feats.shape[0], feats.shape[1]
        glimpses = qp.shape[1]
        q_grid = qp.new_zeros(num_images, per_image, glimpses, qp.shape[2])
        q_grid[index, slot] = qp
        logits = torch.bmm(q_grid.flatten(1, 2), img.transpose(1, 2)).view(
            num_images, per_image, glimpses, regions)[index, slot]                 # [T, G, R]
        logits = logits + self.attention_scorer.bias[:, None]
        attention = logits.masked_fill(~mask[index][:, None], float("-inf")).softmax(dim=2)
        if glimpses == 1:  # [T, R], and the tensor the rest is computed from (region Grad-CAM)
            attention = attention.squeeze(1)
        a_grid = attention.new_zeros(num_images, per_image, glimpses, regions)
        a_grid[index, slot] = attention.view(-1, glimpses, regions)
        attended = torch.bmm(a_grid.flatten(1, 2), feats).view(
            num_images, per_image, glimpses * feats.shape[2])[index, slot]         # [T, G*F]
        joint = self.joint_dropout(self.image_fusion(attended) * qf)
        return PythiaOutput(scores=self.classifier(joint) if scores else None, joint=joint,
                            attention=attention)

    def region_gradcam(self, batch: PackedBatch, classes: Optional[torch.Tensor] = None,
                       *, create_graph: bool = False) -> torch.Tensor:
        """Region-level Grad-CAM ``[T, R]``: ``attention * d y_c / d attention`` (the gradient
        of the class score w.r.t. each attended region, times its weight, summed over
        features, and over glimpses), 0 on padded regions. ``classes [T]`` defaults to
        ``batch.classes``."""
        classes = batch.classes if classes is None else classes
        with torch.enable_grad():
            out = self(batch)
            y = out.scores.gather(1, classes[:, None]).sum()
            (grad,) = torch.autograd.grad(y, out.attention, create_graph=create_graph)
        cam = grad * out.attention
        if cam.dim() == 3:  # [T, G, R]
            cam = cam.sum(1)
        return cam if create_graph else cam.detach()
