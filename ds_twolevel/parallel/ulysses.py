"""Ulysses around two-level attention: tokens -> heads over sp before attention, heads -> tokens after it.

The n*m ranks of a layer hold the same s/sp tokens (DESIGN.md section 8). After two-level's q/k/v
projections a rank holds (b, h/n, s/sp, d/m); the all-to-alls over sp turn it into (b, h/(n*sp), s, d/m),
two-level's strategy attends over the whole sequence, and the inverse all-to-all returns
(b, s/sp, h/n * dv/m) for o_proj.

The exchange is DeepSpeed's own (``deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF``:
its ``_combine_local_sequences`` and ``_partition_global_sequence``, on its differentiable
``_dim_zero_all_to_all``), given this rank's h/n heads and d/m dims as "the" heads and head size. It is
extended in two places, both here: its ``forward`` is not used (it all-gathers ``position_ids`` for the HF
attention backends, and calls an HF attention function; two-level's strategy needs neither), and every
exchange is reported to :class:`~ds_twolevel.parallel.collectives.CommCounter` (DeepSpeed's all-to-all
goes around it), so counted bytes can be compared with the cost model.
"""
from __future__ import annotations

from typing import Any

import torch

from ds_twolevel.parallel.collectives import _record
from ds_twolevel.parallel.layout import AxisGroup


def check_ulysses(name: str, *, heads: int, kv_heads: int, n: int, sp: int, head_dim: int, v_head_dim: int,
                  kv_replication: bool = False) -> None:
    """ValueError unless a layer of ``heads`` query / ``kv_heads`` KV heads runs at n head groups x sp.

    Ulysses' rules on this rank's h/n heads: (h/n) % sp == 0; the KV heads of a head group (g/n, or 1
    when n > g replicates them) divisible by sp, or sp divisible by them (DeepSpeed then replicates each
    KV head sp/(g/n) times); one head size for q, k and v.

    Example:
        >>> check_ulysses("llama", heads=4, kv_heads=2, n=1, sp=2, head_dim=8, v_head_dim=8)
    """
    if sp == 1:
        return
    local = heads // n
    fits = ", ".join(str(a) for a in range(1, heads + 1) if heads % a == 0 and (heads // a) % sp == 0)
    if heads % n or local % sp:
        raise ValueError(f"{name}: Ulysses sp={sp} splits each head group's h/n = {heads}/{n} query heads over sp "
                         f"ranks, which needs (h/n) % sp == 0; with sp={sp} use n in {{{fits or 'none'}}}, or a "
                         f"sequence_parallel_size dividing {local if heads % n == 0 else heads}")
    local_kv = 1 if n > kv_heads and kv_replication else kv_heads // n
    if local_kv % sp and sp % local_kv:
        raise ValueError(f"{name}: Ulysses sp={sp} needs each head group's KV heads (g/n = {kv_heads}/{n} = {local_kv}) "
                         f"divisible by sp, or sp divisible by them (each KV head is then replicated "
                         f"sp/(g/n) times, as DeepSpeed's Ulysses does); choose n and sp so that one divides the other")
    if v_head_dim != head_dim:
        raise ValueError(f"{name}: Ulysses exchanges q, k and v with one head size; this layer has head_dim "
                         f"{head_dim} and v_head_dim {v_head_dim}; train it with sequence_parallel_size 1")


class _CountExchange(torch.autograd.Function):
    """forward: identity, reports the all-to-all that follows; backward: identity, reports its backward."""

    @staticmethod
    def forward(ctx, x, axis, tag, numel):
        ctx.axis, ctx.tag, ctx.numel, ctx.size = axis, tag, numel, x.element_size()
        _record("all_to_all", axis, numel, x.element_size(), tag, False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _record("all_to_all", ctx.axis, ctx.numel, ctx.size, ctx.tag, True)
        return grad, None, None, None


def _counted(x: torch.Tensor, axis: AxisGroup, tag: str, numel: int) -> torch.Tensor:
    return _CountExchange.apply(x, axis, tag, numel)


class UlyssesExchange:
    """The all-to-alls of one layer over the sp axis (DeepSpeed's, counted; see the module docstring).

    Args:
        axis: the sp axis (its process group).
        heads: this rank's query heads, h/n.
        kv_heads: this rank's KV heads, g/n (1 when replicated over head groups).
        head_dim: this rank's dims per head, d/m.

    Example:
        >>> ex = UlyssesExchange(mesh.axes.sp, heads=4, kv_heads=2, head_dim=8)
        >>> q, k, v = ex.to_heads(q, k, v)    # (b, hl, s/sp, dl) -> (b, hl/sp, s, dl)
        >>> out = ex.to_sequence(out)          # (b, hl/sp, s, dl) -> (b, s/sp, hl*dl)
    """

    def __init__(self, axis: AxisGroup, *, heads: int, kv_heads: int, head_dim: int) -> None:
        self.axis, self.heads, self.kv_heads, self.head_dim = axis, heads, kv_heads, head_dim
        self._helpers: dict[tuple[int, int], Any] = {}

    def _helper(self, batch: int, local_len: int) -> Any:
        """DeepSpeed's module for this (batch, s/sp): it fixes both at construction (no collective)."""
        key = (batch, local_len)
        if key not in self._helpers:
            import deepspeed.comm

            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            if not deepspeed.comm.is_initialized():
                raise RuntimeError("Ulysses' all-to-alls run on deepspeed.comm: call deepspeed.init_distributed() "
                                   "first (ds_twolevel.initialize does)")
            self._helpers[key] = UlyssesSPAttentionHF(
                attn=None, batch_size=batch, attn_head_count=self.heads, attn_head_size=self.head_dim,
                kv_head_count=self.kv_heads, num_hidden_layers=1, process_group=self.axis.group,
                local_seq_length=local_len, global_seq_length=local_len * self.axis.size)
        return self._helpers[key]

    def to_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, hl, s/sp, dl) q and (b, gl, s/sp, dl) k, v -> (b, hl/sp, s, dl), (b, max(gl/sp, 1), s, dl)."""
        b, _, s_local, _ = q.shape
        helper = self._helper(b, s_local)
        kv_numel = k.numel() * max(helper.kv_replication_factor, 1)
        q, k, v = (_counted(t, self.axis, tag, numel)
                   for t, tag, numel in ((q, "q", q.numel()), (k, "k", kv_numel), (v, "v", kv_numel)))
        # DeepSpeed's layout: [sl_l bs hc hs] in, [sl bs hc_l hs] out
        q, k, v = (t.permute(2, 0, 1, 3) for t in (q, k, v))  # (s/sp, b, heads, dl)
        q, k, v = helper._combine_local_sequences(q, k, v)  # (s, b, heads/sp, dl)
        return tuple(t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, heads/sp, s, dl)

    def to_sequence(self, out: torch.Tensor) -> torch.Tensor:
        """(b, hl/sp, s, dl) attention output -> (b, s/sp, hl*dl), this rank's tokens, o_proj's input."""
        b, local_heads, s, dl = out.shape
        helper = self._helper(b, s // self.axis.size)
        out = _counted(out, self.axis, "o", out.numel())
        out = out.permute(2, 0, 1, 3).reshape(s, b, local_heads * dl)  # [sl bs em_l]
        out = helper._partition_global_sequence(out)  # (s/sp, b, hl*dl)
        return out.transpose(0, 1)  # (b, s/sp, hl*dl)
