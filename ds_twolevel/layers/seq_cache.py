"""A preallocated KV cache: buffers that grow in large chunks, so an append costs O(new tokens).

``KVCache.update`` and Hugging Face's ``DynamicCache`` ``torch.cat`` the whole cache on every step,
so a decode step copies all s cached positions (on an H200 that put decode shards at 2.1x of ideal).
Here each layer keeps a (b, heads, capacity, dim) buffer; an append writes the new positions in place
and returns views of the filled part; when full, the capacity grows to the larger of twice itself and
the next multiple of ``chunk`` (amortised O(1) per position).

Two layouts (see :data:`~.base.CACHE_LAYOUTS`):

* "segments": :class:`GrowingKV` holds this rank's (b, g/n, s, d/m) keys and (b, g/n, s, dv/m)
  values of every position - today's layout, used by every existing strategy;
* "kv_shard": :class:`PositionShardedKV` holds full-d keys and values of the positions
  p % m == j this segment rank owns, and the global length (what ``get_seq_length`` reports).

:class:`SeqShardCache` is the framework-free cache with ``KVCache``'s ``update(k, v, layer_idx)``
contract; ``hf_integration.seqshard.TwoLevelCache`` is the Hugging Face ``Cache`` over the same
stores.
"""
from __future__ import annotations

import torch

from ds_twolevel.strategies.base import CACHE_LAYOUTS
from ds_twolevel.strategies.rows import first_owned, owned_count

DEFAULT_CHUNK = 256


class GrowingKV:
    """Keys (b, heads, length, dk) and values (b, heads, length, dv) of one layer, preallocated.

    Example:
        >>> store = GrowingKV(chunk=256)
        >>> keys, values = store.append(k, v)   # views of the filled part of the buffers
    """

    def __init__(self, *, chunk: int = DEFAULT_CHUNK, capacity: int = 0) -> None:
        if chunk < 1 or capacity < 0:
            raise ValueError(f"chunk ({chunk}) must be >= 1 and capacity ({capacity}) >= 0")
        self.chunk, self.initial_capacity = chunk, capacity
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[-2]

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (b, heads, t, dk) keys and (b, heads, t, dv) values after the cached ones; return all."""
        need = self.length + key.shape[-2]
        if self._k is None or need > self.capacity or not self._fits(key, value):
            self._grow(key, value, need)
        self._k[:, :, self.length:need].copy_(key)
        self._v[:, :, self.length:need].copy_(value)
        self.length = need
        return self.keys, self.values

    def _fits(self, key: torch.Tensor, value: torch.Tensor) -> bool:
        k, v = self._k, self._v
        return (k.shape[:2] == key.shape[:2] and k.shape[-1] == key.shape[-1] and v.shape[-1] == value.shape[-1]
                and k.dtype == key.dtype and k.device == key.device)

    def _grow(self, key: torch.Tensor, value: torch.Tensor, need: int) -> None:
        if self._k is not None and self.length and not self._fits(key, value):
            raise ValueError(f"cache holds (batch, heads, dim) = ({tuple(self._k.shape[:2])}, {self._k.shape[-1]}) "
                             f"{self._k.dtype}; got keys {tuple(key.shape)} {key.dtype}: reset the cache first")
        chunks = -(-need // self.chunk) * self.chunk
        capacity = max(chunks, 2 * self.capacity if self.length else 0, self.initial_capacity)
        old_k, old_v = self.keys, self.values
        b, heads = key.shape[:2]
        self._k = key.new_empty(b, heads, capacity, key.shape[-1])  # (b, heads, capacity, dk)
        self._v = value.new_empty(b, heads, capacity, value.shape[-1])
        if self.length:
            self._k[:, :, :self.length].copy_(old_k)
            self._v[:, :, :self.length].copy_(old_v)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (the buffers stay allocated)."""
        self.length = max(0, min(self.length, length))

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep / reorder batch rows (beam search's reorder, batch selection): a copy of the filled part
        into new buffers of the same capacity."""
        if self._k is None:
            return
        index = index.to(self._k.device)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(index.numel(), *old.shape[1:])  # (b', heads, capacity, dim)
            new[:, :, :self.length].copy_(old[:, :, :self.length].index_select(0, index))
            setattr(self, name, new)

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (contrastive / assisted generation)."""
        if self._k is not None:
            self.select_batch(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0

    def to(self, device: torch.device | str) -> None:
        """Move the buffers (offloading)."""
        if self._k is not None:
            self._k, self._v = self._k.to(device), self._v.to(device)

    def nbytes(self) -> int:
        """Bytes of the filled part (what a concatenating cache would hold)."""
        if self._k is None:
            return 0
        return self.length * (self._k[:, :, :1].numel() * self._k.element_size() +
                              self._v[:, :, :1].numel() * self._v.element_size())


class PositionShardedKV(GrowingKV):
    """kv_shard layout: full-d keys/values of the positions p with p % m == rank (in order).

    Example:
        >>> store = PositionShardedKV(m=2, rank=1)
        >>> store.append_positions(k_full, v_full)   # global positions [0, 5): keeps 1 and 3
        >>> store.global_length, store.length
        (5, 2)
    """

    def __init__(self, *, m: int, rank: int, chunk: int = DEFAULT_CHUNK, capacity: int = 0) -> None:
        if not 0 <= rank < m:
            raise ValueError(f"segment rank {rank} outside 0..{m - 1}")
        super().__init__(chunk=chunk, capacity=capacity)
        self.m, self.rank = m, rank
        self.global_length = 0

    def append_positions(self, key: torch.Tensor, value: torch.Tensor) -> int:
        """New global positions [L, L + t): keep those this rank owns from (b, gl, t, d) / (b, gl, t, dv)
        full-width keys / values; returns how many were kept."""
        first = first_owned(self.global_length, self.rank, self.m)
        self.global_length += key.shape[-2]
        own_k, own_v = key[:, :, first::self.m], value[:, :, first::self.m]
        if own_k.shape[-2] or self._k is None:
            self.append(own_k, own_v)
        return own_k.shape[-2]

    def positions(self, device: torch.device | None = None) -> torch.Tensor:
        """Global positions of the stored entries, (length,) int64."""
        return torch.arange(self.rank, self.rank + self.m * self.length, self.m, device=device)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` *global* positions."""
        self.global_length = max(0, min(self.global_length, length))
        self.length = owned_count(self.global_length, self.rank, self.m)

    def reset(self) -> None:
        super().reset()
        self.global_length = 0


class SeqShardCache:
    """Framework-free preallocated cache for every layer of a model on one rank.

    ``layout="segments"``: the ``update(k, v, layer_idx)`` contract of :class:`~ds_twolevel.layers.cache.KVCache`
    (drop-in for every existing strategy); ``layout="kv_shard"``: the layers call
    :meth:`position_store` and attend with kv_shard.

    Example:
        >>> cache = SeqShardCache(layout="kv_shard")
        >>> y = layer(x, position_embeddings=rope, kv_cache=cache)
    """

    def __init__(self, *, layout: str = "segments", chunk: int = DEFAULT_CHUNK, capacity: int = 0) -> None:
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache layout must be one of {CACHE_LAYOUTS}, got {layout!r}")
        self.kv_layout, self.chunk, self.capacity = layout, chunk, capacity
        self.stores: dict[int, GrowingKV] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this rank's (b, heads, t, dim) slices; return everything cached ("segments" only)."""
        if self.kv_layout != "segments":
            raise ValueError("a kv_shard cache is written by the kv_shard / seq_rows strategies, not by update(); "
                             "use layout='segments' with the other strategies")
        if layer_idx not in self.stores:
            self.stores[layer_idx] = GrowingKV(chunk=self.chunk, capacity=self.capacity)
        return self.stores[layer_idx].append(key, value)

    def position_store(self, layer_idx: int, m: int, rank: int) -> PositionShardedKV:
        """The kv_shard store of a layer (created on first use)."""
        if self.kv_layout != "kv_shard":
            raise ValueError("position_store() needs a cache built with layout='kv_shard'")
        if layer_idx not in self.stores:
            self.stores[layer_idx] = PositionShardedKV(m=m, rank=rank, chunk=self.chunk, capacity=self.capacity)
        return self.stores[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions of the whole sequence cached for a layer (global, in both layouts)."""
        store = self.stores.get(layer_idx)
        return 0 if store is None else getattr(store, "global_length", store.length)

    def nbytes(self) -> int:
        """Bytes of this rank's cached keys and values."""
        return sum(store.nbytes() for store in self.stores.values())
