"""Wiring of the sequence-sharded strategies into a layer, until the strategy registry lands.

:func:`seq_forward` is ``TwoLevelAttention.forward`` with the score-path dispatch extended: it routes
a call to seq_rows or kv_shard (:func:`route`) and otherwise hands the call, untouched, to
``TwoLevelAttention.forward``. :class:`SeqShardAttention` is a ``TwoLevelAttention`` whose forward is
:func:`seq_forward`. The integration replaces all of this with registry entries: ``route`` becomes
part of ``plan_call`` and the body of ``seq_forward`` is the layer's own forward (project -> norm/rope
-> cache -> ``plan.strategy.attend`` -> o_proj), so nothing here survives it but the strategies.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.layers.masks import zero_unattended_rows
from ds_twolevel.layers.rope import apply_rope_segment, segment_cos_sin
from ds_twolevel.seqshard import comm, kv_shard, seq_rows
from ds_twolevel.seqshard.base import AttendContext, SeqCall

PREFILL_CHOICES = (None, "seq_rows")


def cache_layout(kv_cache: Any) -> str:
    """"kv_shard" for a cache built with that layout, else "segments" (also for KVCache / DynamicCache)."""
    return getattr(kv_cache, "kv_layout", "segments") if kv_cache is not None else "segments"


def position_store(layer: TwoLevelAttention, kv_cache: Any):
    """The layer's kv_shard store in ``kv_cache``."""
    return kv_cache.position_store(layer.layer_idx, layer.axes.seg.size, layer.axes.seg.rank)


def seq_call(layer: TwoLevelAttention, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: Any) -> SeqCall:
    """The :class:`SeqCall` of one forward, before any projection (``kv_len`` counts the cached keys)."""
    b, s, _ = x.shape
    layout = cache_layout(kv_cache)
    if layout == "kv_shard":
        cached = position_store(layer, kv_cache).global_length
    else:
        cached = 0 if kv_cache is None else kv_cache.get_seq_length(layer.layer_idx)
    part = layer.part
    return SeqCall(b, s, cached + s, layer.hidden_size, part.local_heads, part.local_kv_heads, layer.spec.head_dim,
                   layer.axes.m, layer.axes.n, layer.q_norm_weight is not None, v_head_dim=layer.spec.dv,
                   causal_blocks=mask is None and layer.causal and cached == 0 and s > 1,
                   plain_causal=mask is None and layer.causal, dropout=layer._dropping,
                   grad=torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters()),
                   kv_rep=layer.axes.kv_rep.size, qkv_bias=layer.q_proj.bias is not None,
                   cache_layout=layout, cached=cached, element_size=x.element_size())


def route(layer: TwoLevelAttention, call: SeqCall, prefill: str | None) -> str | None:
    """"seq_rows", "kv_shard" or None (the layer's own strategies). A kv_shard cache admits only the
    new strategies; refusal is a ValueError naming the reason, before any collective."""
    if call.cache_layout == "kv_shard":
        name = "kv_shard" if call.cached else "seq_rows"
        reason = (kv_shard if name == "kv_shard" else seq_rows).why_not(call)
        if reason:
            raise ValueError(f"layer {layer.layer_idx}: {reason}")
        return name
    if prefill == "seq_rows" and call.q_len > 1:
        reason = seq_rows.why_not(call)
        if reason:
            raise ValueError(f"layer {layer.layer_idx}: {reason}")
        return "seq_rows"
    return None


def _norm(layer: TwoLevelAttention, x: torch.Tensor, weight: torch.Tensor, tag: str) -> torch.Tensor:
    """``TwoLevelAttention._segment_rms_norm`` through the simulated-axis collectives."""
    x32 = x.float()
    sumsq = comm.all_reduce_both(x32.pow(2).sum(-1, keepdim=True), layer.axes.seg, f"{tag}_sumsq")
    x32 = x32 * torch.rsqrt(sumsq / layer.spec.head_dim + layer.qk_norm_eps)
    return comm.copy_to_axis(weight, layer.axes.heads, f"{tag}_norm_weight") * x32.to(x.dtype)


def _kv_linear(layer: TwoLevelAttention, x: torch.Tensor, proj: torch.nn.Linear, tag: str) -> torch.Tensor:
    rep: AxisGroup = layer.axes.kv_rep
    if rep.size == 1:
        return proj(x)
    bias = None if proj.bias is None else comm.copy_to_axis(proj.bias, rep, f"{tag}_bias")
    return F.linear(x, comm.copy_to_axis(proj.weight, rep, f"{tag}_weight"), bias)


def project(layer: TwoLevelAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
    """q (b, hl, s, d/m), k (b, gl, s, d/m), v (b, gl, s, dv/m) of this rank, normed and rotated - the
    first half of ``TwoLevelAttention.forward``."""
    b, s, _ = x.shape
    part = layer.part
    q = layer.q_proj(x).view(b, s, part.local_heads, part.local_dim).transpose(1, 2)
    k = _kv_linear(layer, x, layer.k_proj, "k").view(b, s, part.local_kv_heads, part.local_dim).transpose(1, 2)
    v = _kv_linear(layer, x, layer.v_proj, "v").view(b, s, part.local_kv_heads, part.local_v_dim).transpose(1, 2)
    if layer.q_norm_weight is not None:
        q, k = _norm(layer, q, layer.q_norm_weight, "q"), _norm(layer, k, layer.k_norm_weight, "k")
    if layer.spec.rot_dim:
        if rope is None:
            raise ValueError("this layer uses RoPE: pass position_embeddings=(cos, sin)")
        cos, sin = segment_cos_sin(rope[0].to(q.dtype), rope[1].to(q.dtype), layer.rope_cos_index, layer.rope_sign)
        q = apply_rope_segment(q, cos, sin, layer.rope_partner)
        k = apply_rope_segment(k, cos, sin, layer.rope_partner)
    return q, k, v


def seq_forward(layer: TwoLevelAttention, hidden_states: torch.Tensor, *, prefill: str | None = "seq_rows",
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: Any = None,
                strategy: str | None = None) -> torch.Tensor:
    """(b, s, H) -> (b, s, H) through seq_rows / kv_shard where :func:`route` sends the call, else
    through ``TwoLevelAttention.forward`` unchanged."""
    call = seq_call(layer, hidden_states, attention_mask, kv_cache)
    chosen = route(layer, call, strategy if strategy == "seq_rows" else prefill)
    if chosen is None:
        return TwoLevelAttention.forward(layer, hidden_states, position_embeddings=position_embeddings,
                                         attention_mask=attention_mask, kv_cache=kv_cache, strategy=strategy)
    b, s, _ = hidden_states.shape
    x = comm.copy_to_axis(hidden_states, layer.axes.tp, "attn_in")
    q, k, v = project(layer, x, position_embeddings)
    store = position_store(layer, kv_cache) if call.cache_layout == "kv_shard" else None
    ctx = AttendContext(layer.axes.seg, layer.scaling, layer.causal, layer.part.q_heads(layer.axes.i), store)
    if chosen == "kv_shard":
        out = kv_shard.attend(ctx, q, k, v, attention_mask)
    else:
        if kv_cache is not None and store is None:
            k, v = kv_cache.update(k, v, layer.layer_idx)  # dimension layout: (b, gl, s_kv, d/m)
        out, k_full, v_full = seq_rows.attend_full(ctx, q, k, v, attention_mask)
        if store is not None:
            kv_shard.write_prefill(store, k_full, v_full, s)
    out = zero_unattended_rows(out, attention_mask, causal=layer.causal, heads=layer.part.q_heads(layer.axes.i))
    out = out.transpose(1, 2).reshape(b, s, -1)  # (b, s, hl*dv/m)
    y = comm.reduce_from_axis(layer.o_proj(out), layer.axes.tp, "attn_out")  # (b, s, H)
    return y if layer.o_bias is None else y + layer.o_bias


class SeqShardAttention(TwoLevelAttention):
    """A :class:`~ds_twolevel.layers.attention.TwoLevelAttention` whose prefill runs seq_rows (``prefill``) and
    whose decode runs kv_shard whenever the KV cache has the kv_shard layout.

    Example:
        >>> layer = SeqShardAttention.from_dense(dense_attn, mesh)
        >>> cache = SeqShardCache(layout="kv_shard")
        >>> y = layer(x, position_embeddings=rope, kv_cache=cache)   # prefill: seq_rows
        >>> y = layer(x1, position_embeddings=rope1, kv_cache=cache)  # decode: kv_shard
    """

    prefill: str | None = "seq_rows"
    """"seq_rows", or None for the layer's own strategy (a kv_shard cache still forces the new ones)."""

    def forward(self, hidden_states: torch.Tensor, *, position_embeddings=None, attention_mask=None, kv_cache=None,
                strategy: str | None = None) -> torch.Tensor:
        return seq_forward(self, hidden_states, prefill=self.prefill, position_embeddings=position_embeddings,
                           attention_mask=attention_mask, kv_cache=kv_cache, strategy=strategy)
