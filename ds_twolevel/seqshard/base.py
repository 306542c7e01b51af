"""What the sequence-sharded strategies need from a call and from the layer, as two small records.

:class:`SeqCall` is :class:`~ds_twolevel.costmodel.AttentionCall` plus the facts ``applies`` must see
(attention dropout, autograd, the KV-cache layout, the element size); the strategy functions read
the extra fields with ``getattr`` defaults, so a plain ``AttentionCall`` works too (no dropout, no
grad, "segments" cache, 4-byte elements). :class:`AttendContext` is what ``attend`` needs from the
layer. Both are to be merged into the registry's keyword-only records (issue 13).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ds_twolevel.costmodel import AttentionCall
from ds_twolevel.parallel.layout import AxisGroup

CACHE_LAYOUTS = ("segments", "kv_shard")
""""segments": each rank caches (b, g/n, s, d/m) of every position (the dim split, today's layout);
"kv_shard": each rank of a segment group caches full-d K/V of its own positions (p % m == j)."""


@dataclass(frozen=True)
class SeqCall(AttentionCall):
    """An :class:`AttentionCall` with what the sequence-sharded strategies' ``applies`` checks.

    Example:
        >>> SeqCall(1, 2048, 2048, 1024, 4, 4, 128, 2, 2, causal_blocks=True, plain_causal=True)
    """

    plain_causal: bool = False
    """causal attention with no mask tensor (queries are the last q_len of the kv_len keys): seq_rows
    deals zigzag blocks and needs no mask; ``causal_blocks`` implies it."""
    dropout: bool = False
    """attention dropout is active (training with p > 0)."""
    grad: bool = False
    """autograd will differentiate the call."""
    cache_layout: str = "segments"
    """layout of the KV cache the call reads and writes (see :data:`CACHE_LAYOUTS`)."""
    cached: int = 0
    """positions already in the cache before the call (kv_len - q_len when they are all attended)."""
    element_size: int = 4
    """bytes per element of the activations (kv_shard packs the fp32 log-sum-exp into 4 bytes)."""


def plain_causal(call: AttentionCall) -> bool:
    """Whether the call is causal with no mask tensor (``causal_blocks`` or ``plain_causal``)."""
    return bool(call.causal_blocks or getattr(call, "plain_causal", False))


@dataclass(frozen=True)
class AttendContext:
    """What a strategy's ``attend`` needs from the layer of one call."""

    seg: AxisGroup
    """the m ranks of this head group (segment axis)."""
    scaling: float
    """score scale (1/sqrt(d) of the full head dim unless the model says otherwise)."""
    causal: bool
    """the layer is causal (a decoder)."""
    q_heads: Sequence[int] = ()
    """global query heads of this head group (to slice a per-head 4-D mask given for all h heads)."""
    store: Any = None
    """kv_shard: this layer's :class:`~ds_twolevel.seqshard.cache.PositionShardedKV`."""
