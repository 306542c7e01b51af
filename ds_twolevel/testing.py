"""Spawn local ranks on gloo and collect what each returns: the one helper tests and the demo use.

Each rank runs ``fn(*args)`` after ``init_process_group`` and returns a picklable value. A rank
that raises, dies or outlives ``timeout`` fails the whole run with that rank's traceback; the
others are terminated (never a hang).
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None, *,
            floor: float = 1e-30) -> float:
    """max |actual - expected| / max |expected| (or / ``scale`` when given), the denominator
    floored at ``floor``: the error measure every parity check in this project uses."""
    actual, expected = actual.detach().float(), expected.detach().float()
    denom = float(expected.abs().max()) if scale is None else scale
    return float((actual - expected).abs().max()) / max(denom, floor)


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, pg_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # report every failure to the parent, including KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _dead_ranks(procs: list, wait: float) -> list[int]:
    """Ranks that exited non-zero, waiting up to ``wait`` s for a crashing peer to be reaped."""
    end = time.monotonic() + wait
    while True:
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > end:
            return dead
        time.sleep(0.05)


class RankFailure(RuntimeError):
    """A spawned rank raised, died, or timed out."""


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0,
                    pg_timeout: float = 120.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    ``fn`` must be importable (a module-level function) because ranks are spawned.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, pg_timeout), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(out) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise RankFailure(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish in {timeout}s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailure(f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                continue
            if not ok:  # name a dead peer first: it is usually the cause ("connection closed by peer")
                dead = _dead_ranks(procs, wait=2.0)
                cause = f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}; " if dead else ""
                raise RankFailure(f"{cause}rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]
