"""Fail fast: a collective that fails because a peer rank died or stalled becomes one clear line and
an exit (:data:`EXIT_PEER_LOST`), instead of a traceback or a hang.

Example:
    >>> with ds_twolevel.fail_fast(engine.two_level.config.timeout_s):
    ...     train(engine)
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch.distributed as dist

from ds_twolevel.parallel import watchdog

EXIT_PEER_LOST = 17
"""Exit status of a rank that stopped because a peer died or stalled (see :func:`fail_fast`)."""
_PEER_FAILURE_HINTS = ("timed out", "timeout", "connection closed", "connection reset", "connection refused",
                       "broken pipe", "closed by peer", "communicator was aborted")


def _is_peer_failure(err: BaseException) -> bool:
    """The backend's error for a collective whose peer died or stalled (DistError, or its words)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(h in str(err).lower() for h in _PEER_FAILURE_HINTS)


@contextlib.contextmanager
def fail_fast(timeout_s: float, *, what: str = "training") -> Iterator[None]:
    """Turn a collective that fails because a peer died or stalled into a clear message and an exit.

    A rank waiting on a dead or stalled peer gets an error from the backend within
    ``timeout_s`` (the process-group timeout set from ``"two_level.timeout_s"``); this names the
    rank(s) that stopped (their heartbeat stood still, ``ds_twolevel.parallel.watchdog``; a few seconds),
    prints one line and exits with :data:`EXIT_PEER_LOST` without tearing down the process group
    (which could wait on the dead peer again). Wrap any phase: ``what="loading"``, ``"saving"``,
    ``"generating"``.

    Example:
        >>> with ds_twolevel.fail_fast(engine.two_level.config.timeout_s):
        ...     train(engine)
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - filtered below, anything else re-raised
        if not _is_peer_failure(err):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        peers = watchdog.describe_peers(watchdog.unresponsive_peers())
        print(f"[ds_twolevel] rank {rank}: a peer rank died or stopped responding during {what}: {peers}; a "
              f"collective failed (timeout {timeout_s:g} s): {first}. Stopping this rank (exit {EXIT_PEER_LOST}).",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)
