"""The blocked causal path of score_allreduce (s_q == s_kv, plain causal mask): only visible key blocks.

The query rows are cut into B blocks of ``rows``; block c sees keys [0, (c+1)*rows) only, so only those
scores are computed. Each rank of the segment group owns the blocks of :func:`block_owner` (zigzag
pairs: equal work per rank); the partial scores of every rank's blocks are packed into one (m, N)
tensor, reduce-scattered (this rank keeps its blocks), masked on the diagonal tile and softmaxed; then,
as in the split softmax, either the probabilities are all-gathered in the same packing, or this rank's
blocks are multiplied by the all-gathered V and the outputs all-to-all'ed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ds_twolevel.parallel.collectives import all_gather_dim, reduce_scatter_dim
from ds_twolevel.strategies.base import AttendContext, AttentionCall
from ds_twolevel.strategies.common import rows_to_segments, softcap, softmax_sinks


def block_rows(m: int, q_len: int, min_rows: int = 128, max_pairs: int = 4) -> int:
    """Rows per query block (0: q_len does not split into 2m blocks).

    The q_len rows are cut into B = 2*m*pairs blocks (each rank of the segment group owns ``pairs``
    zigzag pairs, :func:`block_owner`); the most pairs (up to ``max_pairs``) that divide q_len with
    blocks of at least ``min_rows`` rows, else one pair.
    """
    for pairs in range(max_pairs, 0, -1):
        blocks = 2 * m * pairs
        if q_len % blocks == 0 and (q_len // blocks >= min_rows or pairs == 1):
            return q_len // blocks
    return 0


def block_owner(m: int, blocks: int, rank: int) -> list[int]:
    """Query blocks owned by ``rank`` of m: pairs (t*2m + rank, t*2m + 2m-1 - rank), so every rank
    gets the same number of visible scores."""
    return [c for t in range(0, blocks, 2 * m) for c in (t + rank, t + 2 * m - 1 - rank)]


def scores_numel(call: AttentionCall, rows: int) -> int:
    """Scores of the blocked causal path: block c (of B) has rows x (c+1)*rows of them."""
    blocks = call.q_len // rows
    return call.batch * call.local_heads * rows * rows * blocks * (blocks + 1) // 2


@dataclass(frozen=True)
class _Blocks:
    """Shapes of one blocked call: q (b, hl, B*rows, dl) scaled, k (b, gl, B*rows, dl)."""

    q: torch.Tensor
    k: torch.Tensor
    rows: int

    @property
    def rep(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def keys(self, c: int) -> int:
        return (c + 1) * self.rows

    def sizes(self, cs: list[int]) -> list[int]:
        b, hl = self.q.shape[:2]
        return [b * hl * self.rows * self.keys(c) for c in cs]

    def partial(self, c: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Block c's partial scores (b, gl, rep*rows, keys(c)) (into ``out`` when given)."""
        b, gl, dl, rows = self.q.shape[0], self.k.shape[1], self.q.shape[-1], self.rows
        qc = self.q[:, :, c * rows:(c + 1) * rows].reshape(b, gl, self.rep * rows, dl)
        kt = self.k[:, :, :self.keys(c)].transpose(-1, -2)
        if out is None:
            return qc @ kt
        return torch.matmul(qc, kt, out=out.view(b, gl, self.rep * rows, self.keys(c)))

    def unpack(self, packed: torch.Tensor, cs: list[int]) -> list[torch.Tensor]:
        """A flat chunk -> its blocks (b, hl, rows, keys(c))."""
        b, hl = self.q.shape[:2]
        return [t.view(b, hl, self.rows, self.keys(c)) for t, c in zip(packed.split(self.sizes(cs)), cs)]


def _my_scores(bl: _Blocks, ctx: AttendContext, owned: list[list[int]], order: list[int]):
    """This rank's blocks of summed scores, and the packed partial scores (None when m == 1).

    Packing: rank-major, each block flattened whole, so every rank's chunk is contiguous and the
    collectives work along dim 0 without a transposing copy."""
    seg, m = ctx.seg, ctx.seg.size
    if m == 1:
        b, hl = bl.q.shape[:2]
        return [bl.partial(c).view(b, hl, bl.rows, bl.keys(c)) for c in owned[0]], None
    if torch.is_grad_enabled() and (bl.q.requires_grad or bl.k.requires_grad):
        packed = torch.cat([bl.partial(c).reshape(-1) for c in order])
    else:  # inference: each block's matmul writes straight into the packed buffer
        packed = bl.q.new_empty(sum(bl.sizes(order)))
        for c, chunk in zip(order, packed.split(bl.sizes(order))):
            bl.partial(c, chunk)
    summed = reduce_scatter_dim(packed.view(m, -1), seg, 0, "scores").view(-1)
    return bl.unpack(summed, owned[seg.rank]), packed


def _probs(bl: _Blocks, ctx: AttendContext, mine: list[torch.Tensor], cs: list[int]) -> list[torch.Tensor]:
    """Soft-cap, mask the diagonal tile (key > query) and softmax each of this rank's blocks."""
    rows = bl.rows
    low = torch.finfo(bl.q.dtype).min
    tile = torch.ones(rows, rows, dtype=torch.bool, device=bl.q.device).triu(1)
    out = []
    for c, scores in zip(cs, mine):
        scores = softcap(ctx, scores)
        if scores.requires_grad:
            scores = scores.masked_fill(F.pad(tile, (c * rows, 0)), low)
        else:  # inference: mask the diagonal tile in place, no full-width temporary
            scores[..., c * rows:].masked_fill_(tile, low)
        out.append(softmax_sinks(ctx, scores))
    return out


def attend(ctx: AttendContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int,
           values_gathered: Callable[[AttentionCall, int], bool]) -> torch.Tensor:
    """Score all-reduce over the visible key blocks: (b, hl, sq, dv/m) outputs."""
    b, hl, sq, _ = q.shape
    seg, m = ctx.seg, ctx.seg.size
    bl = _Blocks(q * ctx.scaling, k, rows)
    blocks, gl, rep = sq // rows, k.shape[1], bl.rep
    owned = [block_owner(m, blocks, j) for j in range(m)]
    order = [c for cs in owned for c in cs]  # the packing order: rank after rank
    mine, packed = _my_scores(bl, ctx, owned, order)
    probs = _probs(bl, ctx, mine, owned[seg.rank])
    if m > 1 and values_gathered(ctx.call, packed.numel()):
        v_full = all_gather_dim(v, seg, -1, "v")  # (b, gl, skv, dv), dims in segment order
        out = [(p.reshape(b, gl, rep * rows, bl.keys(c)) @ v_full[:, :, :bl.keys(c)]).view(b, hl, rows, -1)
               for c, p in zip(owned[seg.rank], probs)]
        return rows_to_segments(torch.cat(out, 2), seg, order)
    if m > 1:
        local = torch.cat([p.reshape(-1) for p in probs]).view(1, -1)  # (1, N)
        gathered = all_gather_dim(local, seg, 0, "probs")  # (m, N)
        probs = [p for j, cs in enumerate(owned) for p in bl.unpack(gathered[j], cs)]
    out = [None] * blocks
    for c, p in zip(order, probs):
        out[c] = (p.reshape(b, gl, rep * rows, bl.keys(c)) @ v[:, :, :bl.keys(c)]).view(b, hl, rows, v.shape[-1])
    return torch.cat(out, 2)  # (b, hl, sq, dvl)
