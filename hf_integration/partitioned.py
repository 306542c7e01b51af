"""The layer classes ``patch_model`` installs, and how to find them in a patched model.

Example:
    >>> [path for path, _ in partitioned_layers(model)]
    ['model.layers.0.self_attn', 'model.layers.0.mlp', ...]
"""
from __future__ import annotations

from torch import nn

from hf_integration.modules import HFTwoLevelAttention, HFTwoLevelMLP
from hf_integration.moe import HFTwoLevelExperts
from hf_integration.vocab_parallel import HFVocabEmbedding, HFVocabHead

PARTITIONED = (HFTwoLevelAttention, HFTwoLevelMLP, HFTwoLevelExperts, HFVocabEmbedding, HFVocabHead)
"""The layer classes patch_model installs."""


def partitioned_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every partitioned layer, in module order."""
    return [(p, mod) for p, mod in model.named_modules() if isinstance(mod, PARTITIONED)]


def owner_path(path: str, layer: nn.Module) -> str:
    """Path of the HF module a layer replaced (its TensorMap keys are relative to it)."""
    return path[: -len(layer.target) - 1] if layer.target else path
