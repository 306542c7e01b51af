"""A minimal KV cache with Hugging Face's ``update(k, v, layer_idx)`` contract.

The partitioned layers store only their own (i, j) slice: (b, g/n, s, d/m) keys and
(b, g/n, s, dv/m) values. Hugging Face's ``DynamicCache`` works the same way and can be used
instead.
"""
from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value tensors, concatenated along the sequence dim."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (b, heads, s_new, dim) keys/values; return everything cached for the layer."""
        if layer_idx in self.keys:
            key = torch.cat((self.keys[layer_idx], key), dim=-2)
            value = torch.cat((self.values[layer_idx], value), dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached positions of a layer (0 if empty)."""
        return 0 if layer_idx not in self.keys else self.keys[layer_idx].shape[-2]

    def nbytes(self) -> int:
        """Bytes held by this rank's cache."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))
