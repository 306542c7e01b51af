"""The sequence-parallel residual stream inside a layer's n*m ranks (DESIGN.md section 8).

Between sublayers rank r of the tensor-parallel axis holds tokens [r*s/p, (r+1)*s/p) of every
sequence (p = n*m). A column-parallel entry gathers the sequence, a row-parallel exit reduce-scatters
it; the pair moves the bytes of the all-reduce it replaces (Megatron-LM, arXiv 2205.05198):

=================================  =============================  ==========================
place                              forward                        backward
=================================  =============================  ==========================
layer input -> q/k/v, gate/up      all-gather along s over tp     reduce-scatter along s
o_proj, down_proj -> residual      reduce-scatter along s         all-gather along s
=================================  =============================  ==========================

Both are the paired autograd functions of :mod:`ds_twolevel.parallel.collectives`; the wrappers here
check the shapes first and name the numbers.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ds_twolevel.parallel import collectives as comm
from ds_twolevel.parallel.layout import AxisGroup

SEQ_DIM = 1
"""the sequence dim of a (b, s, H) residual stream."""


def gather_sequence(x: torch.Tensor, tp: AxisGroup, tag: str, dim: int = SEQ_DIM) -> torch.Tensor:
    """(b, s/p, H) local tokens -> (b, s, H), rank r's tokens at [r*s/p, (r+1)*s/p).

    forward: all-gather along ``dim`` over ``tp``; backward: reduce-scatter (every rank's partial
    gradient of the whole sequence is summed into the owner's tokens).

    Example:
        >>> x_full = gather_sequence(x_local, mesh.axes.tp, "attn_in")  # (b, s, H)
    """
    return comm.all_gather_dim(x, tp, dim, tag)


def scatter_sequence(x: torch.Tensor, tp: AxisGroup, tag: str, dim: int = SEQ_DIM) -> torch.Tensor:
    """(b, s, H) partial sums of every rank -> (b, s/p, H) the sum of rank r's tokens.

    forward: reduce-scatter along ``dim`` over ``tp`` (in the axis's ``reduce_dtype``); backward:
    all-gather.

    Example:
        >>> y_local = scatter_sequence(o_proj(out), mesh.axes.tp, "attn_out")  # (b, s/p, H)
    """
    if x.shape[dim] % tp.size:
        raise ValueError(f"sequence parallelism over {tp.size} ranks: sequence length {x.shape[dim]} is not "
                         f"divisible by {tp.size}; pad it to a multiple of {tp.size} (shard_batch does)")
    return comm.reduce_scatter_dim(x, tp, dim, tag)


def gather_tokens_no_grad(x: torch.Tensor, tp: AxisGroup, tag: str, dim: int = SEQ_DIM) -> torch.Tensor:
    """All-gather of a tensor that carries no gradient (token ids, positions, a padding mask).

    Example:
        >>> positions = gather_tokens_no_grad(position_ids, mesh.axes.tp, "positions")  # (b, s)
    """
    with torch.no_grad():
        return comm.all_gather_dim(x.detach(), tp, dim, tag)


def local_range(seq_len: int, tp: AxisGroup) -> tuple[int, int]:
    """[start, stop) of the tokens rank ``tp.rank`` holds of a sequence of ``seq_len`` tokens.

    Example:
        >>> local_range(8, AxisGroup("tp", 4, 1))
        (2, 4)
    """
    if seq_len % tp.size:
        raise ValueError(f"sequence parallelism over {tp.size} ranks: sequence length {seq_len} is not divisible "
                         f"by {tp.size}; pad it to a multiple of {tp.size} (shard_batch does)")
    per = seq_len // tp.size
    return tp.rank * per, (tp.rank + 1) * per


def _sum_over_tp(grad: torch.Tensor, tp: AxisGroup, when: Callable[[], bool] | None) -> torch.Tensor:
    if when is not None and not when():
        return grad
    return comm._all_reduce(grad, tp, "replicated_grad", True)


def sum_replicated_grads(params: Iterable[nn.Parameter], tp: AxisGroup, *,
                         when: Callable[[], bool] | None = None) -> list[RemovableHandle]:
    """Make each parameter's gradient the sum over ``tp`` of the ranks' gradients, as it is computed.

    A replicated weight applied to this rank's tokens only (a norm, a bias added after a
    reduce-scatter, a replicated embedding or LM head) gets the gradient of those tokens; the whole
    sequence's gradient is the sum over the layer's ranks (Megatron sums its sequence-parallel norm
    weights the same way). A hook on the parameter all-reduces the gradient before it is
    accumulated (before ZeRO's hooks see it). ``when``: a switch read at backward time (None: always).

    Example:
        >>> handles = sum_replicated_grads([block.attn_norm.weight, block.mlp_norm.weight], mesh.axes.tp)
    """
    if tp.size == 1:
        return []
    return [p.register_hook(functools.partial(_sum_over_tp, tp=tp, when=when)) for p in params if p.requires_grad]
