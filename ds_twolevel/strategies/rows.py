"""Pure layout math of the sequence-sharded strategies: which query rows (seq_rows) and which cached
positions (kv_shard) each of the m ranks of a segment group owns. No tensors, no process groups.

seq_rows: the q_len query rows are padded to a multiple of m (of 2m under a plain causal mask) and
cut into blocks; rank r computes its blocks' rows at full head dim. Under a plain causal mask the
blocks are dealt in zigzag pairs (c, 2m-1-c): block c sees (c+1)/2m of the keys, so every pair sees
the same number of keys and every rank does the same work.

kv_shard: position p of the cache lives on segment rank ``p % m`` (round robin), so the ranks never
differ by more than one position, a prefill's positions split evenly and each decode step's new
position goes to the next rank in turn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RowBlock:
    """One block of query rows of a rank, in the padded row numbering."""

    start: int
    """first (padded) row."""
    rows: int
    key_stop: int
    """keys [0, key_stop) are visible; under a plain causal mask lower-right aligned (the block's
    last row sees all of them), otherwise all keys with the mask's rows."""


@dataclass(frozen=True)
class RowPlan:
    """How seq_rows deals the query rows of one call to the m ranks of a segment group.

    Example:
        >>> plan = plan_rows(2, 8, 8, causal=True)
        >>> [b.start for b in plan.blocks(0)], plan.order
        ([0, 6], [0, 3, 1, 2])
    """

    m: int
    q_len: int
    """real query rows (the last q_len positions of the keys)."""
    kv_len: int
    """real keys (cached + new)."""
    padded_len: int
    """query rows after padding (a multiple of ``num_blocks``)."""
    causal: bool
    """plain causal mask (no mask tensor): blocks see lower-right-aligned key prefixes."""

    @property
    def zigzag(self) -> bool:
        """Blocks dealt in zigzag pairs (plain causal with m > 1)."""
        return self.causal and self.m > 1

    @property
    def num_blocks(self) -> int:
        return 2 * self.m if self.zigzag else self.m

    @property
    def blocks_per_rank(self) -> int:
        return 2 if self.zigzag else 1

    @property
    def block_rows(self) -> int:
        return self.padded_len // self.num_blocks

    @property
    def rows_per_rank(self) -> int:
        return self.padded_len // self.m

    @property
    def pad(self) -> int:
        """Padding rows appended after the real ones."""
        return self.padded_len - self.q_len

    @property
    def padded_kv_len(self) -> int:
        """Keys after padding: under a causal mask ``pad`` zero keys are appended too, so that only the
        padding rows see them (a real query at position p sees keys <= p)."""
        return self.kv_len + (self.pad if self.causal else 0)

    def block_ids(self, rank: int) -> list[int]:
        """Blocks owned by ``rank``: (rank, 2m-1-rank) when zigzag, else (rank,)."""
        return [rank, 2 * self.m - 1 - rank] if self.zigzag else [rank]

    @property
    def order(self) -> list[int]:
        """Block ids of every rank, rank after rank (the all-to-all packing order)."""
        return [c for r in range(self.m) for c in self.block_ids(r)]

    def blocks(self, rank: int) -> list[RowBlock]:
        """The row blocks of ``rank`` with their visible keys."""
        rows, offset = self.block_rows, self.padded_kv_len - self.padded_len
        return [RowBlock(c * rows, rows, offset + (c + 1) * rows if self.causal else self.padded_kv_len)
                for c in self.block_ids(rank)]


def plan_rows(m: int, q_len: int, kv_len: int, *, causal: bool) -> RowPlan:
    """The row plan of a call (padding rows only when q_len does not divide into the blocks)."""
    if m < 1 or q_len < 1 or kv_len < q_len:
        raise ValueError(f"seq_rows needs m ({m}) >= 1 and 1 <= q_len ({q_len}) <= kv_len ({kv_len})")
    blocks = 2 * m if causal and m > 1 else m
    return RowPlan(m, q_len, kv_len, math.ceil(q_len / blocks) * blocks, causal)


def owned_count(length: int, rank: int, m: int) -> int:
    """kv_shard: positions among [0, length) that ``rank`` owns (p % m == rank)."""
    return max(0, (length - rank + m - 1) // m)


def first_owned(start: int, rank: int, m: int) -> int:
    """kv_shard: offset, within new positions [start, ...), of the first one ``rank`` owns."""
    return (rank - start) % m
