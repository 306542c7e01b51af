"""Strategy ``qk_allgather``: gather full-d q and k over the segment group, then fused attention with
this segment's v (the output needs no further collective: each rank holds its dv/m columns).

The m ranks of a segment group all compute the full Q K^T of their head group (m-fold score FLOPs),
but the scores never reach memory (fused SDPA). Dropout (the shared keyed stream) and Gemma2's
soft-cap need explicit scores: those calls compute them in memory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ds_twolevel.parallel.collectives import all_gather_dim
from ds_twolevel.strategies.base import AttendContext, AttentionCall, Collective, Op
from ds_twolevel.strategies.common import (dropout, expand_kv, layer_mask, mlp_activation, projection_ops, softcap,
                                           softmax_sinks)

if TYPE_CHECKING:
    from ds_twolevel.strategies.base import ModelConfig

NAME = "qk_allgather"
AUTO = True
UNIVERSAL = True
TIE_RANK = 0
"""fused SDPA wins a tie."""


def why_not(call: AttentionCall) -> str | None:
    """Any call with a dimension-layout cache."""
    if call.cache_layout != "segments":
        return "qk_allgather reads a cache in the dimension layout (layout='segments')"
    return None


def collectives(call: AttentionCall) -> list[Collective]:
    """All-gathers of q and k over the segment axis."""
    c, m = call, call.m
    if m == 1:
        return []
    return [Collective("all_gather", "m", "q", c.batch * c.local_heads * c.q_len * c.head_dim, m),
            Collective("all_gather", "m", "k", c.batch * c.local_kv_heads * c.kv_len * c.head_dim, m)]


def ops(model: "ModelConfig", call: AttentionCall, eb: int) -> list[Op]:
    """Compute ops of one layer on one rank: fused attention over gathered full-d q, k and this segment's v."""
    c, d = call, model.head_dim
    t, dl, hl, gl = c.batch * c.q_len, d // c.m, c.local_heads, c.local_kv_heads
    scores = c.batch * hl * c.q_len * c.kv_len
    gathered = (t * hl * d + c.batch * gl * c.kv_len * d + c.batch * gl * c.kv_len * dl + t * hl * dl) * eb
    qkv, o_proj = projection_ops(model, c, eb)
    return [qkv, Op("fused_attention", 2 * scores * d + 2 * scores * dl + 5 * scores, gathered), o_proj]


def activation_bytes(model: "ModelConfig", call: AttentionCall, eb: int) -> float:
    """Largest set of live activations of one layer on one rank (inference): the gathered q and k (m > 1), the
    additive mask (b, s_q, s_kv) unless the call is plain causal, and - when m > 1, where v (d/m wide) is
    narrower than q and k (d) - the scores and probabilities (b, h/n, s_q, s_kv): torch's SDPA then runs
    its math path (measured on the CPU: +1416 MiB at s = 8192, q/k 16 and v 8 dims, against +4 MiB with
    equal dims; the flash kernel also needs equal dims). Conservative where a memory-efficient kernel
    would take unequal dims."""
    c, t = call, call.batch * call.q_len
    qkv = t * (c.local_heads + 2 * c.local_kv_heads) * (model.head_dim // c.m)
    gathered = (t * c.local_heads + c.batch * c.local_kv_heads * c.kv_len) * model.head_dim if c.m > 1 else 0
    attn = qkv + gathered  # m = 1: q and k are the projections and the cache themselves, nothing is gathered
    mask = 0 if c.no_mask_causal else c.batch * c.q_len * c.kv_len
    scores = 2 * c.batch * c.local_heads * c.q_len * c.kv_len if c.m > 1 else 0
    return (2 * t * model.hidden + max(attn + mask + scores, mlp_activation(model, c))) * eb


def attend(ctx: AttendContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """(b, hl, s, dv/m) outputs for the row-parallel o_proj; ``mask`` is the layer's raw mask."""
    call = ctx.call
    fused_causal = call.causal_blocks and ctx.softcap is None and ctx.sinks is None
    plain = fused_causal or (call.plain_causal and call.q_len == 1)
    additive = None if plain else layer_mask(ctx, mask, q)
    q_full = all_gather_dim(q, ctx.seg, -1, "q")  # (b, hl, sq, d), dims in segment order
    k_full = all_gather_dim(k, ctx.seg, -1, "k")  # (b, gl, skv, d)
    hl = q.shape[1]
    if ctx.dropout is not None or ctx.softcap is not None or ctx.sinks is not None:  # explicit: dropout, cap, sinks
        scores = softcap(ctx, q_full @ expand_kv(k_full, hl).transpose(-1, -2) * ctx.scaling)
        scores = scores if additive is None else scores + additive
        probs = F.softmax(scores, dim=-1, dtype=torch.float32) if ctx.sinks is None else softmax_sinks(ctx, scores)
        return dropout(ctx, probs.to(q.dtype)) @ expand_kv(v, hl)
    # enable_gqa: SDPA maps query head h to KV head h // (hl/gl) itself, without copying K/V
    return F.scaled_dot_product_attention(q_full, k_full, v, attn_mask=additive, is_causal=fused_causal,
                                          scale=ctx.scaling, enable_gqa=k_full.shape[1] != q_full.shape[1])
