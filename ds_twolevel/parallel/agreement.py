"""Collective agreement: a step that any single rank can fail ends with the same error on every rank.

Loading a checkpoint, validating a config, checking a model's shards or a batch: one rank can fail
where the others succeed (a truncated shard file only that rank reads, different inputs). If the
others went on, they would wait in the next collective until the group timeout. Instead every rank
of the group takes part in one agreement: a one-element all-reduce of a failure flag (4 bytes), and
only when some rank failed, an all-gather of the messages. Then every rank raises the same
:class:`AgreementError`, naming each failed rank and its message.

Example:
    >>> with agreement(mesh.axes.tp, what="loading ckpt/"):
    ...     load_my_slices()          # may raise on one rank only
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

from ds_twolevel.parallel.layout import AxisGroup


class AgreementError(ValueError):
    """Raised on every rank of a group when at least one of them failed a step.

    ``failures`` maps the failed ranks (global ranks) to their one-line messages.
    """

    def __init__(self, what: str, failures: dict[int, str]) -> None:
        self.what, self.failures = what, dict(sorted(failures.items()))
        ranks = ", ".join(str(r) for r in self.failures)
        first = next(iter(self.failures.values()))
        others = [(r, msg) for r, msg in self.failures.items() if msg != first]  # identical messages said once
        more = "" if not others else f" (and {len(others)} other rank(s): " + "; ".join(
            f"rank {r}: {msg}" for r, msg in others) + ")"
        super().__init__(f"{what} failed on rank {ranks}: {first}{more}")


def _group_of(group: AxisGroup | dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int]:
    """(process group, size) of an axis, a raw group or the world (None)."""
    if isinstance(group, AxisGroup):
        return group.group, group.size
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    return group, dist.get_world_size(group)


def _flag_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective's tensor must live for this group's backend (CPU for gloo)."""
    backend = dist.get_backend(group)
    if backend in ("gloo", "mpi") or not torch.accelerator.is_available():
        return torch.device("cpu")
    return torch.accelerator.current_accelerator()


def agree(error: BaseException | str | None, group: AxisGroup | dist.ProcessGroup | None = None, *,
          what: str) -> None:
    """Every rank of ``group`` (default: the world) calls this with its own outcome: ``None`` when
    it succeeded, the exception (or message) when it failed. If any rank failed, every rank raises
    the same :class:`AgreementError`; otherwise all return. One 4-byte all-reduce when all agree.
    """
    pg, size = _group_of(group)
    message = None if error is None else _one_line(error)
    if size == 1:
        if message is not None:
            raise AgreementError(what, {_rank(): message})
        return
    flag = torch.tensor([0 if message is None else 1], dtype=torch.int32, device=_flag_device(pg))
    dist.all_reduce(flag, group=pg)
    if int(flag.item()) == 0:
        return
    gathered: list = [None] * size
    dist.all_gather_object(gathered, (_rank(), message), group=pg)
    raise AgreementError(what, {rank: msg for rank, msg in gathered if msg is not None})


@contextlib.contextmanager
def agreement(group: AxisGroup | dist.ProcessGroup | None = None, *, what: str) -> Iterator[None]:
    """Run the block on every rank, then :func:`agree` on its outcome. An exception raised inside
    (on any rank) becomes the same :class:`AgreementError` on every rank of ``group``."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - reported to every rank, then raised as AgreementError
        agree(err, group, what=what)
        raise  # unreachable: agree raises when this rank failed
    agree(None, group, what=what)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _one_line(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = str(error).strip().replace("\n", " ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
