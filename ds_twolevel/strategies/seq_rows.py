"""Strategy ``seq_rows`` (prefill and training): the m ranks of a segment group split the attention by
query rows instead of by head dims (DESIGN.md section 7).

Rank j of the segment group holds q (b, h/n, s, d/m), k (b, g/n, s, d/m), v (b, g/n, s, dv/m)
(dims in segment order). It

1. all-to-alls q from dim segments to query rows: (b, h/n, s/m, d) - its own rows at full d
   (zigzag pairs of 2m row blocks under a plain causal mask, so every rank does equal work);
2. all-gathers k and v at full width: (b, g/n, s, d), (b, g/n, s, dv);
3. runs fused attention on its own rows (:mod:`.fused`: no (s, s) tensor; GQA without copying K/V);
4. all-to-alls the outputs (b, h/n, s/m, dv) back to (b, h/n, s, dv/m) for the row-parallel o_proj.

Backward: the inverse all-to-alls and reduce-scatters (the paired autograd collectives). Exactly 1/m
of the head group's fused attention per rank. Rows that do not divide into the blocks are padded
(:func:`~.rows.plan_rows`; the padding rows' outputs are dropped). The shared-stream attention
dropout cannot run inside SDPA: ``applies`` refuses calls with dropout.

Registry entry points: :func:`applies`, :func:`collectives`, :func:`ops`, :func:`activation_bytes`,
:func:`attend` (and :func:`attend_full`, which also returns the gathered k and v for a kv_shard cache).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.parallel import collectives as comm
from ds_twolevel.strategies.base import AttendContext, AttentionCall, Collective, Op, plain_causal
from ds_twolevel.strategies.fused import causal_blocks_attention, equal_head_dims, masked_attention
from ds_twolevel.strategies.row_masks import row_mask
from ds_twolevel.strategies.rows import RowPlan, plan_rows

if TYPE_CHECKING:
    from ds_twolevel.strategies.base import ModelConfig

NAME = "seq_rows"
AUTO = True
""""cost_model" picks it for a prefill when it predicts the least time (fused attention on 1/m of the rows)."""
LAYOUTS = ("segments", "kv_shard")
PREFILL_ONLY = True
"""a requested seq_rows falls back to "cost_model" for decode's single row (nothing to split)."""


# -- registry: applicability and costs (pure) ------------------------------------------------------
def why_not(call: AttentionCall) -> str | None:
    """Why seq_rows cannot compute ``call`` exactly (None when it can)."""
    if call.softcap:
        return ("seq_rows runs fused attention, which cannot soft-cap the scores (Gemma2); use score_allreduce or "
                "qk_allgather for this model")
    if getattr(call, "sinks", False):
        return ("seq_rows runs fused attention, which has no attention sinks (GPT-OSS); use score_allreduce or "
                "qk_allgather for this model")
    if call.q_len < 2:
        return f"seq_rows splits query rows; a call with q_len={call.q_len} has none to split (decode)"
    if getattr(call, "dropout", False):
        return ("seq_rows runs fused SDPA, which cannot apply the shared-stream attention dropout that keeps the m "
                "ranks exact; train with dropout through score_allreduce or qk_allgather, or set dropout=0")
    if getattr(call, "cache_layout", "segments") == "kv_shard" and getattr(call, "cached", 0):
        return "a non-empty kv_shard cache holds keys by position; attend to it with kv_shard"
    return None


def applies(call: AttentionCall) -> bool:
    """seq_rows computes ``call`` exactly: a prefill (q_len >= 2), no attention dropout, and a cache
    that is not a non-empty kv_shard cache."""
    return why_not(call) is None


def row_plan(call: AttentionCall) -> RowPlan:
    """The row plan the layer uses for ``call``."""
    return plan_rows(call.m, call.q_len, call.kv_len, causal=plain_causal(call))


def collectives(call: AttentionCall) -> list[Collective]:
    """Forward collectives over the segment axis, as :func:`attend` issues them.

    Elements per rank sent: (m-1)/m * b * (h/n * s' * (d + dv)/m + g/n * s_kv' * (d + dv)), s' and s_kv'
    the padded lengths (equal to s, s_kv when the rows divide into the blocks).
    """
    c, m = call, call.m
    if m == 1:
        return []
    plan = row_plan(c)
    rows, keys = plan.padded_len, plan.padded_kv_len
    return [Collective("all_to_all", "m", "q_rows", c.batch * c.local_heads * rows * (c.head_dim // m), m),
            Collective("all_gather", "m", "k", c.batch * c.local_kv_heads * keys * c.head_dim, m),
            Collective("all_gather", "m", "v", c.batch * c.local_kv_heads * keys * c.v_dim, m),
            Collective("all_to_all", "m", "attn_rows", c.batch * c.local_heads * rows * (c.v_dim // m), m)]


def ops(model: "ModelConfig", call: AttentionCall, eb: int) -> list[Op]:
    """Compute ops of one layer on one rank. The fused attention is exactly 1/m of the head group's
    (rows/m x keys, the full rectangle as in :func:`~ds_twolevel.costmodel.attention_ops`)."""
    c, H, m = call, model.hidden, call.m
    t, d, dv = c.batch * c.q_len, c.head_dim, c.v_dim
    hl, gl = c.local_heads, c.local_kv_heads
    plan = row_plan(c)
    rows, keys = c.batch * plan.rows_per_rank, plan.padded_kv_len
    qkv_out = hl * d // m + gl * (d + dv) // m
    scores = rows * hl * keys
    relayout = (2 * t * hl * (d + dv) // m + 2 * c.batch * gl * keys * (d + dv)) * eb  # pack + unpack copies
    fused = (rows * hl * (d + dv) + c.batch * gl * keys * (d + dv)) * eb
    return [Op("qkv_proj", 2 * t * H * qkv_out, (H * qkv_out + t * H + t * qkv_out) * eb),
            Op("seq_rows_relayout", 0.0, relayout),
            Op("fused_attention", 2 * scores * (d + dv) + 5 * scores, fused),
            Op("o_proj", 2 * t * hl * dv // m * H, (hl * dv // m * H + t * hl * dv // m + t * H) * eb)]


def activation_bytes(model: "ModelConfig", call: AttentionCall, eb: int) -> float:
    """Largest set of live activations of one layer on one rank (inference): no (s, s) tensor; a
    padding mask costs only this rank's rows of it (b, R, s_kv)."""
    c, m = call, call.m
    t, d, dv = c.batch * c.q_len, c.head_dim, c.v_dim
    plan = row_plan(c)
    rows, keys = c.batch * plan.rows_per_rank, plan.padded_kv_len
    local = t * (c.local_heads * d + c.local_kv_heads * (d + dv)) // m
    full = rows * c.local_heads * (d + dv) + c.batch * c.local_kv_heads * keys * (d + dv)
    mask = 0 if plain_causal(c) else rows * keys
    mlp = (3 if model.gated else 2) * t * model.intermediate // (c.m * c.n)
    return (2 * t * model.hidden + max(local + full + mask, mlp)) * eb


# -- the layout changes (collectives) ---------------------------------------------------------------
def queries_to_rows(q: torch.Tensor, seg: AxisGroup, plan: RowPlan) -> torch.Tensor:
    """(b, hl, s', d/m) padded queries, all rows -> (b, hl, R, d): this rank's blocks at full d
    (dims in segment order). One all-to-all ("q_rows")."""
    b, hl, _, dl = q.shape
    m, per, rows = plan.m, plan.blocks_per_rank, plan.block_rows
    order = torch.tensor(plan.order, device=q.device)
    blocks = q.reshape(b, hl, plan.num_blocks, rows, dl).permute(2, 0, 1, 3, 4)  # (B, b, hl, rows, dl)
    send = blocks.index_select(0, order).view(m, per, b, hl, rows, dl)  # chunk r: rank r's blocks
    recv = comm.all_to_all_dim0(send, seg, "q_rows")  # chunk j: segment j's dims of my blocks
    return recv.permute(2, 3, 1, 4, 0, 5).reshape(b, hl, per * rows, m * dl)  # (b, hl, R, d)


def gather_width(t: torch.Tensor, seg: AxisGroup, tag: str) -> torch.Tensor:
    """(b, gl, s, w/m) -> (b, gl, s, w): every segment's dims, in segment order. One all-gather."""
    b, gl, s, wl = t.shape
    gathered = comm.all_gather_dim(t.unsqueeze(0), seg, 0, tag)  # (m, b, gl, s, wl)
    return gathered.permute(1, 2, 3, 0, 4).reshape(b, gl, s, seg.size * wl)


def rows_to_segments(out: torch.Tensor, seg: AxisGroup, plan: RowPlan) -> torch.Tensor:
    """(b, hl, R, dv) outputs of this rank's blocks -> (b, hl, s, dv/m) of every real row. One
    all-to-all ("attn_rows"): segment j's columns of every rank's rows go to rank j."""
    b, hl, _, dv = out.shape
    m, per, rows = plan.m, plan.blocks_per_rank, plan.block_rows
    dvl = dv // m
    send = out.view(b, hl, per, rows, m, dvl).permute(4, 2, 0, 1, 3, 5)  # (m, per, b, hl, rows, dvl)
    recv = comm.all_to_all_dim0(send, seg, "attn_rows")  # chunk r: rank r's blocks, my columns
    inverse = torch.tensor(sorted(range(plan.num_blocks), key=plan.order.__getitem__), device=out.device)
    blocks = recv.reshape(plan.num_blocks, b, hl, rows, dvl).index_select(0, inverse)  # block c at c
    return blocks.permute(1, 2, 0, 3, 4).reshape(b, hl, plan.padded_len, dvl)[:, :, :plan.q_len]


# -- attend -----------------------------------------------------------------------------------------
def attend_full(ctx: AttendContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq_rows attention of one call: (out (b, hl, s, dv/m), k (b, gl, s_kv', d), v (b, gl, s_kv', dv)).

    q (b, hl, s, d/m), k (b, gl, s_kv, d/m), v (b, gl, s_kv, dv/m) are this rank's segments (k, v
    after any cache update); ``mask`` is the layer's raw attention mask (None: plain causal if the
    layer is causal, else none). The gathered k and v (keys padded at the end when s_kv' > s_kv) let
    the caller write a kv_shard cache without another collective.
    """
    b, hl, s, _ = q.shape
    seg, kv = ctx.seg, k.shape[-2]
    plan = plan_rows(seg.size, s, kv, causal=ctx.causal and mask is None)
    if plan.pad:
        q = F.pad(q, (0, 0, 0, plan.pad))  # padding rows at the end; their outputs are dropped
        if plan.causal:  # padding keys after the real ones: only the padding rows see them
            k, v = F.pad(k, (0, 0, 0, plan.pad)), F.pad(v, (0, 0, 0, plan.pad))
    q_rows = queries_to_rows(q, seg, plan)  # (b, hl, R, d)
    k_full, v_full = gather_width(k, seg, "k"), gather_width(v, seg, "v")  # (b, gl, s_kv', d), (.., dv)
    dv = v_full.shape[-1]
    qe, ke, ve = equal_head_dims(q_rows, k_full, v_full)
    blocks = plan.blocks(seg.rank)
    if plan.causal:
        out = causal_blocks_attention(qe, ke, ve, tuple(bl.rows for bl in blocks),
                                      tuple(bl.key_stop for bl in blocks), scale=ctx.scaling)
    else:
        start = blocks[0].start
        rows_mask = row_mask(mask, rows=(start, start + plan.rows_per_rank), q_len=s, kv_len=kv, causal=ctx.causal,
                             q_heads=ctx.q_heads, local_heads=hl, dtype=q.dtype, device=q.device)
        out = masked_attention(qe, ke, ve, rows_mask, scale=ctx.scaling)
    return rows_to_segments(out[..., :dv], seg, plan), k_full, v_full


def attend(ctx: AttendContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """seq_rows attention: (b, hl, s, dv/m) outputs for the row-parallel o_proj (see :func:`attend_full`).

    Example:
        >>> out = attend(AttendContext(mesh.axes.seg, scaling=0.125, causal=True), q, k, v, None)
    With a kv_shard cache (``ctx.store``), this rank's positions of the gathered k and v are written
    into it (no further collective).
    """
    out, k_full, v_full = attend_full(ctx, q, k, v, mask)
    if ctx.store is not None:  # only the first q_len gathered positions are real (the rest is padding)
        ctx.store.append_positions(k_full[:, :, :q.shape[-2]], v_full[:, :, :q.shape[-2]])
    return out
