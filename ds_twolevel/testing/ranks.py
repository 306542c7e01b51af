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
from dataclasses import dataclass
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


# -- jobs whose ranks end on their own (fault tests) -----------------------------------------------
@dataclass(frozen=True)
class RankExit:
    """How one rank of a :func:`run_jobs` job ended."""

    rank: int
    returncode: int | None
    """exit status (negative: killed by that signal); None: still running at the deadline (a hang)."""
    stopped: bool
    """it was stopped (SIGSTOP) when every other rank of its job had ended, and was then killed,
    as the ``deepspeed`` launcher and torchrun kill the rest of a job."""
    ended_at: float
    """``time.time()`` when it was seen ended (or was killed)."""
    output: str
    """its stdout and stderr."""


Job = tuple[Callable[..., Any], int, tuple]
"""(importable function, world size, args): every rank runs ``fn(*args)`` with the env:// variables
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) set, as a launcher does."""


def run_jobs(jobs: list[Job], *, timeout: float = 300.0, preload: tuple[str, ...] = (),
             max_parallel: int = 3) -> list[list[RankExit]]:
    """Run independent multi-rank jobs, at most ``max_parallel`` at a time; per job, how each rank ended.

    Unlike :func:`run_distributed` nothing is done when a rank fails: each rank must end on its own
    (that is what fault tests check), except that a rank left *stopped* once the rest of its job has
    ended is killed, as launchers do, and everything still running at ``timeout`` is killed and
    reported with ``returncode=None``. Ranks are forked from one fresh "zygote" process that imports
    ``preload`` once (a rank starts in milliseconds instead of re-importing torch, transformers and
    deepspeed); the zygote is their parent. Linux (reads ``/proc`` to see a stopped rank).

    Example:
        >>> [[r0, r1]] = run_jobs([(mymodule.rank_fn, 2, ("stall",))], timeout=120, preload=("torch",))
        >>> r0.returncode, r1.stopped
        (17, True)
    """
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ds_twolevel_jobs_") as tmp:
        spec = os.path.join(tmp, "jobs.pkl")
        with open(spec, "wb") as f:
            pickle.dump((jobs, timeout, preload, max_parallel, tmp), f)
        cmd = [sys.executable, "-c", "import sys; from ds_twolevel.testing.ranks import _zygote; _zygote(sys.argv[1])", spec]
        path = os.pathsep.join(p for p in sys.path if p)  # what imports here imports in the zygote (jobs' fns)
        subprocess.run(cmd, check=True, timeout=timeout + 120,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return pickle.load(f)


def _forked_rank(fn: Callable, args: tuple, env: dict[str, str], log: str) -> None:
    """In the forked child: the env:// variables, stdout/stderr to ``log``, then ``fn(*args)``."""
    import sys

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - a rank that raises exits 1 with its traceback, like a script
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _start_job(ctx, index: int, job: Job, tmp: str) -> list:
    fn, world, args = job
    port = free_port()
    procs = []
    for rank in range(world):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
        log = os.path.join(tmp, f"job{index}_rank{rank}.log")
        proc = ctx.Process(target=_forked_rank, args=(fn, args, env, log))
        proc.start()
        procs.append((proc, log))
    return procs


def _reap(index: int, procs: list, ended: dict, late: bool) -> bool:
    """Record the ranks of job ``index`` that ended; kill the stopped ones once all others ended (or
    everything at the deadline). True when the whole job is over."""
    import signal

    for rank, (proc, _) in enumerate(procs):
        if (index, rank) not in ended and proc.exitcode is not None:
            ended[(index, rank)] = (proc.exitcode, False, time.time())
    live = [r for r in range(len(procs)) if (index, r) not in ended]
    if live and (late or all(_is_stopped(procs[r][0].pid) for r in live)):
        for r in live:  # a stopped rank is killed once the others ended (as launchers do)
            stopped = _is_stopped(procs[r][0].pid)
            os.kill(procs[r][0].pid, signal.SIGKILL)
            procs[r][0].join()
            ended[(index, r)] = (None if late and not stopped else procs[r][0].exitcode, stopped, time.time())
        live = []
    return not live


def _zygote(spec: str) -> None:
    """The launcher of :func:`run_jobs` (a fresh process): preload, fork the ranks, watch them end."""
    import importlib
    import pickle

    with open(spec, "rb") as f:
        jobs, timeout, preload, max_parallel, tmp = pickle.load(f)
    for module in preload:
        importlib.import_module(module)
    ctx = mp.get_context("fork")  # this process has one thread: forking is safe
    deadline = time.monotonic() + timeout
    running: dict[int, list] = {}
    ended: dict[tuple[int, int], tuple[int | None, bool, float]] = {}
    pending = list(range(len(jobs)))
    while pending or running:
        while pending and len(running) < max_parallel:
            index = pending.pop(0)
            running[index] = _start_job(ctx, index, jobs[index], tmp)
        for index, procs in list(running.items()):
            if _reap(index, procs, ended, late=time.monotonic() > deadline):
                del running[index]
        time.sleep(0.05)
    results = []
    for index, (_, world, _) in enumerate(jobs):
        outcome = []
        for rank in range(world):
            code, stopped, at = ended[(index, rank)]
            with open(os.path.join(tmp, f"job{index}_rank{rank}.log"), errors="replace") as f:
                outcome.append(RankExit(rank, code, stopped, at, f.read()))
        results.append(outcome)
    with open(os.path.join(tmp, "result.pkl"), "wb") as f:
        pickle.dump(results, f)
