"""The collectives the sequence-sharded strategies issue, with simulated axes.

Each wrapper calls the paired autograd collective of :mod:`ds_twolevel.parallel.collectives` (so every call
is counted by :class:`~ds_twolevel.parallel.collectives.CommCounter`). An axis that has a size but no
process group - one rank's shard timed in a single process - runs the local op of the same
output shape instead (issue 13's "simulated axes"; the results are then placeholders, only their
shapes and costs are real). When the collectives module simulates axes itself, these wrappers
become plain re-exports.
"""
from __future__ import annotations

import torch

from ds_twolevel.parallel import collectives as coll
from ds_twolevel.parallel.layout import AxisGroup


def simulated(axis: AxisGroup) -> bool:
    """An axis of several ranks without a process group (single-process timing of one shard)."""
    return axis.size > 1 and axis.group is None


def all_gather_dim(x: torch.Tensor, axis: AxisGroup, dim: int, tag: str) -> torch.Tensor:
    """All-gather along ``dim`` (rank order); backward reduce-scatter."""
    if simulated(axis):
        return torch.cat([x] * axis.size, dim=dim)
    return coll.all_gather_dim(x, axis, dim, tag)


def all_to_all_dim0(x: torch.Tensor, axis: AxisGroup, tag: str) -> torch.Tensor:
    """(p, ...) -> (p, ...): chunk r goes to rank r; backward the same exchange."""
    if simulated(axis):
        return x.clone()  # a new buffer of the same shape, as the real exchange writes
    return coll.all_to_all_dim0(x, axis, tag)


def all_reduce_both(x: torch.Tensor, axis: AxisGroup, tag: str) -> torch.Tensor:
    """All-reduce forward and backward."""
    if simulated(axis):
        return x.clone()
    return coll.all_reduce_both(x, axis, tag)


def copy_to_axis(x: torch.Tensor, axis: AxisGroup, tag: str) -> torch.Tensor:
    """Identity forward, all-reduce backward."""
    return x if simulated(axis) else coll.copy_to_axis(x, axis, tag)


def reduce_from_axis(x: torch.Tensor, axis: AxisGroup, tag: str) -> torch.Tensor:
    """All-reduce forward, identity backward."""
    if simulated(axis):
        return x.clone()
    return coll.reduce_from_axis(x, axis, tag)
