"""Strategy ``score_allreduce``: partial scores over this segment's dims, summed over the segment group.

Rank j of head group i holds q (b, h/n, s, d/m), k (b, g/n, s_kv, d/m), v (b, g/n, s_kv, dv/m). Its
partial scores q_j k_j^T are summed over the m segments (DESIGN.md section 2). Three variants, decided
by the call alone (so the layer and the cost model agree):

* plain causal prefill (s == s_kv, no mask, no dropout): only the visible key blocks are computed, in
  zigzag pairs per rank (:mod:`.causal_blocks`);
* split softmax (the query rows divide by m): the all-reduce is done as its two halves -
  reduce-scatter the partial scores along the rows, so each rank runs mask, softmax and dropout on its
  1/m of the rows - then either all-gather the probabilities or, when it sends fewer bytes
  (:func:`values_gathered`), multiply its rows by the all-gathered full-width V and all-to-all the
  outputs back to segments (the V-gather tail);
* otherwise (decode's single row): one all-reduce of the scores.

GQA without copying K/V: the h/g query heads of each KV head are stacked along the query rows, so one
(b, g/n) batched matmul computes exactly the same dot products. The scale is applied to q.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ds_twolevel.parallel.collectives import all_gather_dim, all_reduce_both, reduce_scatter_dim
from ds_twolevel.strategies import causal_blocks
from ds_twolevel.strategies.base import AttendContext, AttentionCall, Collective, Op
from ds_twolevel.strategies.common import (dropout, layer_mask, mlp_activation, projection_ops, rows_to_segments,
                                           softcap, softmax_sinks)

if TYPE_CHECKING:
    from ds_twolevel.strategies.base import ModelConfig

NAME = "score_allreduce"
AUTO = True
UNIVERSAL = True


def why_not(call: AttentionCall) -> str | None:
    """Any call with a dimension-layout cache."""
    if call.cache_layout != "segments":
        return "score_allreduce reads a cache in the dimension layout (layout='segments')"
    return None


def split_softmax(m: int, q_len: int) -> bool:
    """Whether the all-reduce is split into reduce-scatter (partial scores, by query rows) +
    all-gather: when there are m > 1 segments and the query rows divide by m (not for decode)."""
    return m > 1 and q_len > 1 and q_len % m == 0


def values_gathered(call: AttentionCall, probs_numel: int) -> bool:
    """Whether the split score path gathers V instead of the probabilities (fewer bytes).

    After the reduce-scatter each rank of the segment group holds the probabilities of its own
    query rows. Two exact ways to finish: all-gather those probabilities (``probs_numel``
    elements, s_q x s_kv per head) and multiply by this segment's v; or all-gather v (full
    value dim, b g/n s_kv d_v) so that each rank multiplies its rows by the whole v, then
    all-to-all the (rows, d_v) outputs back to (all rows, d_v/m) per segment for the row-parallel
    output projection. Same FLOPs; the second moves ~s·d instead of ~s² elements, so it wins
    once s_kv > d_v (g/h + 1/m) (split softmax; the causal blocks send about half the
    probabilities, so about twice that) - every long prefill. Ties keep the probabilities.
    Every one of these collectives sends (m-1)/m of the elements it is counted by, so elements
    decide, whatever the dtype.
    """
    c = call
    v_numel = c.batch * c.local_kv_heads * c.kv_len * c.v_dim
    rows_numel = c.batch * c.local_heads * c.q_len * c.v_dim // c.m  # this rank's all-to-all tensor
    return v_numel + rows_numel < probs_numel


def block_rows(call: AttentionCall) -> int:
    """Rows per query block of the causal path (0: the call does not take it)."""
    return causal_blocks.block_rows(call.m, call.q_len) if call.causal_blocks else 0


def tail_collectives(call: AttentionCall, scores_numel: int) -> list[Collective]:
    """Reduce-scatter of the partial scores, then the probabilities or V (:func:`values_gathered`)."""
    c, m = call, call.m
    out = [Collective("reduce_scatter", "m", "scores", scores_numel, m)]
    if values_gathered(c, scores_numel):
        return out + [Collective("all_gather", "m", "v", c.batch * c.local_kv_heads * c.kv_len * c.v_dim, m),
                      Collective("all_to_all", "m", "attn_rows", c.batch * c.local_heads * c.q_len * c.v_dim // m, m)]
    return out + [Collective("all_gather", "m", "probs", scores_numel, m)]


def collectives(call: AttentionCall) -> list[Collective]:
    """Forward collectives over the segment axis, as :func:`attend` issues them."""
    c, m = call, call.m
    if m == 1:
        return []
    rows = block_rows(c)
    if rows:  # only the visible key blocks, packed into one reduce-scatter
        return tail_collectives(c, causal_blocks.scores_numel(c, rows))
    numel = c.batch * c.local_heads * c.q_len * c.kv_len
    if split_softmax(m, c.q_len):  # the all-reduce as its two halves, softmax on 1/m of the rows
        return tail_collectives(c, numel)
    return [Collective("all_reduce", "m", "scores", numel, m)]


def ops(model: "ModelConfig", call: AttentionCall, eb: int) -> list[Op]:
    """Compute ops of one layer on one rank: materialised scores (written and read)."""
    c, dl = call, model.head_dim // call.m
    t, hl, gl = c.batch * c.q_len, c.local_heads, c.local_kv_heads
    scores = c.batch * hl * c.q_len * c.kv_len
    kv_bytes = c.batch * gl * c.kv_len * 2 * dl * eb  # K and V read from the cache / activations
    qkv, o_proj = projection_ops(model, c, eb)
    return [qkv, Op("scores", 2 * scores * dl, (t * hl * dl + scores) * eb + kv_bytes / 2),
            Op("softmax", 5 * scores, 2 * scores * eb),
            Op("pv", 2 * scores * dl, (scores + t * hl * dl) * eb + kv_bytes / 2), o_proj]


def activation_bytes(model: "ModelConfig", call: AttentionCall, eb: int) -> float:
    """Largest set of live activations of one layer on one rank (inference): scores + probabilities."""
    c, t = call, call.batch * call.q_len
    qkv = t * (c.local_heads + 2 * c.local_kv_heads) * (model.head_dim // c.m)
    attn = qkv + 2 * c.batch * c.local_heads * c.q_len * c.kv_len
    return (2 * t * model.hidden + max(attn, mlp_activation(model, c))) * eb


def attend(ctx: AttendContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """(b, hl, s, dv/m) outputs for the row-parallel o_proj; ``mask`` is the layer's raw mask."""
    call = ctx.call
    rows = block_rows(call)
    if rows:
        return causal_blocks.attend(ctx, q, k, v, rows, values_gathered)
    additive = None if call.plain_causal and call.q_len == 1 else layer_mask(ctx, mask, q)
    b, hl, sq, dl = q.shape
    gl, skv, seg = k.shape[1], k.shape[-2], ctx.seg
    q_grouped = (q * ctx.scaling).reshape(b, gl, (hl // gl) * sq, dl)  # (b, gl, hl/gl*sq, dl)
    scores_partial = (q_grouped @ k.transpose(-1, -2)).view(b, hl, sq, skv)  # (b, hl, sq, skv)
    if split_softmax(seg.size, sq):
        rows, row0 = sq // seg.size, seg.rank * (sq // seg.size)
        scores = reduce_scatter_dim(scores_partial, seg, 2, "scores")  # (b, hl, sq/m, skv)
        if additive is not None and additive.shape[-2] == sq:
            additive = additive[..., row0:row0 + rows, :]
    else:
        rows, row0 = sq, 0
        scores = all_reduce_both(scores_partial, seg, "scores")
    scores = softcap(ctx, scores)
    if additive is not None:
        scores = scores + additive
    probs = dropout(ctx, softmax_sinks(ctx, scores), sq, row0)
    return _values(ctx, probs, v, rows, sq, scores_partial.numel())


def _values(ctx: AttendContext, probs: torch.Tensor, v: torch.Tensor, rows: int, sq: int,
            probs_numel: int) -> torch.Tensor:
    """probs (b, hl, rows, skv) @ V -> (b, hl, sq, dv/m): the gathered-V tail or the gathered probabilities."""
    b, hl, _, skv = probs.shape
    gl, seg = v.shape[1], ctx.seg
    if rows != sq and values_gathered(ctx.call, probs_numel):
        v_full = all_gather_dim(v, seg, -1, "v")  # (b, gl, skv, dv), dims in segment order
        out = (probs.reshape(b, gl, (hl // gl) * rows, skv) @ v_full).view(b, hl, rows, v_full.shape[-1])
        return rows_to_segments(out, seg, None)
    if rows != sq:
        probs = all_gather_dim(probs, seg, 2, "probs")  # (b, hl, sq, skv)
    out = probs.reshape(b, gl, (hl // gl) * sq, skv) @ v  # (b, gl, hl/gl*sq, dvl)
    return out.view(b, hl, sq, v.shape[-1])  # (b, hl, sq, dvl)
