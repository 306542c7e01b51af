"""Sequence-sharded attention on the segment axis (DESIGN.md section 7, issue 14).

The weights stay two-level (rank (i, j) keeps its 1/(m n) of W_q, W_k, W_v, W_o); the m ranks of a
segment group re-lay the attention *work* along the sequence:

* :mod:`.seq_rows` - prefill and training: query rows per rank, full-width K/V, fused attention;
* :mod:`.kv_shard` - decode: the KV cache held by position, an exact log-sum-exp combine;
* :mod:`.cache` - a preallocated KV cache (O(new tokens) appends) in both layouts;
* :mod:`.fused`, :mod:`.masks`, :mod:`.rows`, :mod:`.comm` - kernels, per-rank masks, pure row /
  position math, collectives with simulated axes;
* :mod:`.layer` - the wiring into ``TwoLevelAttention`` until the strategy registry lands.

Each strategy module exposes the registry's four entry points: ``applies(call)``,
``collectives(call)``, ``ops(model, call, eb)`` and ``attend(ctx, q, k, v, mask)`` (plus
``activation_bytes(model, call, eb)``); :mod:`.costs` assembles a whole layer's collectives from them.
"""
from ds_twolevel.seqshard import kv_shard, seq_rows
from ds_twolevel.seqshard.base import CACHE_LAYOUTS, AttendContext, SeqCall
from ds_twolevel.seqshard.cache import GrowingKV, PositionShardedKV, SeqShardCache
from ds_twolevel.seqshard.layer import SeqShardAttention, seq_forward

STRATEGIES = {seq_rows.NAME: seq_rows, kv_shard.NAME: kv_shard}
"""name -> strategy module (the future registry lines)."""

__all__ = ["CACHE_LAYOUTS", "STRATEGIES", "AttendContext", "GrowingKV", "PositionShardedKV", "SeqCall",
           "SeqShardAttention", "SeqShardCache", "kv_shard", "seq_forward", "seq_rows"]
