"""Two-level (n head groups x m dim segments) multi-head attention, exact w.r.t. the dense layer.

Rank (i, j) holds query heads [i*h/n, (i+1)*h/n) (and their KV heads) restricted to segment j of
each head's dims. Shapes below: b batch, s/sq/skv sequence, hl = h/n, gl = g/n, dl = d/m,
dvl = dv/m, H hidden.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_twolevel.costmodel.hardware import profile as hw_profile
from ds_twolevel.layers.dropout import DropoutKeys, apply_dropout
from ds_twolevel.layers.masks import zero_unattended_rows
from ds_twolevel.layers.qk_norm import QKNorm, rms_norm_partition
from ds_twolevel.layers.rope import apply_rope_segment, segment_cos_sin
from ds_twolevel.parallel.collectives import copy_to_axis, reduce_from_axis
from ds_twolevel.parallel.collectives import reduce_dtype as check_reduce_dtype
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelAxes, TwoLevelMesh
from ds_twolevel.parallel.sequence import gather_sequence, scatter_sequence
from ds_twolevel.parallel.ulysses import UlyssesExchange, check_ulysses
from ds_twolevel.sharding.partition import AttentionPartition, AttentionSpec, shard_dim
from ds_twolevel.strategies import registry
from ds_twolevel.strategies.base import AttendContext, AttentionCall


def tag_parallel(param: nn.Parameter, *, sharded: bool, partition_dim: int | None) -> None:
    """Megatron/DeepSpeed attributes: ``tensor_model_parallel`` parameters are counted on every
    model-parallel rank by gradient-norm code, the others only on model-parallel rank 0."""
    param.tensor_model_parallel = sharded
    param.partition_dim = partition_dim


class TwoLevelAttention(nn.Module):
    """Partition (i, j) of a multi-head attention layer.

    Args:
        hidden_size: H, model width (input and output features).
        spec: heads, KV heads, head dims and RoPE of the layer.
        axes: this rank's groups and coordinate: a ``TwoLevelMesh`` (its axes for this layer are
            taken), or ``mesh.axes_for(num_kv_heads)``.
        qkv_bias: q/k/v projections have biases.
        o_bias: output projection has a bias (added once, after the all-reduce).
        qk_norm_eps: if set, Qwen3-style per-head RMSNorm of q and k (over the full d).
        qk_norm: the q/k RMSNorm in full (scope, weight formula, rounding); overrides ``qk_norm_eps``.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before the mask (Gemma2; no fused SDPA).
        causal: causal (decoder) or bidirectional (encoder) attention.
        strategy: "cost_model" (least predicted time on ``hardware``) or one of ``registry.layer_choices()``.
        hardware: profile (or its name) "cost_model" plans with; None: the input device's (``default_profile``).
        reduce_dtype: dtype of every sum over ranks when wider than the activations' (bf16 partials added
            in fp32, rounded once; twice those bytes); "input"/None: the activations' (Megatron's, AutoTP's).
        dropout: attention-probability dropout (training only).
        dropout_seed: seed of the dropout stream shared by all ranks of the layer.
        scaling: score scale; default ``1/sqrt(d)`` of the full head dim.
        kv_replication: allow n > g by replicating KV heads across head groups.
        layer_idx: index used with the KV cache.
        sequence_parallel: the input and output are this rank's s/(n*m) tokens of the residual stream
            (:mod:`ds_twolevel.parallel.sequence`): all-gathered before the projections,
            reduce-scattered after o_proj. No KV cache (a call with one is refused); an attribute, so a
            model can switch it per call.

    With ``axes.sp.size > 1`` (Ulysses outside the layer's n*m ranks) the attribute ``ulysses``, switched
    per call like ``sequence_parallel``, makes the input and output this rank's s/sp tokens:
    see :func:`ulysses_forward`.

    Example:
        >>> mesh = TwoLevelLayout(n=2, m=2).build()
        >>> attn = TwoLevelAttention.from_dense(dense_attn, mesh.axes)
        >>> y = attn(x, position_embeddings=(cos, sin))
    """

    def __init__(
        self,
        hidden_size: int,
        spec: AttentionSpec,
        axes: TwoLevelAxes | TwoLevelMesh,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        qk_norm: QKNorm | None = None,
        softcap: float | None = None,
        causal: bool = True,
        strategy: str = registry.AUTO,
        hardware: Any = None,
        reduce_dtype: Any = torch.float32,
        dropout: float = 0.0,
        dropout_seed: int = 0,
        scaling: float | None = None,
        kv_replication: bool = False,
        layer_idx: int = 0,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(axes, TwoLevelMesh):  # validate before looking the layer's axes up
            AttentionPartition(spec, axes.layout.n, axes.layout.m, kv_replication=kv_replication)
            axes = axes.axes_for(spec.num_kv_heads)
        strategy = registry.check_layer_strategy(strategy)
        axes = axes.reducing_in(check_reduce_dtype(reduce_dtype))
        # validates h, g, d against (n, m) before any parameter or collective exists
        self.part = AttentionPartition(spec, axes.n, axes.m, kv_replication=kv_replication)
        self.ulysses, self.exchange = False, _ulysses_exchange(spec, self.part, axes, kv_replication, dropout)
        if self.part.replicated_kv and axes.kv_rep.size != axes.n // spec.num_kv_heads:
            raise ValueError(f"{spec.name}: each KV head is replicated on {axes.n // spec.num_kv_heads} head groups, "
                             f"whose gradients must be summed: pass the TwoLevelMesh, or mesh.axes_for({spec.num_kv_heads})")
        self.spec, self.axes, self.hidden_size, self.reduce_dtype = spec, axes, hidden_size, axes.tp.reduce_dtype
        self.causal, self.strategy, self.layer_idx, self.sequence_parallel = causal, strategy, layer_idx, sequence_parallel
        self.hardware = None if hardware is None else hw_profile(hardware)
        self.dropout, self.dropout_seed, self.dropout_keys = dropout, dropout_seed, DropoutKeys()
        self.scaling = scaling if scaling is not None else 1.0 / math.sqrt(spec.head_dim)
        self.qk_norm, self.softcap = _norm_and_softcap(qk_norm, qk_norm_eps, softcap, spec.name)
        self.qk_norm_eps = None if self.qk_norm is None else self.qk_norm.eps
        hl, gl = self.part.local_heads, self.part.local_kv_heads
        dl, dvl = self.part.local_dim, self.part.local_v_dim
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, hl * dl, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(hidden_size, gl * dl, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(hidden_size, gl * dvl, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(hl * dvl, hidden_size, bias=False, **kw)
        self.o_bias = nn.Parameter(torch.zeros(hidden_size, **kw)) if o_bias else None
        self.q_norm_weight = self.k_norm_weight = None
        if self.qk_norm is not None:
            whole = self.qk_norm.scope == "projection"  # weight slice: (head group, segment) rows, else d/m dims
            self.q_norm_weight = nn.Parameter(torch.ones(hl * dl if whole else dl, **kw))
            self.k_norm_weight = nn.Parameter(torch.ones(gl * dl if whole else dl, **kw))
        _tag_parameters(self)
        self._register_rope_tables(device)

    def _register_rope_tables(self, device: torch.device | str | None) -> None:
        """Buffers that apply RoPE to this segment's local dims (``AttentionPartition.rope_tables``)."""
        buffer_device = None if device is None or torch.device(device).type == "meta" else device
        for name, table in zip(("rope_cos_index", "rope_partner", "rope_sign"), self.part.rope_tables(self.axes.j)):
            self.register_buffer(name, table.to(buffer_device), persistent=False)

    # -- dense <-> partition ---------------------------------------------------------------------
    def shard_index(self, tp_rank: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
        """Dense parameter name -> (index, dim) of the slice held by ``tp_rank`` (default: this rank)."""
        part = self.part
        i, j = (self.axes.i, self.axes.j) if tp_rank is None else divmod(tp_rank, self.axes.m)
        out = {
            "q_proj.weight": (part.q_rows(i, j), 0), "q_proj.bias": (part.q_rows(i, j), 0),
            "k_proj.weight": (part.k_rows(i, j), 0), "k_proj.bias": (part.k_rows(i, j), 0),
            "v_proj.weight": (part.v_rows(i, j), 0), "v_proj.bias": (part.v_rows(i, j), 0),
            "o_proj.weight": (part.o_cols(i, j), 1),
            "q_norm_weight": (torch.tensor(part.qk_dims(j)), 0),
            "k_norm_weight": (torch.tensor(part.qk_dims(j)), 0),
        }
        if self.qk_norm is not None and self.qk_norm.scope == "projection":  # (h*d,) / (g*d,) weights
            out["q_norm_weight"], out["k_norm_weight"] = (part.q_rows(i, j), 0), (part.k_rows(i, j), 0)
        return {k: v for k, v in out.items() if _has_parameter(self, k)}

    @torch.no_grad()
    def load_dense_state(self, dense: dict[str, torch.Tensor]) -> None:
        """Copy this rank's slices out of dense weights named like :meth:`shard_index`'s keys
        (plus ``o_bias``)."""
        for name, (index, dim) in self.shard_index().items():
            self.get_parameter(name).copy_(shard_dim(dense[name], index, dim))
        if self.o_bias is not None:
            self.o_bias.copy_(dense["o_bias"])

    @classmethod
    def from_dense(cls, dense: Any, axes: TwoLevelAxes | TwoLevelMesh, **overrides: Any) -> "TwoLevelAttention":
        """Build this rank's partition of a :class:`~ds_twolevel.testing.reference.DenseAttention`."""
        kwargs = dict(dense.twolevel_kwargs())
        kwargs.update(overrides)
        weight = dense.q_proj.weight
        layer = cls(dense.hidden_size, dense.spec, axes, device=weight.device, dtype=weight.dtype, **kwargs)
        layer.load_dense_state(dense.dense_state())
        return layer

    # -- forward ---------------------------------------------------------------------------------
    def resolve_strategy(self, call: AttentionCall, strategy: str | None = None, device: Any = None) -> str:
        """The strategy that runs ``call`` on ``device`` (:func:`~ds_twolevel.strategies.registry.plan_call`)."""
        return self._plan(call, strategy, device).name

    def attention_call(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: Any,
                       kv_len: int | None = None) -> AttentionCall:
        """The :class:`AttentionCall` of one forward (``kv_len`` default: cached + new positions)."""
        return attention_call(self, hidden_states, attention_mask, kv_cache, kv_len)

    def _plan(self, call: AttentionCall, strategy: str | None, device: Any = None) -> registry.Plan:
        hw = self.hardware if self.hardware is not None else hw_profile(None, device or self.q_proj.weight.device)
        try:
            return registry.plan_call(call, strategy or self.strategy, hw)
        except ValueError as e:
            raise ValueError(f"layer {self.layer_idx}: {e}") from None

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: Any = None,
        strategy: str | None = None,
    ) -> torch.Tensor:
        """(b, s, H) replicated input -> (b, s, H) replicated output; with ``sequence_parallel``,
        (b, s/p, H) local tokens -> (b, s/p, H), p = n*m (``position_embeddings`` and
        ``attention_mask`` then cover the whole sequence).

        Project -> q/k norm and RoPE -> KV cache -> ``plan.strategy.attend`` -> o_proj. The plan is
        made before any collective, so a strategy that cannot run the call is refused first.
        ``position_embeddings``: full-rotary (cos, sin), each (b, s, r), as Hugging Face passes
        them. ``attention_mask``: see :func:`ds_twolevel.layers.masks.additive_mask`. ``kv_cache``: any
        object with ``update(k, v, layer_idx)`` (this rank's slice is stored), or a cache in the
        kv_shard layout (``position_store``).
        """
        if self.ulysses and self.axes.sp.size > 1:
            return ulysses_forward(self, hidden_states, position_embeddings, attention_mask, kv_cache, strategy)
        sp = sequence_parallel_call(self, hidden_states, position_embeddings, kv_cache)
        if sp:  # (b, s/p, H) local tokens: plan for the whole sequence they belong to
            b, s_local, hidden = hidden_states.shape
            whole = torch.empty((b, s_local * self.axes.tp.size, hidden), dtype=hidden_states.dtype, device="meta")
            call = self.attention_call(whole, attention_mask, kv_cache)
        else:
            call = self.attention_call(hidden_states, attention_mask, kv_cache)
        plan = self._plan(call, strategy, hidden_states.device)
        if sp:
            x = gather_sequence(hidden_states, self.axes.tp, "attn_in")  # (b, s, H)
        else:
            x = copy_to_axis(hidden_states, self.axes.tp, "attn_in")
        b, s, _ = x.shape
        key = self.dropout_keys.key(x) if self._dropping else None  # the whole sequence: one key per layer call
        q, k, v = self._project(x, position_embeddings)
        store = None
        if call.cache_layout != "segments":
            store = kv_cache.position_store(self.layer_idx, self.axes.seg.size, self.axes.seg.rank)
        elif kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx)  # (b, gl, skv, dl), (b, gl, skv, dvl)
            if k.shape[-2] != call.kv_len:  # e.g. a sliding-window cache: plan for what it returned
                call = self.attention_call(hidden_states, attention_mask, None, kv_len=k.shape[-2])
                plan = self._plan(call, strategy, hidden_states.device)
        out = plan.strategy.attend(self._context(call, store, key), q, k, v, attention_mask)
        out = zero_unattended_rows(out, attention_mask, causal=self.causal, heads=self.part.q_heads(self.axes.i))
        out = out.transpose(1, 2).reshape(b, s, -1)  # (b, s, hl*dvl)
        if not sp:
            y = reduce_from_axis(self.o_proj(out), self.axes.tp, "attn_out")  # (b, s, H)
            return y if self.o_bias is None else y + self.o_bias
        y = scatter_sequence(self.o_proj(out), self.axes.tp, "attn_out")  # (b, s/p, H)
        # the bias meets this rank's tokens only: its gradient is summed over the layer's ranks
        return y if self.o_bias is None else y + copy_to_axis(self.o_bias, self.axes.tp, "replicated_grad")

    def _project(self, x: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's q (b, hl, s, dl), k (b, gl, s, dl), v (b, gl, s, dvl), normed and rotated."""
        b, s, _ = x.shape
        hl, gl, dl, dvl = self.part.local_heads, self.part.local_kv_heads, self.part.local_dim, self.part.local_v_dim
        q = self.q_proj(x).view(b, s, hl, dl).transpose(1, 2)
        k = kv_linear(self, x, self.k_proj, "k").view(b, s, gl, dl).transpose(1, 2)
        v = kv_linear(self, x, self.v_proj, "v").view(b, s, gl, dvl).transpose(1, 2)
        if self.qk_norm is not None:
            q, k = qk_norms(self, q, k)
        if self.spec.rot_dim:
            if position_embeddings is None:
                raise ValueError("this layer uses RoPE: pass position_embeddings=(cos, sin)")
            cos, sin = position_embeddings
            cos_seg, sin_seg = segment_cos_sin(cos.to(q.dtype), sin.to(q.dtype), self.rope_cos_index, self.rope_sign)
            q = apply_rope_segment(q, cos_seg, sin_seg, self.rope_partner)
            k = apply_rope_segment(k, cos_seg, sin_seg, self.rope_partner)
        return q, k, v

    def _context(self, call: AttentionCall, store: Any, key: int | None) -> AttendContext:
        drop = None if key is None else functools.partial(apply_dropout, self, key=key)
        return AttendContext(seg=self.axes.seg, scaling=self.scaling, causal=self.causal,
                             q_heads=self.part.q_heads(self.axes.i), store=store, call=call, softcap=self.softcap,
                             dropout=drop)

    @property
    def _dropping(self) -> bool:
        return self.training and self.dropout > 0


def _tag_parameters(layer: "TwoLevelAttention") -> None:
    """Tensor-parallel attributes of a layer's parameters (:func:`tag_parallel`)."""
    for p in layer.q_proj.parameters():
        tag_parallel(p, sharded=True, partition_dim=0)
    for p in (*layer.k_proj.parameters(), *layer.v_proj.parameters()):
        # a replicated KV head is counted (in gradient norms) on its first copy only
        tag_parallel(p, sharded=layer.axes.kv_rep.rank == 0, partition_dim=0)
    tag_parallel(layer.o_proj.weight, sharded=True, partition_dim=1)
    if layer.o_bias is not None:
        tag_parallel(layer.o_bias, sharded=False, partition_dim=None)
    if layer.qk_norm is not None and layer.qk_norm.scope == "projection":
        # sliced like q/k rows: q's slice has one owner, k's its replicated copies
        tag_parallel(layer.q_norm_weight, sharded=True, partition_dim=0)
        tag_parallel(layer.k_norm_weight, sharded=layer.axes.kv_rep.rank == 0, partition_dim=0)
        return
    for w in (layer.q_norm_weight, layer.k_norm_weight):
        if w is not None:
            # sharded over segments, replicated over head groups: count it on group i == 0 only
            tag_parallel(w, sharded=layer.axes.i == 0, partition_dim=0)


def _ulysses_exchange(spec: AttentionSpec, part: AttentionPartition, axes: TwoLevelAxes, kv_replication: bool,
                      dropout: float) -> UlyssesExchange | None:
    """The layer's all-to-alls over sp (None when sp = 1), its shapes checked against Ulysses' rules."""
    sp = axes.sp.size
    if sp == 1:
        return None
    check_ulysses(spec.name, heads=spec.num_heads, kv_heads=spec.num_kv_heads, n=axes.n, sp=sp,
                  head_dim=spec.head_dim, v_head_dim=spec.dv, kv_replication=kv_replication)
    if dropout > 0:
        raise ValueError(f"{spec.name}: attention dropout ({dropout}) is not supported with Ulysses sp={sp}; "
                         f"set attention_dropout to 0 or sequence_parallel_size to 1")
    return UlyssesExchange(axes.sp, heads=part.local_heads, kv_heads=part.local_kv_heads, head_dim=part.local_dim)


def ulysses_forward(layer: TwoLevelAttention, hidden_states: torch.Tensor, position_embeddings: Any,
                    attention_mask: torch.Tensor | None, kv_cache: Any, strategy: str | None) -> torch.Tensor:
    """(b, s/sp, H) this rank's tokens (the same on the layer's n*m ranks) -> (b, s/sp, H).

    Project, q/k norm and RoPE on the local tokens (``position_embeddings`` of their global positions),
    all-to-all over sp to (b, h/(n*sp), s, d/m), the strategy over the whole sequence (``attention_mask``:
    None or the (b, s) padding mask of the whole sequence), the inverse all-to-all, o_proj, the all-reduce
    over the layer's n*m ranks.
    """
    sp, part = layer.axes.sp, layer.part
    if kv_cache is not None:
        raise ValueError(f"layer {layer.layer_idx}: Ulysses (sp={sp.size}) runs training and prefill without a KV "
                         f"cache; a call with one runs the whole prompt on every rank with ``ulysses`` off (a "
                         f"patched model switches it off for such calls)")
    b, s_local, hidden = hidden_states.shape
    whole = torch.empty((b, s_local * sp.size, hidden), dtype=hidden_states.dtype, device="meta")
    call = layer.attention_call(whole, attention_mask, None)
    call = dataclasses.replace(call, local_heads=part.local_heads // sp.size,
                               local_kv_heads=max(part.local_kv_heads // sp.size, 1))
    plan = layer._plan(call, strategy, hidden_states.device)
    q, k, v = layer._project(copy_to_axis(hidden_states, layer.axes.tp, "attn_in"), position_embeddings)
    q, k, v = layer.exchange.to_heads(q, k, v)  # (b, hl/sp, s, dl), (b, gl/sp or 1, s, dl)
    per = part.local_heads // sp.size
    heads = list(part.q_heads(layer.axes.i))[sp.rank * per:(sp.rank + 1) * per]
    ctx = dataclasses.replace(layer._context(call, None, None), q_heads=heads)
    out = plan.strategy.attend(ctx, q, k, v, attention_mask)  # (b, hl/sp, s, dvl)
    out = zero_unattended_rows(out, attention_mask, causal=layer.causal, heads=heads)
    y = reduce_from_axis(layer.o_proj(layer.exchange.to_sequence(out)), layer.axes.tp, "attn_out")  # (b, s/sp, H)
    return y if layer.o_bias is None else y + layer.o_bias


def qk_norms(layer: TwoLevelAttention, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k (:mod:`ds_twolevel.layers.qk_norm`): per head, the sums of squares are
    all-reduced over segments; over the whole projection, over the tensor-parallel axis."""
    norm, s, axes = layer.qk_norm, layer.spec, layer.axes
    if norm.scope == "head":
        kw = dict(sumsq_axis=axes.seg, features=s.head_dim, copies=1)
        return (rms_norm_partition(q, layer.q_norm_weight, norm, weight_axis=axes.heads, tag="q", **kw),
                rms_norm_partition(k, layer.k_norm_weight, norm, weight_axis=axes.heads, tag="k", **kw))
    single = AxisGroup.single("q_norm")  # each q feature lives on one rank: no gradient sum
    return (rms_norm_partition(q, layer.q_norm_weight, norm, sumsq_axis=axes.tp, weight_axis=single,
                               features=s.num_heads * s.head_dim, copies=1, tag="q"),
            rms_norm_partition(k, layer.k_norm_weight, norm, sumsq_axis=axes.tp, weight_axis=axes.kv_rep,
                               features=s.num_kv_heads * s.head_dim, copies=axes.kv_rep.size, tag="k"))


def sequence_parallel_call(layer: TwoLevelAttention, hidden_states: torch.Tensor, position_embeddings: Any,
                           kv_cache: Any) -> bool:
    """Whether this call of ``layer`` runs sequence-parallel; its inputs checked (before any collective)."""
    if not layer.sequence_parallel or layer.axes.tp.size == 1:
        return False
    p, s_local = layer.axes.tp.size, hidden_states.shape[1]
    if kv_cache is not None:
        raise ValueError(f"layer {layer.layer_idx}: sequence_parallel runs training and prefill without a KV "
                         f"cache; generate with sequence_parallel off (a patched model switches it off for "
                         f"calls with a cache)")
    if position_embeddings is not None and position_embeddings[0].shape[-2] != p * s_local:
        raise ValueError(f"layer {layer.layer_idx}: sequence_parallel over {p} ranks: {s_local} local tokens "
                         f"belong to a sequence of {p * s_local}, but the RoPE tables cover "
                         f"{position_embeddings[0].shape[-2]} positions; pass (cos, sin) of the whole sequence")
    return True


def kv_linear(layer: TwoLevelAttention, x: torch.Tensor, proj: nn.Linear, tag: str) -> torch.Tensor:
    """K/V projection; a KV head replicated on n/g head groups sums its weight gradients."""
    rep = layer.axes.kv_rep
    if rep.size == 1:
        return proj(x)
    bias = None if proj.bias is None else copy_to_axis(proj.bias, rep, f"{tag}_bias")
    return F.linear(x, copy_to_axis(proj.weight, rep, f"{tag}_weight"), bias)


def attention_call(layer: TwoLevelAttention, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   kv_cache: Any, kv_len: int | None = None) -> AttentionCall:
    """The :class:`AttentionCall` of one forward of ``layer``, made before any projection."""
    b, s, _ = hidden_states.shape
    layout, cached = _cache_state(layer, kv_cache)
    skv = cached + s if kv_len is None else kv_len
    plain = attention_mask is None and layer.causal
    part, norm = layer.part, layer.qk_norm
    return AttentionCall(
        batch=b, q_len=s, kv_len=skv, hidden=layer.hidden_size, local_heads=part.local_heads,
        local_kv_heads=part.local_kv_heads, head_dim=layer.spec.head_dim, n=layer.axes.n, m=layer.axes.m,
        qk_norm=norm is not None, kv_rep=layer.axes.kv_rep.size, qkv_bias=layer.q_proj.bias is not None,
        causal_blocks=plain and s == skv and s > 1 and not layer._dropping, v_head_dim=layer.spec.dv,
        qk_norm_scope=norm.scope if norm else "head", plain_causal=plain, dropout=layer._dropping,
        softcap=layer.softcap is not None, cache_layout=layout, cached=cached,
        grad=torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters()),
        element_size=hidden_states.element_size(), reduce_size=reduce_size(layer.reduce_dtype))


def reduce_size(dtype: torch.dtype | None) -> int:
    """:attr:`AttentionCall.reduce_size` of a layer's ``reduce_dtype`` (0: sums in the activations' dtype)."""
    return 0 if dtype is None else dtype.itemsize


def _cache_state(layer: TwoLevelAttention, kv_cache: Any) -> tuple[str, int]:
    """(layout, positions cached before the call) of a layer's KV cache."""
    if kv_cache is None:
        return "segments", 0
    layout = getattr(kv_cache, "kv_layout", "segments")
    if layout != "segments":
        store = kv_cache.position_store(layer.layer_idx, layer.axes.seg.size, layer.axes.seg.rank)
        return layout, store.global_length
    length = getattr(kv_cache, "get_seq_length", None)
    return layout, int(length(layer.layer_idx)) if length is not None else 0


class SeqShardAttention(TwoLevelAttention):
    """A :class:`TwoLevelAttention` whose strategy defaults to ``"seq_rows"``: prefill and training by
    query rows, decode (one row) by "cost_model", and kv_shard whenever the KV cache has the kv_shard layout.

    Example:
        >>> layer = SeqShardAttention.from_dense(dense_attn, mesh)
        >>> cache = SeqShardCache(layout="kv_shard")
        >>> y = layer(x, position_embeddings=rope, kv_cache=cache)   # prefill: seq_rows
        >>> y = layer(x1, position_embeddings=rope1, kv_cache=cache)  # decode: kv_shard
    """

    def __init__(self, *args: Any, strategy: str = "seq_rows", **kwargs: Any) -> None:
        super().__init__(*args, strategy=strategy, **kwargs)


def _norm_and_softcap(qk_norm: QKNorm | None, eps: float | None, softcap: float | None,
                      name: str) -> tuple[QKNorm | None, float | None]:
    """The layer's q/k norm (``qk_norm_eps`` alone: Qwen3's per-head RMSNorm) and validated soft-cap."""
    if qk_norm is None and eps is not None:
        qk_norm = QKNorm(float(eps))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be a number > 0 or None, got {softcap!r}")
    return qk_norm, softcap


def _has_parameter(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:  # e.g. "q_proj.bias" of a projection without bias
        return False
