"""Data sets, the resumable data order and the model configuration of a run."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..data import Group, IntrospectDataset, SyntheticIntrospect, Vocab, collate_groups
from ..errors import CLIError
from ..models import LlavaVQAConfig, PythiaConfig
from ..models.llava import check_llava_config, load_hf_config
from .config import DataConfig, ModelConfig, require_all

__all__ = ["Datasets", "DataOrder", "StepBatchSampler", "make_loader", "load_train_data",
           "load_val_data", "model_config", "check_model_flags"]

TRAIN_FILES = ("introspect", "vqa_questions", "vqa_annotations", "features")
VAL_FILES = ("val_introspect", "val_vqa_questions", "val_vqa_annotations", "val_features")


@dataclass
class Datasets:
    """Training groups (``None`` for the evaluator), validation groups, the question and answer
    vocabularies, the region feature size and ``source``: how to rebuild the validation data
    (stored in checkpoints so the evaluator finds it again)."""

    train: Optional[Sequence[Group]]
    val: Sequence[Group]
    vocab: Vocab
    answer_vocab: Vocab
    feature_dim: int
    source: Dict[str, Any]


def _introspect(paths: Sequence[str], vocab: Optional[Vocab], answer_vocab: Optional[Vocab]
                ) -> IntrospectDataset:
    try:
        return IntrospectDataset(*paths, answer_vocab=answer_vocab, question_vocab=vocab)
    except (OSError, ValueError) as e:
        raise CLIError(str(e).splitlines()[0]) from None


@lru_cache(maxsize=4)
def synthetic_split(seed: int, split: str, num_groups: int, design: str) -> SyntheticIntrospect:
    """A split of the synthetic benchmark, built once per process (deterministic, and read only
    downstream): a process running many short runs, as the Table 1 protocol's workers do, saves
    the seconds of generating it each time."""
    return SyntheticIntrospect(seed=seed, split=split, num_groups=num_groups, design=design)


def _val_data(source: Dict[str, Any], vocab: Optional[Vocab], answer_vocab: Optional[Vocab]
              ) -> Sequence[Group]:
    if source["kind"] == "synthetic":
        val = synthetic_split(source["seed"], source.get("split", "val"), source["groups"],
                              source.get("design", "v1"))
        if vocab is not None and (val.vocab != vocab or val.answer_vocab != answer_vocab):
            raise CLIError("the synthetic benchmark's vocabulary differs from the checkpoint's")
        return val
    return _introspect([source[k] for k in VAL_FILES], vocab, answer_vocab)


def _check_feature_dim(val: Sequence[Group], source: Dict[str, Any], expected: int,
                       expected_from: str) -> None:
    """Raises :class:`CLIError` if real validation data's region features are not
    ``expected``-d (the width of ``expected_from``)."""
    if isinstance(val, IntrospectDataset) and val.feature_dim != expected:
        raise CLIError(f"{source['val_features']}: {val.feature_dim}-d region features, but "
                       f"{expected_from} {expected}-d")


def load_train_data(args: DataConfig) -> Datasets:
    """Training and validation groups from the data section of a
    :class:`~sort_fast.training.TrainConfig` (or the flags of ``sort_fast.train``, which have
    the same names): the embedded synthetic benchmark, or real VQA-Introspect data when the
    data files are given."""
    real_train = require_all(args, TRAIN_FILES)
    real_val = require_all(args, VAL_FILES)
    if real_train != real_val:
        raise CLIError("give both the training files (--introspect ...) and the validation "
                       "files (--val-introspect ...), or neither (synthetic benchmark)")
    if not real_train:
        train = synthetic_split(args.synthetic_seed, "train", args.synthetic_train_groups,
                                args.synthetic_design)
        source = {"kind": "synthetic", "seed": args.synthetic_seed,
                  "groups": args.synthetic_val_groups, "design": args.synthetic_design}
        return Datasets(train, _val_data(source, None, None), train.vocab, train.answer_vocab,
                        train.feature_dim, source)
    train = _introspect([getattr(args, k) for k in TRAIN_FILES], None, None)
    source = {"kind": "introspect", **{k: getattr(args, k) for k in VAL_FILES}}
    val = _val_data(source, train.vocab, train.answer_vocab)
    _check_feature_dim(val, source, train.feature_dim,
                       f"the training features {args.features} are")
    return Datasets(train, val, train.vocab, train.answer_vocab, train.feature_dim, source)


def load_val_data(args: Any, stored: Dict[str, Any], vocab: Vocab,
                  answer_vocab: Vocab, feature_dim: int) -> Datasets:
    """Validation groups for ``sort_fast.evaluate``: the flags given (``args``, the
    evaluator's parsed flags), else the source stored in the checkpoint (``stored``).
    Vocabularies come from the checkpoint."""
    if require_all(args, VAL_FILES):
        source = {"kind": "introspect", **{k: getattr(args, k) for k in VAL_FILES}}
    elif stored["kind"] == "synthetic":
        source = dict(stored)
        if args.synthetic_seed is not None:
            source["seed"] = args.synthetic_seed
        if args.synthetic_val_groups is not None:
            source["groups"] = args.synthetic_val_groups
        if args.synthetic_split is not None:
            source["split"] = args.synthetic_split
    else:
        source = dict(stored)
    val = _val_data(source, vocab, answer_vocab)
    _check_feature_dim(val, source, feature_dim, "the checkpoint's model takes")
    return Datasets(None, val, vocab, answer_vocab, feature_dim, source)


def model_config(args: ModelConfig, data: Datasets) -> Union[PythiaConfig, LlavaVQAConfig]:
    """The model the model section of a :class:`~sort_fast.training.TrainConfig` (or the flags)
    describes, sized for ``data``: a small Pythia from ``--hidden-dim``/``--joint-dim``/
    ``--dropout``, with ``--image-glimpses`` and ``--input-ablation``; with ``--model llava`` a
    LLaVA-style decoder of ``--decoder-layers`` layers ``--hidden-dim`` wide, or the
    configuration of ``--hf-model``."""
    if args.model == "llava":
        return _llava_config(args, data)
    h, j = args.hidden_dim, args.joint_dim
    return PythiaConfig(
        vocab_size=len(data.vocab), num_answers=len(data.answer_vocab),
        feature_dim=data.feature_dim, embed_dim=min(64, h), text_hidden=h,
        text_attention_hidden=max(1, h // 2), text_glimpses=2, attention_hidden=h, joint_dim=j,
        classifier_text_hidden=h, classifier_image_hidden=j, classifier_dropout=args.dropout,
        joint_dropout=args.dropout, image_glimpses=args.image_glimpses,
        input_ablation=args.input_ablation)


def check_model_flags(args: ModelConfig) -> None:
    """Flag combinations the model section cannot have, a :class:`CLIError` (checked before
    anything is loaded, ``--init`` or not)."""
    if args.model != "llava":
        if args.hf_model is not None or args.lora or args.gradcam_layer != -1:
            raise CLIError("--hf-model, --lora and --gradcam-layer are for --model llava")
        return
    if args.hf_model is not None and args.init is not None:
        raise CLIError("give --hf-model or --init, not both")
    if args.input_ablation != "none" or args.image_glimpses != 1:
        raise CLIError("--input-ablation and --image-glimpses are for --model pythia")
    if args.hidden_dim % args.decoder_heads:
        raise CLIError(f"--hidden-dim {args.hidden_dim} is not a multiple of --decoder-heads "
                       f"{args.decoder_heads}")


def _llava_config(args: ModelConfig, data: Datasets) -> LlavaVQAConfig:
    heads = args.decoder_heads
    kv_heads = heads // 2 if heads % 2 == 0 else heads
    hf_config = None
    if args.hf_model is not None:
        try:
            hf_config = load_hf_config(args.hf_model)
        except ValueError as e:
            raise CLIError(f"--hf-model {e}") from None
    config = LlavaVQAConfig(
        vocab_size=len(data.vocab), num_answers=len(data.answer_vocab),
        feature_dim=data.feature_dim, hidden_size=args.hidden_dim,
        intermediate_size=args.joint_dim, num_layers=args.decoder_layers,
        num_heads=args.decoder_heads, num_kv_heads=kv_heads,
        attention_dropout=args.dropout, gradcam_layer=args.gradcam_layer, lora_rank=args.lora,
        lora_alpha=args.lora_alpha, hf_config=hf_config)
    try:
        check_llava_config(config)
    except ValueError as e:
        raise CLIError(f"--hf-model {args.hf_model}: {e}" if hf_config else str(e)) from None
    return config


class DataOrder:
    """Which training groups each step uses, as a pure function of the step.

    Epoch ``e`` visits the groups in the permutation drawn by a generator seeded with
    ``(seed, e)``; step ``s`` is position ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch`` and takes ``batch_groups`` consecutive groups of it (the last
    incomplete batch of an epoch is dropped). Resuming needs only the step; :meth:`state`
    records it with the sizes it depends on, and :meth:`check` rejects a different setup.
    """

    def __init__(self, num_groups: int, batch_groups: int, seed: int) -> None:
        self.num_groups, self.seed = num_groups, seed
        self.batch_groups = min(batch_groups, num_groups)
        self.steps_per_epoch = num_groups // self.batch_groups
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_groups, generator=gen)
        return self._perm

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> List[int]:
        """Group indices of ``step`` for process ``rank`` of ``world_size`` (disjoint shards)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        batch = self._permutation(epoch)[pos * self.batch_groups:(pos + 1) * self.batch_groups]
        return batch[rank::world_size].tolist()

    def state(self, step: int) -> Dict[str, int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "position": pos, "num_groups": self.num_groups,
                "batch_groups": self.batch_groups, "seed": self.seed}

    def check(self, state: Dict[str, int]) -> None:
        """Raises :class:`CLIError` if a checkpoint's data order ``state`` is not this one's."""
        for key in ("num_groups", "batch_groups", "seed"):
            if state[key] != getattr(self, key):
                raise CLIError(f"cannot resume: the checkpoint's data order has {key}="
                               f"{state[key]}, this run {getattr(self, key)}")


class StepBatchSampler(torch.utils.data.Sampler):
    """The group indices of steps ``start .. stop-1`` for process ``rank`` of ``world_size``
    (:meth:`DataOrder.indices`), as a ``DataLoader`` ``batch_sampler``: the batches are a pure
    function of the step, so a resumed run reads exactly the batches an uninterrupted one
    would, whatever the number of loader workers."""

    def __init__(self, order: DataOrder, start: int, stop: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.order, self.start, self.stop = order, start, stop
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start, self.stop):
            yield self.order.indices(step, self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def make_loader(groups: Sequence[Group], sampler: StepBatchSampler, *, workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of packed batches (:func:`~sort_fast.data.collate_groups`, which also
    validates each batch on the CPU): ``workers`` processes read and pack the groups ahead of
    the training step (real data reads its region features there)."""
    # a generator of its own: starting the loader must not draw from the global RNG, whose
    # state a resumed run restores (dropout masks stay those of an uninterrupted run)
    return torch.utils.data.DataLoader(
        groups, batch_sampler=sampler, collate_fn=collate_groups, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(0))
