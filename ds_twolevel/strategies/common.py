"""Pieces the dimension-split strategies (score_allreduce, qk_allgather) share: the layer's additive
mask for a call, soft-capping, softmax, GQA expansion, the rows -> segments all-to-all and the
projection ops of the roofline."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ds_twolevel.layers.masks import additive_mask
from ds_twolevel.parallel.collectives import all_to_all_dim0, copy_to_axis
from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.strategies.base import AttendContext, AttentionCall, Op

if TYPE_CHECKING:
    from ds_twolevel.strategies.base import ModelConfig


def needs_no_mask(call: AttentionCall) -> bool:
    """A causal call with no mask tensor whose keys are all visible or plainly causal (s == s_kv, or
    decode's single row: every cached key is visible)."""
    return call.plain_causal and (call.q_len == call.kv_len or call.q_len == 1)


def layer_mask(ctx: AttendContext, mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The additive (b, 1|h/n, s_q, s_kv) mask of the call (None: nothing masked); a per-head 4-D mask
    given for all h heads is sliced to this head group's."""
    c = ctx.call
    out = additive_mask(mask, batch=c.batch, q_len=c.q_len, kv_len=c.kv_len, causal=ctx.causal, dtype=q.dtype,
                        device=q.device)
    if out is not None and out.dim() == 4 and out.shape[1] not in (1, c.local_heads):
        out = out[:, list(ctx.q_heads)]
    return out


def softcap(ctx: AttendContext, scores: torch.Tensor) -> torch.Tensor:
    """Gemma2's score soft-capping (after the scale, before the mask), or the scores as they are."""
    if ctx.softcap is None:
        return scores
    return torch.tanh(scores / ctx.softcap) * ctx.softcap


def softmax_sinks(ctx: AttendContext, scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with the layer's attention sinks (GPT-OSS), or :func:`softmax` without them.

    Each head's sink logit joins every row as one more key and is dropped after the softmax (HF's
    ``eager_attention_forward``): ``p_j = e^(x_j - M) / (sum_k e^(x_k - M) + e^(s - M))``. ``scores`` is
    (b, h/n, rows, keys) or a view of it grouped by KV head. Every segment rank computes the same rows'
    probabilities, but each gets only its own value dims' share of their gradient, so the sink's gradient
    is summed over the segment axis (copy_to_axis: identity forward, all-reduce backward).
    """
    if ctx.sinks is None:
        return softmax(scores)
    heads, keys = ctx.sinks.shape[0], scores.shape[-1]
    grouped = scores.reshape(scores.shape[0], heads, -1, keys)  # (b, hl, rows, keys)
    sinks = copy_to_axis(ctx.sinks, ctx.seg, "sinks").to(scores.dtype).view(1, heads, 1, 1)
    logits = torch.cat([grouped, sinks.expand(grouped.shape[0], heads, grouped.shape[2], 1)], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)  # as HF does (bf16/fp16 overflow guard)
    return F.softmax(logits, dim=-1)[..., :-1].reshape(scores.shape)


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys in the scores' dtype. PyTorch's softmax kernels (CPU and CUDA) accumulate
    bf16/fp16 in fp32 and round once at the end - what ``softmax(dtype=float32).to(dtype)`` gives -
    without writing and re-reading an fp32 copy of the (materialised, s_q x s_kv) probabilities."""
    return F.softmax(scores, dim=-1)


def dropout(ctx: AttendContext, probs: torch.Tensor, q_len: int | None = None, row0: int = 0) -> torch.Tensor:
    """The call's keyed attention dropout of ``probs`` rows [row0, row0 + rows) (none: as they are)."""
    return probs if ctx.dropout is None else ctx.dropout(probs, q_len, row0)


def expand_kv(t: torch.Tensor, local_heads: int) -> torch.Tensor:
    """(b, gl, skv, *) -> (b, hl, skv, *): each KV head serves h/g consecutive query heads."""
    rep = local_heads // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def rows_to_segments(out: torch.Tensor, seg: AxisGroup, order: list[int] | None) -> torch.Tensor:
    """(b, hl, R, dv) outputs of this rank's query rows, all value dims -> (b, hl, sq, dv/m).

    One all-to-all over the segment group: segment j's dv/m columns of every rank's rows go to
    rank j. ``order``: the query blocks of the received rows, rank after rank (causal path;
    None: rank r's rows are the r-th contiguous 1/m of them).
    """
    b, hl, rows, dv = out.shape
    m = seg.size
    send = out.view(b, hl, rows, m, dv // m).permute(3, 0, 1, 2, 4)  # (m, b, hl, R, dv/m)
    recv = all_to_all_dim0(send, seg, "attn_rows").permute(1, 2, 0, 3, 4)  # (b, hl, m, R, dv/m)
    if order is None:
        return recv.reshape(b, hl, m * rows, dv // m)
    blocks = len(order)
    inverse = torch.tensor(sorted(range(blocks), key=order.__getitem__), device=out.device)
    return recv.reshape(b, hl, blocks, -1, dv // m).index_select(2, inverse).view(b, hl, m * rows, dv // m)


def projection_ops(model: "ModelConfig", call: AttentionCall, eb: int) -> tuple[Op, Op]:
    """The q/k/v and output projections of one rank of the dimension split (roofline)."""
    c, H, d = call, model.hidden, model.head_dim
    t, dl = c.batch * c.q_len, d // c.m
    hl, gl = c.local_heads, c.local_kv_heads
    qkv_out = (hl + 2 * gl) * dl
    return (Op("qkv_proj", 2 * t * H * qkv_out, (H * qkv_out + t * H + t * qkv_out) * eb),
            Op("o_proj", 2 * t * hl * dl * H, (hl * dl * H + t * hl * dl + t * H) * eb))


def mlp_activation(model: "ModelConfig", call: AttentionCall) -> int:
    """Elements of the MLP's live activations on one rank (the other candidate for a layer's peak)."""
    t = call.batch * call.q_len
    return (3 if model.gated else 2) * t * model.intermediate // (call.m * call.n)
