"""Vocab-parallel embedding, LM head and cross-entropy over the n*m ranks of a layer (Megatron's
``VocabParallelEmbedding`` / ``vocab_parallel_cross_entropy``; DESIGN.md section 8).

Rank r of the tp axis (p = n*m ranks) holds the rows ``[r*V//p, (r+1)*V//p)`` of the embedding
table / LM head: exactly V/p rows when p divides V, otherwise p contiguous blocks whose sizes differ
by at most one. There are no padding rows, so nothing has to be kept out of the softmax or the
gradient; only the two all-gathers over vocab (full logits for sampling, dense export) pad each
shard to the largest one for the collective and cut the padding off again.

- Embedding: look up the ids inside the shard, zero the others, all-reduce over tp (or, with
  ``sequence_parallel``, reduce-scatter along the sequence: each rank keeps its s/p tokens).
- LM head: column-parallel over vocab: (b, s, H) -> (b, s, V_r) logits of this rank's rows.
- Cross-entropy per token: all-reduce the max over the shards, then one all-reduce of the
  (sum of exp, target logit) pairs; loss = log sum - (z_target - max). The gradient is
  softmax - one-hot restricted to the shard and needs no collective. No rank holds (s, V) logits.

Example:
    >>> emb = VocabParallelEmbedding.from_dense(dense_embedding, mesh.axes.tp)
    >>> head = VocabParallelLMHead(64, 1000, mesh.axes.tp, weight=emb.weight)   # tied
    >>> logits_shard = head(emb(ids))                                           # (b, s, V_r)
    >>> loss = vocab_parallel_cross_entropy(logits_shard, labels, vocab_start=head.start, tp=head.tp)
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_twolevel.layers.attention import tag_parallel
from ds_twolevel.parallel.collectives import (
    _record, all_gather_dim, copy_to_axis, reduce_dtype as check_reduce_dtype, reduce_from_axis, reduce_scatter_dim,
    simulated,
)
from ds_twolevel.parallel.layout import AxisGroup

IGNORE_INDEX = -100
"""label of tokens that carry no loss (torch's and Hugging Face's default ``ignore_index``)."""


def vocab_range(vocab_size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of the vocab rows held by tp rank ``index`` of ``parts``: ``[index*V//p, (index+1)*V//p)``.

    Example:
        >>> [vocab_range(10, 4, r) for r in range(4)]
        [(0, 2), (2, 5), (5, 7), (7, 10)]
    """
    if vocab_size < parts:
        raise ValueError(f"vocab_size ({vocab_size}) is smaller than the {parts} tensor-parallel ranks it would be "
                         f"split over; use vocab_parallel=False or at most {vocab_size} ranks per layer")
    return index * vocab_size // parts, (index + 1) * vocab_size // parts


def vocab_rows(vocab_size: int, parts: int, index: int) -> torch.Tensor:
    """The row indices of :func:`vocab_range` as a tensor (the ``shard_index`` of a vocab shard)."""
    return torch.arange(*vocab_range(vocab_size, parts, index))


def max_rows(vocab_size: int, parts: int) -> int:
    """The largest shard's row count (what the vocab all-gathers pad every shard to)."""
    return max(b - a for a, b in (vocab_range(vocab_size, parts, r) for r in range(parts)))


# -- collectives of the loss ------------------------------------------------------------------------
def _all_reduce_max(x: torch.Tensor, axis: AxisGroup, tag: str) -> torch.Tensor:
    """Element-wise max over the axis (no gradient: the shift it gives cancels out of the loss)."""
    out = x.contiguous().clone()
    if axis.size == 1:
        return out
    _record("all_reduce", axis, out.numel(), out.element_size(), tag, False)
    if not simulated(axis):
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=axis.group)
    return out


def _all_reduce_sum(x: torch.Tensor, axis: AxisGroup, tag: str) -> torch.Tensor:
    """Element-wise sum over the axis, inside an autograd.Function (no autograd pairing of its own)."""
    out = x.contiguous().clone()
    if axis.size == 1:
        return out
    _record("all_reduce", axis, out.numel(), out.element_size(), tag, False)
    if not simulated(axis):
        dist.all_reduce(out, group=axis.group)
    return out


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """forward: all-reduce max, then all-reduce (sum exp, target logit) over tp; backward: none
    (softmax - one-hot of this rank's columns, times the incoming per-token gradient)."""

    @staticmethod
    def forward(ctx, logits, target, start, tp, ignore_index, work_dtype):
        z = logits.to(work_dtype)  # (N, V_r)
        stop = start + z.shape[-1]
        valid = target != ignore_index
        mine = valid & (target >= start) & (target < stop)
        local_t = torch.where(mine, target - start, torch.zeros_like(target))  # (N,)
        shifted = z - _all_reduce_max(z.max(dim=-1).values, tp, "ce_max").unsqueeze(-1)  # (N, V_r)
        exp = shifted.exp()
        z_t = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * mine  # (N,): held by one shard
        sums = _all_reduce_sum(torch.stack([exp.sum(dim=-1), z_t], dim=-1), tp, "ce_sums")  # (N, 2)
        loss = (sums[:, 0].log() - sums[:, 1]) * valid
        exp.div_(sums[:, 0].unsqueeze(-1))  # softmax restricted to the shard
        ctx.save_for_backward(exp, local_t, mine, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, mine, valid = ctx.saved_tensors
        grad = softmax.clone()  # (N, V_r)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= mine.to(grad.dtype)
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def token_losses(logits_shard: torch.Tensor, target: torch.Tensor, *, vocab_start: int, tp: AxisGroup,
                 ignore_index: int = IGNORE_INDEX, reduce_dtype: Any = torch.float32,
                 vocab_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of every token from this rank's vocab columns: (..., V_r) logits, (...) global ids
    -> (...) losses in the reduce dtype (0 where ``target == ignore_index``), the same on every tp rank.

    Collective over ``tp`` (two all-reduces of 1 and 2 numbers per token). ``reduce_dtype`` (fp32 by
    default): the dtype the loss is computed and summed in when wider than the logits' ("input"/None:
    the logits' dtype). ``vocab_size`` (V): when given, a label outside [0, V) that is not ``ignore_index``
    is a ValueError (no shard owns it; torch's dense cross-entropy refuses it too).

    Example:
        >>> losses = token_losses(logits_shard, labels, vocab_start=head.start, tp=head.tp)   # (b, s)
    """
    wide = check_reduce_dtype(reduce_dtype)
    work = logits_shard.dtype if wide is None else torch.promote_types(logits_shard.dtype, wide)
    if target.shape != logits_shard.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(target.shape)} do not match logits of shape "
                         f"{tuple(logits_shard.shape)} (expected {tuple(logits_shard.shape[:-1])})")
    if vocab_size is not None:
        outside = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
        if bool(outside.any()):  # no shard would own them: the loss would silently lack the target logit
            bad = sorted(set(target[outside].tolist()))[:4]
            raise ValueError(f"labels {bad} are outside the vocabulary [0, {vocab_size}) and are not ignore_index "
                             f"({ignore_index}); fix the labels or set them to {ignore_index}")
    flat = logits_shard.reshape(-1, logits_shard.shape[-1])  # (N, V_r)
    loss = _VocabParallelCrossEntropy.apply(flat, target.reshape(-1).to(flat.device), int(vocab_start), tp,
                                            int(ignore_index), work)
    return loss.view(target.shape)


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, *, vocab_start: int,
                                 tp: AxisGroup, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                                 reduce_dtype: Any = torch.float32,
                                 vocab_size: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``torch.nn.functional.cross_entropy`` of the full-vocab logits, computed from vocab shards.

    ``reduction``: "mean" (over tokens whose label is not ``ignore_index``, as torch), "sum", "none"
    (per token), or "sum_count": the pair (sum of token losses, count of counted tokens) for a caller
    that combines several batches or sequence shards (loss = total sum / total count).

    Example:
        >>> loss = vocab_parallel_cross_entropy(head(x), labels, vocab_start=head.start, tp=head.tp)
    """
    if reduction not in ("mean", "sum", "none", "sum_count"):
        raise ValueError(f"reduction must be 'mean', 'sum', 'none' or 'sum_count', got {reduction!r}")
    losses = token_losses(logits_shard, target, vocab_start=vocab_start, tp=tp, ignore_index=ignore_index,
                          reduce_dtype=reduce_dtype, vocab_size=vocab_size)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    count = (target != ignore_index).sum().to(total.dtype)
    return (total, count) if reduction == "sum_count" else total / count


# -- gathering the vocab (sampling, export) -------------------------------------------------------
def gather_vocab(shard: torch.Tensor, tp: AxisGroup, vocab_size: int, dim: int = -1) -> torch.Tensor:
    """The full (..., V, ...) tensor from every rank's rows along ``dim`` (no autograd; shards padded to the
    largest for the all-gather, the padding cut off again)."""
    dim = dim % shard.dim()
    rows = max_rows(vocab_size, tp.size)
    pad = rows - shard.shape[dim]
    padded = shard if pad == 0 else torch.cat([shard, shard.new_zeros(*shard.shape[:dim], pad, *shard.shape[dim + 1:])],
                                              dim=dim)
    with torch.no_grad():
        full = all_gather_dim(padded, tp, dim, "vocab_gather")  # (..., p*rows, ...)
    if vocab_size == rows * tp.size:
        return full
    parts = full.split(rows, dim=dim)
    sizes = [b - a for a, b in (vocab_range(vocab_size, tp.size, r) for r in range(tp.size))]
    return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)


class _GatherVocab(torch.autograd.Function):
    """forward: all-gather along the vocab dim; backward: this rank's columns of the gradient (every rank
    uses the gathered logits identically, so no sum)."""

    @staticmethod
    def forward(ctx, shard, tp, vocab_size, start):
        ctx.start, ctx.rows = start, shard.shape[-1]
        return gather_vocab(shard, tp, vocab_size, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.start, ctx.rows), None, None, None


def gather_logits(logits_shard: torch.Tensor, tp: AxisGroup, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """(..., V_r) -> (..., V): the full-vocab logits (for the positions that are sampled from)."""
    return logits_shard if tp.size == 1 else _GatherVocab.apply(logits_shard, tp, vocab_size, vocab_start)


# -- modules ------------------------------------------------------------------------------------
class _VocabShard(nn.Module):
    """What the embedding and the head share: this rank's rows of a (V, H) table and where they sit."""

    def _init_shard(self, vocab_size: int, tp: AxisGroup, reduce_dtype: Any) -> None:
        self.reduce_dtype = check_reduce_dtype(reduce_dtype)
        self.tp = replace(tp, reduce_dtype=self.reduce_dtype)
        self.vocab_size = vocab_size
        self.start, self.stop = vocab_range(vocab_size, tp.size, tp.rank)

    @property
    def rows(self) -> int:
        """V_r: the vocab rows this rank holds."""
        return self.stop - self.start

    def shard_index(self, tp_rank: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
        """Dense parameter name -> (row index, dim 0) of the rows held by ``tp_rank`` (default: this rank)."""
        rank = self.tp.rank if tp_rank is None else tp_rank
        rows = vocab_rows(self.vocab_size, self.tp.size, rank)
        return {name: (rows, 0) for name, p in self.named_parameters(recurse=False)}

    @torch.no_grad()
    def load_dense_state(self, dense: dict[str, torch.Tensor]) -> None:
        """Copy this rank's rows out of the dense tensors (names as in ``shard_index``)."""
        for name, (index, dim) in self.shard_index().items():
            self.get_parameter(name).copy_(dense[name].index_select(dim, index.to(dense[name].device)))

    def gather_dense(self) -> dict[str, torch.Tensor]:
        """The dense (V, ...) tensors assembled on every rank (collective over tp)."""
        out = {}
        for name, _ in self.shard_index().items():
            local = self.get_parameter(name).detach()
            out[name] = local.clone() if self.tp.size == 1 else gather_vocab(local, self.tp, self.vocab_size, dim=0)
        return out


class VocabParallelEmbedding(_VocabShard):
    """``nn.Embedding`` whose (V, H) table is split by rows over the tp axis.

    Output: (b, s, H) on every rank (all-reduce), or with ``sequence_parallel`` this rank's (b, s/p, H)
    tokens (reduce-scatter along dim 1; s must be a multiple of p). ``padding_idx`` keeps its dense
    meaning (its row gets no gradient).

    Example:
        >>> emb = VocabParallelEmbedding(1000, 64, mesh.axes.tp)
        >>> emb(torch.randint(0, 1000, (2, 16))).shape
        torch.Size([2, 16, 64])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: AxisGroup, *, padding_idx: int | None = None,
                 sequence_parallel: bool = False, reduce_dtype: Any = torch.float32, device=None, dtype=None) -> None:
        super().__init__()
        self._init_shard(num_embeddings, tp, reduce_dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx, self.sequence_parallel = padding_idx, sequence_parallel
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim, device=device, dtype=dtype))
        tag_parallel(self.weight, sharded=True, partition_dim=0)

    @classmethod
    def from_dense(cls, dense: nn.Embedding, tp: AxisGroup, *, sequence_parallel: bool = False,
                   reduce_dtype: Any = torch.float32) -> "VocabParallelEmbedding":
        """This rank's rows of ``dense`` (an ``nn.Embedding``)."""
        w = dense.weight
        emb = cls(dense.num_embeddings, dense.embedding_dim, tp, padding_idx=dense.padding_idx,
                  sequence_parallel=sequence_parallel, reduce_dtype=reduce_dtype, device=w.device, dtype=w.dtype)
        if not w.is_meta:
            emb.load_dense_state({"weight": w.detach()})
        return emb

    def _local_padding_idx(self) -> int | None:
        p = self.padding_idx
        return p - self.start if p is not None and self.start <= p < self.stop else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, s) ids -> (b, s, H), or (b, s/p, H) with ``sequence_parallel``."""
        mine = (input_ids >= self.start) & (input_ids < self.stop)
        local = torch.where(mine, input_ids - self.start, torch.zeros_like(input_ids))
        out = F.embedding(local, self.weight, self._local_padding_idx())  # (b, s, H)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        if self.sequence_parallel:
            if out.dim() < 2 or out.shape[1] % self.tp.size:
                raise ValueError(f"sequence-parallel embedding: sequence length {out.shape[1]} is not a multiple of "
                                 f"the {self.tp.size} ranks of the layer; pad the batch to a multiple of {self.tp.size}")
            return reduce_scatter_dim(out, self.tp, 1, "embed")
        return reduce_from_axis(out, self.tp, "embed")

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows=[{self.start}, {self.stop}) of tp={self.tp.size}"
                + (", sequence_parallel" if self.sequence_parallel else ""))


class VocabParallelLMHead(_VocabShard):
    """Column-parallel LM head over the vocab: (b, s, H) -> (b, s, V_r), this rank's rows of the logits.

    ``weight``: share this parameter (tied embeddings: pass the embedding's shard, so both modules hold
    the one parameter). With ``sequence_parallel`` the input is this rank's (b, s/p, H) tokens, all-gathered
    along the sequence first (backward: reduce-scatter), so every rank gets the logits shard of all tokens.

    Example:
        >>> head = VocabParallelLMHead(64, 1000, mesh.axes.tp)
        >>> head(x).shape, head.full_logits(x[:, -1:]).shape
        (torch.Size([2, 16, 250]), torch.Size([2, 1, 1000]))
    """

    def __init__(self, in_features: int, vocab_size: int, tp: AxisGroup, *, bias: bool = False,
                 weight: nn.Parameter | None = None, sequence_parallel: bool = False,
                 reduce_dtype: Any = torch.float32, device=None, dtype=None) -> None:
        super().__init__()
        self._init_shard(vocab_size, tp, reduce_dtype)
        self.in_features, self.out_features, self.sequence_parallel = in_features, vocab_size, sequence_parallel
        if weight is not None and tuple(weight.shape) != (self.rows, in_features):
            raise ValueError(f"tied weight of shape {tuple(weight.shape)} is not this rank's shard "
                             f"({self.rows}, {in_features}) of a ({vocab_size}, {in_features}) table")
        self.weight = weight if weight is not None else nn.Parameter(
            torch.empty(self.rows, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.rows, device=device, dtype=dtype)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                tag_parallel(p, sharded=True, partition_dim=0)

    @classmethod
    def from_dense(cls, dense: nn.Linear, tp: AxisGroup, *, weight: nn.Parameter | None = None,
                   sequence_parallel: bool = False, reduce_dtype: Any = torch.float32) -> "VocabParallelLMHead":
        """This rank's rows of ``dense`` (an ``nn.Linear(H, V)``); ``weight``: a tied shard to use instead."""
        w = dense.weight
        head = cls(dense.in_features, dense.out_features, tp, bias=dense.bias is not None, weight=weight,
                   sequence_parallel=sequence_parallel, reduce_dtype=reduce_dtype, device=w.device, dtype=w.dtype)
        if not w.is_meta:
            state = {"weight": w.detach()} | ({"bias": dense.bias.detach()} if dense.bias is not None else {})
            if weight is not None:
                state.pop("weight")
            with torch.no_grad():
                for name, (index, dim) in head.shard_index().items():
                    if name in state:
                        head.get_parameter(name).copy_(state[name].index_select(dim, index.to(w.device)))
        return head

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, H) -> (b, s, V_r) logits of this rank's vocab rows (no full-vocab tensor anywhere)."""
        x = all_gather_dim(x, self.tp, 1, "head_in") if self.sequence_parallel else copy_to_axis(x, self.tp, "head_in")
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, H) -> (b, s, V_r): :meth:`local_logits`."""
        return self.local_logits(x)

    def full_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, H) -> (b, s, V): all-gathered full-vocab logits of the tokens given (for the few positions
        sampled from; with ``sequence_parallel``, of this rank's tokens, without gathering the sequence)."""
        local = F.linear(copy_to_axis(x, self.tp, "head_in"), self.weight, self.bias)  # (b, s, V_r)
        return gather_logits(local, self.tp, self.vocab_size, self.start)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows=[{self.start}, {self.stop}) "
                f"of tp={self.tp.size}, bias={self.bias is not None}" + (", sequence_parallel" if self.sequence_parallel else ""))


def modelled_bytes(*, tokens: int, hidden: int, vocab_size: int, tp: int, element_size: int = 4,
                   loss_element_size: int = 4, sequence_parallel: bool = False,
                   full_logit_tokens: int = 0) -> dict[tuple[str, str, bool], int]:
    """Bytes one rank sends, by (op, tag, backward), for one forward + backward of embedding -> head -> loss.

    ``tokens``: b*s of the whole sequence; ``full_logit_tokens``: tokens whose full-vocab logits are
    gathered (0 in training). Ring algorithm (see ``collectives.ring_bytes``). With ``sequence_parallel``
    each rank's inputs are its s/p tokens (``hf_integration.vocab_parallel``): the int64 ids and labels of
    the whole sequence are all-gathered, and the per-token loss gradient is summed over tp.

    Example:
        >>> modelled_bytes(tokens=32, hidden=64, vocab_size=96, tp=4)[("all_reduce", "embed", False)]
        12288
    """
    from ds_twolevel.parallel.collectives import ring_bytes

    if tp == 1:
        return {}
    act = tokens * hidden * element_size
    out: dict[tuple[str, str, bool], int] = {}
    if sequence_parallel:
        out[("reduce_scatter", "embed", False)] = ring_bytes("reduce_scatter", act, tp)
        out[("all_gather", "embed", True)] = ring_bytes("all_gather", act, tp)
        out[("all_gather", "head_in", False)] = ring_bytes("all_gather", act, tp)
        out[("reduce_scatter", "head_in", True)] = ring_bytes("reduce_scatter", act, tp)
        for tag in ("embed_ids", "labels"):
            out[("all_gather", tag, False)] = ring_bytes("all_gather", tokens * 8, tp)
        out[("all_reduce", "loss_grad", True)] = ring_bytes("all_reduce", tokens * loss_element_size, tp)
    else:
        out[("all_reduce", "embed", False)] = ring_bytes("all_reduce", act, tp)
        out[("all_reduce", "head_in", True)] = ring_bytes("all_reduce", act, tp)
    out[("all_reduce", "ce_max", False)] = ring_bytes("all_reduce", tokens * loss_element_size, tp)
    out[("all_reduce", "ce_sums", False)] = ring_bytes("all_reduce", 2 * tokens * loss_element_size, tp)
    if full_logit_tokens:
        padded = max_rows(vocab_size, tp) * tp
        out[("all_gather", "vocab_gather", False)] = ring_bytes("all_gather", full_logit_tokens * padded * element_size,
                                                                tp)
    return out


__all__ = ["IGNORE_INDEX", "VocabParallelEmbedding", "VocabParallelLMHead", "gather_logits", "gather_vocab",
           "max_rows", "modelled_bytes", "token_losses", "vocab_parallel_cross_entropy", "vocab_range", "vocab_rows"]
