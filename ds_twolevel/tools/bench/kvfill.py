"""Decode caches of the layout benchmark, filled from one dense cache state instead of a prompt.

A decode step's output depends on the cached keys and values only, so every row starts from the same dense
(b, g, s, d) keys (after RoPE) and values per layer, drawn once from a seeded generator, each row holding
its own rank's slice in its own layout; the dense model decodes against the whole of it. That is exact
(the same numbers as a prompt that produced this cache) and linear in s, where a prompt of s tokens would
cost each row an s^2 prefill: it is what makes a long-context decode shape affordable on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.layers.seq_cache import SeqShardCache
from ds_twolevel.sharding.partition import AttentionSpec

DenseKV = list[tuple[torch.Tensor, torch.Tensor]]
"""per layer: keys (b, g, s, d) after RoPE, values (b, g, s, dv)."""


def dense_kv(spec: AttentionSpec, layers: int, batch: int, seq: int, seed: int) -> DenseKV:
    """The seeded dense cache state every row of a decode shape starts from."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, spec.num_kv_heads, seq)
    return [(torch.randn(*shape, spec.head_dim, generator=gen), torch.randn(*shape, spec.dv, generator=gen))
            for _ in range(layers)]


def hf_cache(config, kv: DenseKV, heads: list[int] | None = None):
    """A Hugging Face ``DynamicCache`` holding ``heads`` of every layer (None: all)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for idx, (k, v) in enumerate(kv):
        index = torch.tensor(heads if heads is not None else range(k.shape[1]), dtype=torch.long)
        cache.update(k.index_select(1, index), v.index_select(1, index), idx)
    return cache


def two_level_cache(layers: list[nn.Module], kv: DenseKV, layout: str) -> SeqShardCache:
    """This rank's preallocated cache of every layer, room for one more position: the dimension layout
    ("segments": its KV heads x qk/v dims) or the kv_shard layout (positions p % m == j at full d, dims in
    the segment order kv_shard gathers them in). The Helix-style layer reads the kv_shard layout in dense
    dim order (its projections are not split by dims)."""
    seq, m = kv[0][0].shape[-2], layers[0].axes.seg.size
    own = -(-seq // m)
    cache = SeqShardCache(layout=layout, capacity=(seq if layout == "segments" else own) + 1)
    for layer, (k, v) in zip(layers, kv):
        if isinstance(layer, TwoLevelAttention):
            part, i, j = layer.part, layer.axes.heads.rank, layer.axes.seg.rank
            heads = torch.tensor(part.kv_heads(i))
            k, v = k.index_select(1, heads), v.index_select(1, heads)
            dims = part.qk_dims(j) if layout == "segments" else [t for jj in range(m) for t in part.qk_dims(jj)]
            k = k.index_select(-1, torch.tensor(dims))
            if layout == "segments":
                v = v.index_select(-1, torch.tensor(part.v_dims(j)))
        else:  # the Helix-style layer: its head group's KV heads at full d, dense order
            heads = torch.tensor(layer.kv_heads)
            k, v = k.index_select(1, heads), v.index_select(1, heads)
        if layout == "segments":
            cache.update(k, v, layer.layer_idx)
        else:
            j = layer.axes.seg.rank
            store = cache.position_store(layer.layer_idx, m, j)
            store.append(k[:, :, j::m], v[:, :, j::m])
            store.global_length = seq
    return cache
