"""Collectives as autograd functions, with their gradients spelled out (DESIGN.md section 3).

Each pattern is one small ``torch.autograd.Function`` and a one-line wrapper that returns early
when the axis has a single rank. Every call is reported to the active :class:`CommCounter`s with
the bytes this rank sends under the ring algorithm, so tests can compare them with the cost model.

**Simulated axes.** An axis with a size > 1 but no process group (see :func:`simulated`) runs,
in place of each collective, the local op of the same output shape: all-gather -> concatenation
of p copies, all-reduce -> a copy, reduce-scatter -> a copy of this rank's chunk, all-to-all ->
a copy. The values are placeholders; shapes, the autograd pairing and the counted bytes are those
of the real collective. A single process can so time one rank's shard of an n x m layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ds_twolevel.parallel.layout import AxisGroup


@dataclass(frozen=True)
class CommRecord:
    """One collective issued by this rank."""

    op: str
    """"all_reduce", "all_gather", "reduce_scatter" or "all_to_all"."""
    axis: str
    """mesh axis name: "m", "n", "tp", "dp"."""
    ranks: int
    """ranks in the group."""
    numel: int
    """elements of the full (reduced / gathered) tensor; for all_to_all, of this rank's tensor."""
    element_size: int
    """bytes per element."""
    tag: str
    """what it carries: "scores", "q", "k", "sumsq", "attn_out", "mlp_out", ..."""
    backward: bool
    """issued by autograd's backward pass."""

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sends with a ring algorithm."""
        return ring_bytes(self.op, self.numel * self.element_size, self.ranks)


def ring_bytes(op: str, full_bytes: int, ranks: int) -> int:
    """Bytes one rank sends for a ring collective on a tensor of ``full_bytes`` bytes.

    all-reduce = reduce-scatter + all-gather: 2(p-1)/p; all-gather, reduce-scatter: (p-1)/p;
    all-to-all (``full_bytes`` = this rank's tensor): the (p-1)/p of it that goes to the others.
    """
    factor = 2 if op == "all_reduce" else 1
    return factor * (ranks - 1) * full_bytes // ranks


@dataclass
class CommCounter:
    """Context manager that collects every collective issued inside it (on this rank).

    Example:
        >>> with CommCounter() as comm:
        ...     loss = layer(x).sum(); loss.backward()
        >>> comm.count(op="all_reduce", backward=True)
    """

    records: list[CommRecord] = field(default_factory=list)

    def __enter__(self) -> "CommCounter":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def select(self, **match) -> list[CommRecord]:
        """Records whose fields equal every keyword given."""
        return [r for r in self.records if all(getattr(r, k) == v for k, v in match.items())]

    def count(self, **match) -> int:
        return len(self.select(**match))

    def bytes_sent(self, **match) -> int:
        return sum(r.bytes_sent for r in self.select(**match))

    def summary(self) -> dict[tuple[str, str, str, bool], tuple[int, int]]:
        """(op, axis, tag, backward) -> (calls, bytes sent)."""
        out: dict[tuple[str, str, str, bool], tuple[int, int]] = {}
        for r in self.records:
            key = (r.op, r.axis, r.tag, r.backward)
            calls, sent = out.get(key, (0, 0))
            out[key] = (calls + 1, sent + r.bytes_sent)
        return out


_ACTIVE: list[CommCounter] = []
# torch >= 2.12 renamed the tensor-in/tensor-out collectives; keep older torch working
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def simulated(axis: AxisGroup) -> bool:
    """An axis of several ranks without a process group: its collectives run locally (see module doc).

    Example:
        >>> simulated(AxisGroup("m", 4, 0)), simulated(AxisGroup.single("m"))
        (True, False)
    """
    return axis.size > 1 and axis.group is None


def _record(op: str, axis: AxisGroup, numel: int, element_size: int, tag: str, backward: bool) -> None:
    if _ACTIVE:
        rec = CommRecord(op, axis.name, axis.size, numel, element_size, tag, backward)
        for counter in _ACTIVE:
            counter.records.append(rec)


REDUCE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "input": None}
"""names a layer's ``reduce_dtype`` accepts ("input": sums in the activations' own dtype)."""


def reduce_dtype(value: object) -> torch.dtype | None:
    """A layer's ``reduce_dtype`` argument (a name of :data:`REDUCE_DTYPES`, fp32/fp64, or None) checked.

    Example:
        >>> reduce_dtype("fp32"), reduce_dtype("input"), reduce_dtype(None)
        (torch.float32, None, None)
    """
    if value is None or value in (torch.float32, torch.float64):
        return value  # type: ignore[return-value]
    if isinstance(value, str) and value in REDUCE_DTYPES:
        return REDUCE_DTYPES[value]
    raise ValueError(f"reduce_dtype must be one of {sorted(REDUCE_DTYPES)}, torch.float32, torch.float64 or None "
                     f"(sums in the activations' dtype), got {value!r}")


def _sum_dtype(x: torch.Tensor, axis: AxisGroup) -> torch.dtype:
    """The dtype a sum of ``x`` over ``axis`` runs in: the axis's ``reduce_dtype`` when wider than x's."""
    wide = axis.reduce_dtype
    if wide is None or not x.is_floating_point():
        return x.dtype
    return torch.promote_types(x.dtype, wide)


def _all_reduce(x: torch.Tensor, axis: AxisGroup, tag: str, backward: bool) -> torch.Tensor:
    work = _sum_dtype(x, axis)
    # all_reduce is in place; never write into an autograd input (``to`` copies when it converts)
    out = x.contiguous().clone() if work == x.dtype else x.to(work, memory_format=torch.contiguous_format)
    _record("all_reduce", axis, out.numel(), out.element_size(), tag, backward)
    if not simulated(axis):
        dist.all_reduce(out, group=axis.group)
    return out.to(x.dtype)


def _all_gather(x: torch.Tensor, axis: AxisGroup, dim: int, tag: str, backward: bool) -> torch.Tensor:
    local = x.movedim(dim, 0).contiguous()  # (k, ...) with the gathered dim first
    out = local.new_empty((axis.size * local.shape[0], *local.shape[1:]))
    _record("all_gather", axis, out.numel(), out.element_size(), tag, backward)
    if simulated(axis):
        out.view(axis.size, *local.shape).copy_(local.unsqueeze(0).expand(axis.size, *local.shape))
    else:
        _ALL_GATHER(out, local, group=axis.group)
    return out.movedim(0, dim)  # rank order along dim


def _reduce_scatter(x: torch.Tensor, axis: AxisGroup, dim: int, tag: str, backward: bool) -> torch.Tensor:
    work = _sum_dtype(x, axis)
    full = x.movedim(dim, 0).to(work, memory_format=torch.contiguous_format)  # (p*k, ...)
    if full.shape[0] % axis.size:
        raise ValueError(f"reduce-scatter of {full.shape[0]} rows over {axis.size} ranks")
    out = full.new_empty((full.shape[0] // axis.size, *full.shape[1:]))
    _record("reduce_scatter", axis, full.numel(), full.element_size(), tag, backward)
    if simulated(axis):
        out.copy_(full.narrow(0, axis.rank * out.shape[0], out.shape[0]))  # this rank's chunk
    else:
        _REDUCE_SCATTER(out, full, group=axis.group)
    return out.to(x.dtype).movedim(0, dim)


def _all_to_all(x: torch.Tensor, axis: AxisGroup, tag: str, backward: bool) -> torch.Tensor:
    send = x.contiguous()  # (p, ...): chunk r goes to rank r
    if send.shape[0] != axis.size:
        raise ValueError(f"all-to-all of {send.shape[0]} chunks over {axis.size} ranks")
    out = torch.empty_like(send)
    _record("all_to_all", axis, send.numel(), send.element_size(), tag, backward)
    if simulated(axis):
        out.copy_(send)
    else:
        dist.all_to_all_single(out, send, group=axis.group)
    return out


class _CopyToAxis(torch.autograd.Function):
    """forward: identity; backward: all-reduce (the input feeds every rank's partial compute)."""

    @staticmethod
    def forward(ctx, x, axis, tag):
        ctx.axis, ctx.tag = axis, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.axis, ctx.tag, True), None, None


class _ReduceFromAxis(torch.autograd.Function):
    """forward: all-reduce; backward: identity (the sum is replicated and used identically)."""

    @staticmethod
    def forward(ctx, x, axis, tag):
        return _all_reduce(x, axis, tag, False)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _AllReduceBoth(torch.autograd.Function):
    """forward: all-reduce; backward: all-reduce (each rank uses the sum differently)."""

    @staticmethod
    def forward(ctx, x, axis, tag):
        ctx.axis, ctx.tag = axis, tag
        return _all_reduce(x, axis, tag, False)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.axis, ctx.tag, True), None, None


class _AllGather(torch.autograd.Function):
    """forward: all-gather along dim; backward: reduce-scatter (m consumers of the gathered tensor)."""

    @staticmethod
    def forward(ctx, x, axis, dim, tag):
        ctx.axis, ctx.dim, ctx.tag = axis, dim, tag
        return _all_gather(x, axis, dim, tag, False)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.axis, ctx.dim, ctx.tag, True), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """forward: reduce-scatter along dim; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, axis, dim, tag):
        ctx.axis, ctx.dim, ctx.tag = axis, dim, tag
        return _reduce_scatter(x, axis, dim, tag, False)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.axis, ctx.dim, ctx.tag, True), None, None, None


class _AllToAll(torch.autograd.Function):
    """forward: all-to-all of dim-0 chunks; backward: the same exchange of the gradient chunks
    (rank r's chunk j came from rank j's chunk r, so its gradient goes back the same way)."""

    @staticmethod
    def forward(ctx, x, axis, tag):
        ctx.axis, ctx.tag = axis, tag
        return _all_to_all(x, axis, tag, False)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.axis, ctx.tag, True), None, None


def copy_to_axis(x: torch.Tensor, axis: AxisGroup, tag: str = "input_grad") -> torch.Tensor:
    """Identity forward, all-reduce backward: at the input of a partitioned layer."""
    return x if axis.size == 1 else _CopyToAxis.apply(x, axis, tag)


def reduce_from_axis(x: torch.Tensor, axis: AxisGroup, tag: str = "output") -> torch.Tensor:
    """All-reduce forward, identity backward: the row-parallel output of a partitioned layer."""
    return x if axis.size == 1 else _ReduceFromAxis.apply(x, axis, tag)


def all_reduce_both(x: torch.Tensor, axis: AxisGroup, tag: str = "partial") -> torch.Tensor:
    """All-reduce forward and backward: partial scores / sums of squares over segments."""
    return x if axis.size == 1 else _AllReduceBoth.apply(x, axis, tag)


def all_gather_dim(x: torch.Tensor, axis: AxisGroup, dim: int, tag: str = "gather") -> torch.Tensor:
    """All-gather along ``dim`` (rank order), reduce-scatter backward."""
    return x if axis.size == 1 else _AllGather.apply(x, axis, dim, tag)


def reduce_scatter_dim(x: torch.Tensor, axis: AxisGroup, dim: int, tag: str = "scatter") -> torch.Tensor:
    """Reduce-scatter along ``dim`` (rank r keeps chunk r), all-gather backward."""
    return x if axis.size == 1 else _ReduceScatter.apply(x, axis, dim, tag)


def all_to_all_dim0(x: torch.Tensor, axis: AxisGroup, tag: str = "all_to_all") -> torch.Tensor:
    """(p, ...) -> (p, ...): chunk r is sent to rank r; chunk j of the result came from rank j."""
    return x if axis.size == 1 else _AllToAll.apply(x, axis, tag)
