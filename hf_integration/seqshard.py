"""Hugging Face side of the sequence-sharded strategies: a preallocated ``Cache`` for ``generate()``
in both KV layouts, and the patched attention layer that routes to seq_rows / kv_shard.

* :class:`TwoLevelCache` - a ``transformers.Cache`` whose layers (:class:`PreallocatedLayer`) keep
  :class:`~ds_twolevel.layers.seq_cache.GrowingKV` buffers: an append costs O(new tokens) instead of
  DynamicCache's ``torch.cat`` of the whole cache. ``layout="segments"`` is a drop-in for every
  existing strategy (this rank's (b, g/n, s, d/m) slice); ``layout="kv_shard"`` holds this segment
  rank's positions at full d and makes the layers decode with kv_shard. ``get_seq_length`` /
  ``get_mask_sizes`` report the global length in both, so HF's masks and positions are unchanged.
  Pass it to ``generate(..., cache=TwoLevelCache.for_model(model, layout=...))``.
* :class:`HFSeqShardAttention` / :func:`use_seqshard` - the patched model's attention layers take the
  strategy ``"seq_rows"`` (registry entries :mod:`ds_twolevel.strategies.seq_rows` and
  :mod:`~ds_twolevel.strategies.kv_shard`; a kv_shard cache makes them decode with kv_shard).

Example:
    >>> patch_model(model, mesh); use_seqshard(model)
    >>> out = model.generate(ids, max_new_tokens=16, cache=TwoLevelCache.for_model(model, layout="kv_shard"))
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ds_twolevel.layers.seq_cache import DEFAULT_CHUNK, GrowingKV, PositionShardedKV
from ds_twolevel.strategies.base import CACHE_LAYOUTS

from hf_integration.modules import HFTwoLevelAttention


class PreallocatedLayer(CacheLayerMixin):
    """One layer of :class:`TwoLevelCache`: a HF cache layer over a preallocated store."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, store: GrowingKV) -> None:
        super().__init__()
        self.store = store

    # HF code reads layer.keys / layer.values: live views of the filled part
    @property
    def keys(self) -> torch.Tensor | None:
        return self.store.keys

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("TwoLevelCache layers are written through update() / the strategies")

    @property
    def values(self) -> torch.Tensor | None:
        return self.store.values

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("TwoLevelCache layers are written through update() / the strategies")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this rank's (b, heads, t, dim) slices ("segments" layout); return everything cached."""
        if isinstance(self.store, PositionShardedKV):
            raise ValueError("a kv_shard TwoLevelCache is written by the seq_rows / kv_shard strategies; patch the "
                             "model's attention with use_seqshard(model), or use layout='segments'")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.store.append(key_states, value_states)

    def get_seq_length(self) -> int:
        """Positions of the whole sequence (global, also in the kv_shard layout)."""
        return getattr(self.store, "global_length", self.store.length)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions (HF's convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove:
            self.store.crop(self.get_seq_length() + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = torch.as_tensor(indices)
        self.store.select_batch(index.nonzero().flatten() if index.dtype == torch.bool else index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store.repeat_batch(repeats)

    def reset(self) -> None:
        self.store.reset()
        self.is_initialized = False

    def offload(self) -> None:
        self.store.to("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self.store.to(self.device)


class TwoLevelCache(Cache):
    """Preallocated Hugging Face cache for partitioned models, in the "segments" or "kv_shard" layout.

    Args:
        layout: "segments" (this rank's (b, g/n, s, d/m) slice, every strategy) or "kv_shard"
            (this segment rank's positions at full d; decoding runs kv_shard).
        chunk: capacity grows to at least the next multiple of ``chunk`` positions (and doubles).
        capacity: positions to allocate on the first append (e.g. prompt + max_new_tokens).

    Example:
        >>> cache = TwoLevelCache.for_model(model, layout="kv_shard", capacity=ids.shape[1] + 64)
        >>> model.generate(ids, max_new_tokens=64, cache=cache)
    """

    def __init__(self, *, layout: str = "segments", chunk: int = DEFAULT_CHUNK, capacity: int = 0) -> None:
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache layout must be one of {CACHE_LAYOUTS}, got {layout!r}")
        self.kv_layout, self.chunk, self.capacity = layout, chunk, capacity
        super().__init__(layer_class_to_replicate=self._segments_layer)

    def _segments_layer(self) -> PreallocatedLayer:
        if self.kv_layout != "segments":
            raise ValueError("a kv_shard TwoLevelCache is written by the seq_rows / kv_shard strategies; patch the "
                             "model's attention with use_seqshard(model), or use layout='segments'")
        return PreallocatedLayer(GrowingKV(chunk=self.chunk, capacity=self.capacity))

    def position_store(self, layer_idx: int, m: int, rank: int) -> PositionShardedKV:
        """The kv_shard store of a layer (layers created on first use)."""
        if self.kv_layout != "kv_shard":
            raise ValueError("position_store() needs a TwoLevelCache built with layout='kv_shard'")
        while len(self.layers) <= layer_idx:
            store = PositionShardedKV(m=m, rank=rank, chunk=self.chunk, capacity=self.capacity)
            self.layers.append(PreallocatedLayer(store))
        layer = self.layers[layer_idx]
        layer.is_initialized = True
        store = layer.store
        if (store.m, store.rank) != (m, rank):
            raise ValueError(f"layer {layer_idx}'s kv_shard cache belongs to segment rank {store.rank} of {store.m}, "
                             f"not {rank} of {m}: build one TwoLevelCache per rank and layout")
        return store

    @classmethod
    def for_model(cls, model: nn.Module, *, layout: str = "segments", chunk: int = DEFAULT_CHUNK,
                  capacity: int = 0) -> "TwoLevelCache":
        """A cache for a patched model (kv_shard checks that it has partitioned attention layers)."""
        if layout == "kv_shard" and not any(isinstance(m, HFTwoLevelAttention) for m in model.modules()):
            raise ValueError("layout='kv_shard' needs partitioned attention layers (they decode with kv_shard): call "
                             "patch_model (optionally with strategy='seq_rows', or use_seqshard(model)) first")
        return cls(layout=layout, chunk=chunk, capacity=capacity)

    def nbytes(self) -> int:
        """Bytes of this rank's cached keys and values."""
        return sum(layer.store.nbytes() for layer in self.layers)


class HFSeqShardAttention(HFTwoLevelAttention):
    """An :class:`~hf_integration.modules.HFTwoLevelAttention` switched to the sequence-sharded strategies
    by :func:`use_seqshard`: its strategy is ``"seq_rows"`` (prefill by query rows; decode by the
    registry's "cost_model", or by kv_shard with a kv_shard cache). Same parameters, state and forward."""


def use_seqshard(model: nn.Module, *, prefill: str | None = "seq_rows") -> int:
    """Switch every partitioned attention layer of a patched model to :class:`HFSeqShardAttention`
    (in place, parameters and buffers untouched); returns how many were switched.

    ``prefill``: "seq_rows" (every call with q_len > 1) or None (the model's own strategy, except with a
    kv_shard cache, which always uses seq_rows / kv_shard).
    """
    if prefill not in (None, "seq_rows"):
        raise ValueError(f"prefill must be 'seq_rows' or None, got {prefill!r}")
    switched = 0
    for module in model.modules():
        if isinstance(module, HFTwoLevelAttention):
            module.__class__ = HFSeqShardAttention
            module.strategy = prefill or module.strategy
            switched += 1
    if not switched:
        raise ValueError(f"{type(model).__name__} has no partitioned attention layer: call patch_model first")
    return switched


__all__ = ["HFSeqShardAttention", "PreallocatedLayer", "TwoLevelCache", "use_seqshard"]
