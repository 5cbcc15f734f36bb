"""Data: groups, packed batches, the embedded synthetic benchmark and real-format readers."""
from .features import RegionFeatures, open_region_features, save_region_info
from .group import Group, PackedBatch, collate_groups
from .hat import load_hat_maps, regions_to_map
from .introspect import IntrospectDataset
from .synthetic import SyntheticIntrospect
from .text import (
    PAD,
    UNK,
    Vocab,
    load_word_vectors,
    normalize_answer,
    tokenize,
    vqa_accuracy,
    vqa_soft_scores,
)

__all__ = [
    "Group",
    "PackedBatch",
    "collate_groups",
    "SyntheticIntrospect",
    "IntrospectDataset",
    "RegionFeatures",
    "open_region_features",
    "save_region_info",
    "load_hat_maps",
    "regions_to_map",
    "PAD",
    "UNK",
    "Vocab",
    "load_word_vectors",
    "normalize_answer",
    "tokenize",
    "vqa_accuracy",
    "vqa_soft_scores",
]
