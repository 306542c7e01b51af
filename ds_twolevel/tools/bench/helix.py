"""A Helix-style decode layer for the layout benchmark: the peer that shards the KV cache by sequence while
replicating W_q, W_k and W_v (arXiv 2507.07120), small and exact, on the same mesh as two-level.

Rank (i, j) of n head groups x kvp sequence shards (the mesh of an n x m layout with m = kvp: its segment
axis is the kvp ranks of a head group, its tensor-parallel axis all n * kvp ranks):

1. projects the new token with its head group's W_q, W_k, W_v at full head dim (replicated over the kvp
   ranks: no collective), applies RoPE, and appends its key and value if it owns the position
   (p % kvp == j, :class:`~ds_twolevel.layers.seq_cache.PositionShardedKV`);
2. attends over its own positions (:func:`~ds_twolevel.strategies.fused.partial_attention`: normalised
   partial output and fp32 log-sum-exp);
3. combines exactly over the kvp ranks with kv_shard's one all-to-all
   (:func:`~ds_twolevel.strategies.kv_shard.combine`, "partial_out"), leaving this rank d_v/kvp columns
   of its h/n heads, the input of W_o split over all n * kvp ranks; then the all-reduce over them.

The bytes it sends are :func:`ds_twolevel.costmodel.study.helix_collectives`'s. Decode only: a prefill
would need every rank to see all earlier keys, which is not what the layout is for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_twolevel.parallel.collectives import reduce_from_axis
from ds_twolevel.parallel.layout import TwoLevelAxes
from ds_twolevel.sharding.partition import AttentionPartition, AttentionSpec
from ds_twolevel.strategies.fused import partial_attention
from ds_twolevel.strategies.kv_shard import combine
from ds_twolevel.strategies.row_masks import position_mask


class HelixAttention(nn.Module):
    """One rank's Helix-style decode attention (no biases, no q/k norm: the bench's Llama).

    Example:
        >>> attn = HelixAttention(dense_attn, spec, mesh.axes, layer_idx=0)
        >>> y = attn(x, position_embeddings=(cos, sin), kv_cache=SeqShardCache(layout="kv_shard"))
    """

    def __init__(self, dense: nn.Module, spec: AttentionSpec, axes: TwoLevelAxes, *, layer_idx: int) -> None:
        super().__init__()
        n, kvp, i, j = axes.heads.size, axes.seg.size, axes.heads.rank, axes.seg.rank
        heads = AttentionPartition(spec, n, 1)  # full head dim, dims in dense order (m = 1)
        self.spec, self.axes, self.layer_idx, self.i = spec, axes, layer_idx, i
        self.q_heads = heads.q_heads(i)
        self.kv_heads = heads.kv_heads(i)
        take = lambda w, rows: nn.Parameter(w.detach().index_select(0, rows).clone(), requires_grad=False)  # noqa: E731
        self.w_q = take(dense.q_proj.weight, heads.q_rows(i, 0))  # (h/n d, H), replicated over kvp
        self.w_k = take(dense.k_proj.weight, heads.k_rows(i, 0))  # (g/n d, H)
        self.w_v = take(dense.v_proj.weight, heads.v_rows(i, 0))  # (g/n dv, H)
        cols = AttentionPartition(spec, n, kvp).o_cols(i, j)
        self.w_o = nn.Parameter(dense.o_proj.weight.detach().index_select(1, cols).clone(), requires_grad=False)
        self.scaling = spec.head_dim ** -0.5

    def forward(self, x: torch.Tensor, *, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, kv_cache=None, strategy: str | None = None) -> torch.Tensor:
        """(b, t, H) replicated new tokens -> (b, t, H) replicated output, against ``kv_cache``
        (a :class:`~ds_twolevel.layers.seq_cache.SeqShardCache` with ``layout="kv_shard"``)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if kv_cache is None or attention_mask is not None:
            raise ValueError("the Helix-style layer decodes against a kv_shard cache, causal, without a mask")
        b, t, _ = x.shape
        d, dv, hl, gl = self.spec.head_dim, self.spec.dv, len(self.q_heads), len(self.kv_heads)
        q = F.linear(x, self.w_q).view(b, t, hl, d).transpose(1, 2)  # (b, hl, t, d)
        k = F.linear(x, self.w_k).view(b, t, gl, d).transpose(1, 2)  # (b, gl, t, d)
        v = F.linear(x, self.w_v).view(b, t, gl, dv).transpose(1, 2)  # (b, gl, t, dv)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        store = kv_cache.position_store(self.layer_idx, self.axes.seg.size, self.axes.seg.rank)
        store.append_positions(k, v)
        kv = store.global_length
        cols = position_mask(None, positions=store.positions(x.device), q_len=t, kv_len=kv, causal=True,
                             q_heads=self.q_heads, local_heads=hl, dtype=q.dtype)
        out, lse = partial_attention(q, store.keys, store.values, cols, scale=self.scaling)
        out = combine(out, lse, self.axes.seg)  # (b, hl, t, dv/kvp)
        out = out.transpose(1, 2).reshape(b, t, -1)  # (b, t, hl*dv/kvp)
        return reduce_from_axis(F.linear(out, self.w_o), self.axes.tp, "attn_out")


def helix_llama(hf_model: nn.Module, mesh) -> nn.Module:
    """The bench's Llama with every attention replaced by the Helix-style layer on ``mesh`` (n head groups x
    m = kvp sequence shards; n must divide the KV heads); norms and MLP as two-level's."""
    from ds_twolevel.tools.bench.config import HEADWISE_STRATEGY
    from ds_twolevel.tools.bench.model import TwoLevelLlama, dense_block_from_hf

    cfg = hf_model.config
    spec = AttentionSpec(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, rope_style="half")
    model = TwoLevelLlama(hf_model, mesh, strategy=HEADWISE_STRATEGY)
    for idx, (block, layer) in enumerate(zip(model.blocks, hf_model.model.layers)):
        block.attn = HelixAttention(dense_block_from_hf(layer, spec, cfg).attn, spec, mesh.axes, layer_idx=idx)
    return model.eval()


def helix_layouts(num_kv_heads: int, num_heads: int, ranks: int) -> list[tuple[int, int]]:
    """(n, kvp) of every Helix split of ``ranks``: n head groups dividing g (and h), kvp = ranks / n >= 2
    (as :func:`ds_twolevel.costmodel.study.helix_points`).

    Example:
        >>> helix_layouts(2, 8, 4)
        [(1, 4), (2, 2)]
    """
    return [(n, ranks // n) for n in range(1, num_kv_heads + 1)
            if num_kv_heads % n == 0 and num_heads % n == 0 and ranks % n == 0 and ranks // n >= 2]
