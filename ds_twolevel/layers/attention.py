"""Two-level (n head groups x m dim segments) multi-head attention, exact w.r.t. the dense layer.

Rank (i, j) holds query heads [i*h/n, (i+1)*h/n) (and their KV heads) restricted to segment j of
each head's dims. Shapes below: b batch, s/sq/skv sequence, hl = h/n, gl = g/n, dl = d/m,
dvl = dv/m, H hidden.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_twolevel.parallel.collectives import (all_gather_dim, all_reduce_both, all_to_all_dim0, copy_to_axis, reduce_from_axis,
                          reduce_scatter_dim)
from ds_twolevel.costmodel import (STRATEGIES, AttentionCall, causal_block_owner, causal_block_rows, choose_strategy,
                        split_softmax, values_gathered)
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelAxes, TwoLevelMesh
from ds_twolevel.layers.masks import additive_mask, dropout_keep_mask, zero_unattended_rows
from ds_twolevel.sharding.partition import AttentionPartition, AttentionSpec, shard_dim
from ds_twolevel.layers.qk_norm import QKNorm, rms_norm_partition
from ds_twolevel.layers.rope import apply_rope_segment, segment_cos_sin


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
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before the mask (Gemma2).
            Fused SDPA cannot do that: "qk_allgather" then computes its scores explicitly.
        causal: causal (decoder) or bidirectional (encoder) attention.
        strategy: "score_allreduce", "qk_allgather" or "auto" (fewer bytes for the call).
        dropout: attention-probability dropout (training only).
        dropout_seed: seed of the dropout stream shared by all ranks of the layer.
        scaling: score scale; default ``1/sqrt(d)`` of the full head dim.
        kv_replication: allow n > g by replicating KV heads across head groups.
        layer_idx: index used with the KV cache.

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
        strategy: str = "auto",
        dropout: float = 0.0,
        dropout_seed: int = 0,
        scaling: float | None = None,
        kv_replication: bool = False,
        layer_idx: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(axes, TwoLevelMesh):  # validate before axes_for creates any group
            AttentionPartition(spec, axes.layout.n, axes.layout.m, kv_replication=kv_replication)
            axes = axes.axes_for(spec.num_kv_heads)
        if strategy not in (*STRATEGIES, "auto"):
            raise ValueError(f"strategy must be one of {STRATEGIES + ('auto',)}, got {strategy!r}")
        # validates h, g, d against (n, m) before any parameter or collective exists
        self.part = AttentionPartition(spec, axes.n, axes.m, kv_replication=kv_replication)
        if self.part.replicated_kv and axes.kv_rep.size != axes.n // spec.num_kv_heads:
            raise ValueError(
                f"{spec.name}: each KV head is replicated on {axes.n // spec.num_kv_heads} head groups, whose "
                f"gradients must be summed: pass the TwoLevelMesh, or mesh.axes_for({spec.num_kv_heads})"
            )
        self.spec, self.axes, self.hidden_size = spec, axes, hidden_size
        self.causal, self.strategy, self.layer_idx = causal, strategy, layer_idx
        self.dropout, self.dropout_seed, self._dropout_step = dropout, dropout_seed, 0
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
        self._tag_parameters()
        cos_index, partner, sign = self.part.rope_tables(axes.j)
        buffer_device = None if device is None or torch.device(device).type == "meta" else device
        self.register_buffer("rope_cos_index", cos_index.to(buffer_device), persistent=False)
        self.register_buffer("rope_partner", partner.to(buffer_device), persistent=False)
        self.register_buffer("rope_sign", sign.to(buffer_device), persistent=False)

    def _tag_parameters(self) -> None:
        for p in self.q_proj.parameters():
            tag_parallel(p, sharded=True, partition_dim=0)
        for p in (*self.k_proj.parameters(), *self.v_proj.parameters()):
            # a replicated KV head is counted (in gradient norms) on its first copy only
            tag_parallel(p, sharded=self.axes.kv_rep.rank == 0, partition_dim=0)
        tag_parallel(self.o_proj.weight, sharded=True, partition_dim=1)
        if self.o_bias is not None:
            tag_parallel(self.o_bias, sharded=False, partition_dim=None)
        if self.qk_norm is not None and self.qk_norm.scope == "projection":
            # sliced like q/k rows: q's slice has one owner, k's its replicated copies
            tag_parallel(self.q_norm_weight, sharded=True, partition_dim=0)
            tag_parallel(self.k_norm_weight, sharded=self.axes.kv_rep.rank == 0, partition_dim=0)
            return
        for w in (self.q_norm_weight, self.k_norm_weight):
            if w is not None:
                # sharded over segments, replicated over head groups: count it on group i == 0 only
                tag_parallel(w, sharded=self.axes.i == 0, partition_dim=0)

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
    def _qk_norms(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of q and k (:mod:`ds_twolevel.layers.qk_norm`): per head, the sums of squares are
        all-reduced over segments; over the whole projection, over the tensor-parallel axis."""
        norm, s, axes = self.qk_norm, self.spec, self.axes
        if norm.scope == "head":
            kw = dict(sumsq_axis=axes.seg, features=s.head_dim, copies=1)
            return (rms_norm_partition(q, self.q_norm_weight, norm, weight_axis=axes.heads, tag="q", **kw),
                    rms_norm_partition(k, self.k_norm_weight, norm, weight_axis=axes.heads, tag="k", **kw))
        single = AxisGroup.single("q_norm")  # each q feature lives on one rank: no gradient sum
        return (rms_norm_partition(q, self.q_norm_weight, norm, sumsq_axis=axes.tp, weight_axis=single,
                                   features=s.num_heads * s.head_dim, copies=1, tag="q"),
                rms_norm_partition(k, self.k_norm_weight, norm, sumsq_axis=axes.tp, weight_axis=axes.kv_rep,
                                   features=s.num_kv_heads * s.head_dim, copies=axes.kv_rep.size, tag="k"))

    def _softcap(self, scores: torch.Tensor) -> torch.Tensor:
        """Gemma2's score soft-capping (after the scale, before the mask), or the scores as they are."""
        if self.softcap is None:
            return scores
        return torch.tanh(scores / self.softcap) * self.softcap

    def resolve_strategy(self, call: AttentionCall, element_size: int, strategy: str | None = None) -> str:
        """The strategy used for this call ("auto" -> fewer bytes per the cost model)."""
        strategy = strategy or self.strategy
        return choose_strategy(call, element_size) if strategy == "auto" else strategy

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: Any = None,
        strategy: str | None = None,
    ) -> torch.Tensor:
        """(b, s, H) replicated input -> (b, s, H) replicated output.

        ``position_embeddings``: full-rotary (cos, sin), each (b, s, r), as Hugging Face passes
        them. ``attention_mask``: see :func:`ds_twolevel.layers.masks.additive_mask`. ``kv_cache``: any
        object with ``update(k, v, layer_idx)`` (this rank's slice is stored).
        """
        b, s, _ = hidden_states.shape
        hl, gl, dl, dvl = self.part.local_heads, self.part.local_kv_heads, self.part.local_dim, self.part.local_v_dim
        x = copy_to_axis(hidden_states, self.axes.tp, "attn_in")
        q = self.q_proj(x).view(b, s, hl, dl).transpose(1, 2)  # (b, hl, s, dl)
        k = self._kv_linear(x, self.k_proj, "k").view(b, s, gl, dl).transpose(1, 2)  # (b, gl, s, dl)
        v = self._kv_linear(x, self.v_proj, "v").view(b, s, gl, dvl).transpose(1, 2)  # (b, gl, s, dvl)
        if self.qk_norm is not None:
            q, k = self._qk_norms(q, k)
        if self.spec.rot_dim:
            if position_embeddings is None:
                raise ValueError("this layer uses RoPE: pass position_embeddings=(cos, sin)")
            cos, sin = position_embeddings
            cos_seg, sin_seg = segment_cos_sin(cos.to(q.dtype), sin.to(q.dtype), self.rope_cos_index, self.rope_sign)
            q = apply_rope_segment(q, cos_seg, sin_seg, self.rope_partner)
            k = apply_rope_segment(k, cos_seg, sin_seg, self.rope_partner)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx)  # (b, gl, skv, dl), (b, gl, skv, dvl)
        skv = k.shape[-2]
        # plain causal attention needs no mask tensor: with s == skv fused SDPA skips the masked
        # blocks itself (is_causal) and the score path computes only the visible key blocks; with
        # one query (decode) every cached key is visible
        plain_causal = attention_mask is None and self.causal and (s == skv or s == 1)
        causal_blocks = plain_causal and s == skv and s > 1 and not self._dropping
        call = AttentionCall(b, s, skv, self.hidden_size, hl, gl, self.spec.head_dim, self.axes.m,
                             self.axes.n, self.qk_norm is not None, causal_blocks=causal_blocks,
                             v_head_dim=self.spec.dv, qk_norm_scope=self.qk_norm.scope if self.qk_norm else "head")
        chosen = self.resolve_strategy(call, q.element_size(), strategy)
        fused_causal = causal_blocks and chosen == "qk_allgather" and self.softcap is None
        block_rows = causal_block_rows(self.axes.m, s) if causal_blocks and chosen == "score_allreduce" else 0
        mask = None if plain_causal and (fused_causal or block_rows or s == 1) else additive_mask(
            attention_mask, batch=b, q_len=s, kv_len=skv, causal=self.causal, dtype=q.dtype, device=q.device)
        if mask is not None and mask.dim() == 4 and mask.shape[1] not in (1, hl):
            mask = mask[:, self.part.q_heads(self.axes.i)]  # per-head mask given for all h heads
        if block_rows:
            out = self._attend_causal_blocks(q, k, v, block_rows, call)
        elif chosen == "score_allreduce":
            out = self._attend_score_allreduce(q, k, v, mask, call)
        else:
            out = self._attend_qk_allgather(q, k, v, mask, is_causal=fused_causal)
        out = zero_unattended_rows(out, attention_mask, causal=self.causal, heads=self.part.q_heads(self.axes.i))
        out = out.transpose(1, 2).reshape(b, s, hl * dvl)  # (b, s, hl*dvl)
        y = reduce_from_axis(self.o_proj(out), self.axes.tp, "attn_out")  # (b, s, H)
        return y if self.o_bias is None else y + self.o_bias

    def _kv_linear(self, x: torch.Tensor, proj: nn.Linear, tag: str) -> torch.Tensor:
        """K/V projection; a KV head replicated on n/g head groups sums its weight gradients."""
        rep = self.axes.kv_rep
        if rep.size == 1:
            return proj(x)
        bias = None if proj.bias is None else copy_to_axis(proj.bias, rep, f"{tag}_bias")
        return F.linear(x, copy_to_axis(proj.weight, rep, f"{tag}_weight"), bias)

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(b, gl, skv, *) -> (b, hl, skv, *): each KV head serves h/g consecutive query heads."""
        rep = self.part.local_heads // t.shape[1]
        return t if rep == 1 else t.repeat_interleave(rep, dim=1)

    def _dropout(self, probs: torch.Tensor, q_len: int | None = None, row0: int = 0) -> torch.Tensor:
        """Dropout of ``probs`` (b, hl, rows, skv): rows [row0, row0 + rows) of the shared keep-mask
        of a call with ``q_len`` query rows (default: all of them)."""
        if not (self.training and self.dropout > 0):
            return probs
        b, hl, rows, skv = probs.shape
        sq = rows if q_len is None else q_len
        keep = dropout_keep_mask((b, self.spec.num_heads, sq, skv), self.dropout, seed=self.dropout_seed,
                                 step=self._dropout_step, device=probs.device)
        self._dropout_step += 1
        keep = keep[:, self.part.q_heads(self.axes.i), row0:row0 + rows]  # (b, hl, rows, skv): this group's heads
        return probs * keep / (1.0 - self.dropout)

    @property
    def _dropping(self) -> bool:
        return self.training and self.dropout > 0

    def _attend_score_allreduce(self, q, k, v, mask, call: AttentionCall):
        """Partial scores over this segment's dims, summed over the segment group.

        GQA without copying K/V: the h/g query heads of each KV head are stacked along the
        query rows, so one (b, gl) batched matmul computes exactly the same dot products.
        The scale 1/sqrt(d) is applied to q (fewer elements than the scores).

        Split softmax (DESIGN.md section 2, step 4): when the query rows divide by m, the
        all-reduce is done as its two halves - reduce-scatter the partial scores along the rows,
        so that each rank of the segment group runs mask, softmax and dropout on its 1/m of the
        rows only - then either all-gathers the probabilities (same bytes as the all-reduce) or,
        when it sends fewer bytes (:func:`~ds_twolevel.costmodel.values_gathered`), multiplies its
        rows by the all-gathered full-width V and all-to-alls the outputs (:meth:`_rows_to_segments`).
        """
        b, hl, sq, dl = q.shape
        gl, skv = k.shape[1], k.shape[-2]
        seg = self.axes.seg
        q_grouped = (q * self.scaling).reshape(b, gl, (hl // gl) * sq, dl)  # (b, gl, hl/gl*sq, dl)
        scores_partial = (q_grouped @ k.transpose(-1, -2)).view(b, hl, sq, skv)  # (b, hl, sq, skv)
        if split_softmax(seg.size, sq):
            rows, row0 = sq // seg.size, seg.rank * (sq // seg.size)
            scores = reduce_scatter_dim(scores_partial, seg, 2, "scores")  # (b, hl, sq/m, skv)
            if mask is not None and mask.shape[-2] == sq:
                mask = mask[..., row0:row0 + rows, :]
        else:
            rows, row0 = sq, 0
            scores = all_reduce_both(scores_partial, seg, "scores")
        scores = self._softcap(scores)
        if mask is not None:
            scores = scores + mask
        probs = self._dropout(_softmax(scores), sq, row0)
        if rows != sq and values_gathered(call, scores_partial.numel()):
            v_full = all_gather_dim(v, seg, -1, "v")  # (b, gl, skv, dv), dims in segment order
            out = (probs.reshape(b, gl, (hl // gl) * rows, skv) @ v_full).view(b, hl, rows, v_full.shape[-1])
            return self._rows_to_segments(out, None)
        if rows != sq:
            probs = all_gather_dim(probs, seg, 2, "probs")  # (b, hl, sq, skv)
        out = probs.reshape(b, gl, (hl // gl) * sq, skv) @ v  # (b, gl, hl/gl*sq, dvl)
        return out.view(b, hl, sq, v.shape[-1])  # (b, hl, sq, dvl)

    def _rows_to_segments(self, out: torch.Tensor, order: list[int] | None) -> torch.Tensor:
        """(b, hl, R, dv) outputs of this rank's query rows, all value dims -> (b, hl, sq, dv/m).

        One all-to-all over the segment group: segment j's dv/m columns of every rank's rows go to
        rank j. ``order``: the query blocks of the received rows, rank after rank (causal path;
        None: rank r's rows are the r-th contiguous 1/m of them).
        """
        b, hl, rows, dv = out.shape
        m = self.axes.seg.size
        send = out.view(b, hl, rows, m, dv // m).permute(3, 0, 1, 2, 4)  # (m, b, hl, R, dv/m)
        recv = all_to_all_dim0(send, self.axes.seg, "attn_rows").permute(1, 2, 0, 3, 4)  # (b, hl, m, R, dv/m)
        if order is None:
            return recv.reshape(b, hl, m * rows, dv // m)
        blocks = len(order)
        inverse = torch.tensor(sorted(range(blocks), key=order.__getitem__), device=out.device)
        return recv.reshape(b, hl, blocks, -1, dv // m).index_select(2, inverse).view(b, hl, m * rows, dv // m)

    def _attend_causal_blocks(self, q, k, v, rows: int, call: AttentionCall):
        """Score all-reduce for a plain causal mask (s_q == s_kv), skipping the masked key blocks.

        The query rows are cut into B blocks of ``rows``; block c sees keys [0, (c+1)*rows) only,
        so only those scores are computed. Each rank of the segment group owns the blocks of
        :func:`~ds_twolevel.costmodel.causal_block_owner` (zigzag pairs: equal work per rank);
        the partial scores of every rank's blocks are packed into one (m, N) tensor,
        reduce-scattered (this rank keeps its blocks), masked on the diagonal tile and
        softmaxed; then, as in the split softmax, either the probabilities are all-gathered in the
        same packing, or this rank's blocks are multiplied by the all-gathered V and the outputs
        all-to-all'ed (:func:`~ds_twolevel.costmodel.values_gathered`).
        """
        b, hl, sq, dl = q.shape
        gl, rep, seg = k.shape[1], hl // k.shape[1], self.axes.seg
        blocks, m = sq // rows, seg.size
        owned = [causal_block_owner(m, blocks, j) for j in range(m)]
        order = [c for cs in owned for c in cs]  # the packing order: rank after rank
        q = q * self.scaling

        def keys(c: int) -> int:
            return (c + 1) * rows

        def sizes(cs: list[int]) -> list[int]:
            return [b * hl * rows * keys(c) for c in cs]

        def partial(c: int, out: torch.Tensor | None = None) -> torch.Tensor:  # (b, gl, rep*rows, keys(c))
            qc = q[:, :, c * rows:(c + 1) * rows].reshape(b, gl, rep * rows, dl)
            if out is None:
                return qc @ k[:, :, :keys(c)].transpose(-1, -2)
            return torch.matmul(qc, k[:, :, :keys(c)].transpose(-1, -2), out=out.view(b, gl, rep * rows, keys(c)))

        def unpack(packed: torch.Tensor, cs: list[int]) -> list[torch.Tensor]:  # flat chunk -> blocks
            return [t.view(b, hl, rows, keys(c)) for t, c in zip(packed.split(sizes(cs)), cs)]

        # packing: rank-major, each block flattened whole, so every rank's chunk is contiguous and
        # the collectives work along dim 0 without a transposing copy
        if m > 1:
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
                packed = torch.cat([partial(c).reshape(-1) for c in order])
            else:  # inference: each block's matmul writes straight into the packed buffer
                packed = q.new_empty(sum(sizes(order)))
                for c, chunk in zip(order, packed.split(sizes(order))):
                    partial(c, chunk)
            mine = unpack(reduce_scatter_dim(packed.view(m, -1), seg, 0, "scores").view(-1), owned[seg.rank])
        else:
            mine = [partial(c).view(b, hl, rows, keys(c)) for c in owned[0]]
        low = torch.finfo(q.dtype).min
        tile = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu(1)  # key > query on the diagonal
        probs = []
        for c, scores in zip(owned[seg.rank], mine):
            scores = self._softcap(scores)
            if scores.requires_grad:
                scores = scores.masked_fill(F.pad(tile, (c * rows, 0)), low)
            else:  # inference: mask the diagonal tile in place, no full-width temporary
                scores[..., c * rows:].masked_fill_(tile, low)
            probs.append(_softmax(scores))
        if m > 1 and values_gathered(call, packed.numel()):
            v_full = all_gather_dim(v, seg, -1, "v")  # (b, gl, skv, dv), dims in segment order
            out = [(p.reshape(b, gl, rep * rows, keys(c)) @ v_full[:, :, :keys(c)]).view(b, hl, rows, -1)
                   for c, p in zip(owned[seg.rank], probs)]
            return self._rows_to_segments(torch.cat(out, 2), order)
        if m > 1:
            local = torch.cat([p.reshape(-1) for p in probs]).view(1, -1)  # (1, N)
            gathered = all_gather_dim(local, seg, 0, "probs")  # (m, N)
            probs = [p for j, cs in enumerate(owned) for p in unpack(gathered[j], cs)]
        out = [None] * blocks
        for c, p in zip(order, probs):
            out[c] = (p.reshape(b, gl, rep * rows, keys(c)) @ v[:, :, :keys(c)]).view(b, hl, rows, v.shape[-1])
        return torch.cat(out, 2)  # (b, hl, sq, dvl)

    def _attend_qk_allgather(self, q, k, v, mask, is_causal: bool = False):
        """Gather full-d q and k over the segment group, then fused SDPA with this segment's v."""
        q_full = all_gather_dim(q, self.axes.seg, -1, "q")  # (b, hl, sq, d), dims in segment order
        k_full = all_gather_dim(k, self.axes.seg, -1, "k")  # (b, gl, skv, d)
        if self._dropping or self.softcap is not None:  # explicit scores: the shared dropout stream, softcap
            scores = self._softcap(q_full @ self._expand_kv(k_full).transpose(-1, -2) * self.scaling)
            probs = F.softmax(scores if mask is None else scores + mask, dim=-1, dtype=torch.float32)
            return self._dropout(probs.to(q.dtype)) @ self._expand_kv(v)
        # enable_gqa: SDPA maps query head h to KV head h // (hl/gl) itself, without copying K/V
        return F.scaled_dot_product_attention(q_full, k_full, v, attn_mask=mask, is_causal=is_causal,
                                              scale=self.scaling, enable_gqa=k_full.shape[1] != q_full.shape[1])


def _norm_and_softcap(qk_norm: QKNorm | None, eps: float | None, softcap: float | None,
                      name: str) -> tuple[QKNorm | None, float | None]:
    """The layer's q/k norm (``qk_norm_eps`` alone: Qwen3's per-head RMSNorm) and validated soft-cap."""
    if qk_norm is None and eps is not None:
        qk_norm = QKNorm(float(eps))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be a number > 0 or None, got {softcap!r}")
    return qk_norm, softcap


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys in the scores' dtype. PyTorch's softmax kernels (CPU and CUDA) accumulate
    bf16/fp16 in fp32 and round once at the end - what ``softmax(dtype=float32).to(dtype)`` gives -
    without writing and re-reading an fp32 copy of the (materialised, s_q x s_kv) probabilities."""
    return F.softmax(scores, dim=-1)


def _has_parameter(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:  # e.g. "q_proj.bias" of a projection without bias
        return False
