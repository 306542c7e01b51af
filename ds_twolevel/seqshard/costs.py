"""A whole attention layer's collectives with a sequence-sharded strategy, for the byte-count test and
the cost model: the strategy's own collectives inside :func:`ds_twolevel.costmodel.attention_collectives`'s
frame (q/k-norm sums of squares, output and input-gradient all-reduces, norm-weight and KV-replication
gradient sums). The frame is taken from ``attention_collectives(call, "qk_allgather")`` with its
q/k all-gathers removed, so the non-strategy parts have one source; with the registry,
``attention_collectives`` asks the strategy itself and this module goes away.
"""
from __future__ import annotations

from ds_twolevel.costmodel import AttentionCall, Collective, attention_collectives
from ds_twolevel.seqshard import STRATEGIES

_BACKWARD_OF = {"all_reduce": "all_reduce", "all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
                "all_to_all": "all_to_all"}


def layer_collectives(call: AttentionCall, strategy: str, *, backward: bool = False,
                      input_grad: bool = True) -> list[Collective]:
    """Every collective one layer call issues with ``strategy`` ("seq_rows" or "kv_shard")."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
    if backward and strategy == "kv_shard":
        raise ValueError("kv_shard is inference only: it has no backward collectives")
    frame = [c for c in attention_collectives(call, "qk_allgather", backward=backward, input_grad=input_grad)
             if not (c.axis == "m" and c.tag in ("q", "k"))]
    own = STRATEGIES[strategy].collectives(call)
    if backward:
        own += [Collective(_BACKWARD_OF[c.op], c.axis, c.tag, c.numel, c.ranks, True) for c in own]
    return frame + own
