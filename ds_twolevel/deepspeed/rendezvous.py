"""Distributed start-up for the DeepSpeed path: read and check the config on every rank, rendezvous
through ``deepspeed.init_distributed`` (gloo on CPU, the configured timeout), agree on the outcome,
and build the dp x n x m mesh.

Example:
    >>> mesh = build_mesh("ds_configs/zero2_n2_m2.json")   # under the deepspeed launcher
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Mapping

import torch.distributed as dist

from ds_twolevel.deepspeed.compat import release_shm_workspace
from ds_twolevel.deepspeed.config import TwoLevelConfig, check_deepspeed_config, load_deepspeed_config, read_json
from ds_twolevel.parallel import watchdog
from ds_twolevel.parallel.agreement import agree, agreement
from ds_twolevel.parallel.layout import TwoLevelMesh


def device_type() -> str:
    """DeepSpeed's accelerator device name ("cpu", "cuda", ...)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def env_world_size() -> int | None:
    """The world size: torch.distributed's once initialised, else the launcher's ``WORLD_SIZE``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def init_distributed(tl: TwoLevelConfig) -> None:
    """``deepspeed.init_distributed`` with the configured backend and timeout (no-op if done), then
    this rank's watchdog (``ds_twolevel.parallel.watchdog``: the rank stops when its launcher exits, and a
    heartbeat lets ``fail_fast`` name a peer that stopped responding).

    Example:
        >>> init_distributed(TwoLevelConfig(n=2, m=2))
    """
    import deepspeed

    from ds_twolevel.deepspeed.env import quiet_launch

    backend = tl.dist_backend or ("gloo" if device_type() == "cpu" else None)
    join_own_job(backend, datetime.timedelta(seconds=tl.timeout_s))
    with quiet_launch():  # the CPU shm op: per-environment build dir, a message while it compiles
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=tl.timeout_s),
                                   verbose=False)
    release_shm_workspace()
    watchdog.start(rank=dist.get_rank(), world_size=dist.get_world_size())
    if device_type() != "cpu":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


class RendezvousError(RuntimeError):
    """This rank would join another job's rendezvous (its master port is taken): refused before joining."""


JOB_KEY = "ds_twolevel/job"
"""store key under which rank 0 publishes its job token before any rank joins the process group."""
JOB_ENV = "DS_TWOLEVEL_JOB_ID"
"""an explicit job id (the same on every node of a job): the token every rank compares, multi-node included."""


def job_token() -> str | None:
    """What every rank of this job shares and another job's ranks do not: ``DS_TWOLEVEL_JOB_ID`` when
    set; else, for a job whose ranks all run on this host, the host and the launcher process that
    started them (rank 0's parent: the ``deepspeed`` launcher's ``launch``, ``srun``'s step daemon, a
    shell); None for a multi-node job without an explicit id."""
    explicit = os.environ.get(JOB_ENV)
    if explicit:
        return f"id {explicit}"
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    if local is None or local != os.environ.get("WORLD_SIZE"):
        return None
    return f"launcher pid {os.getppid()} on {socket.gethostname()}"


def _ancestors() -> set[int]:
    """This process's ancestors' pids (Linux /proc; the parent only elsewhere)."""
    found, pid = set(), os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def foreign(theirs: str, mine: str | None, world: int) -> bool:
    """Whether rank 0's published ``"<world> <token>"`` is another job's: another world size, another
    explicit id, or (one host, no id) a rank 0 whose launcher is not among this rank's ancestors."""
    their_world, _, token = theirs.partition(" ")
    if their_world != str(world):
        return True
    if mine is None or not token:
        return bool(token) != bool(mine)
    if token.startswith("launcher pid ") and mine.startswith("launcher pid "):
        pid, _, host = token[len("launcher pid "):].partition(" on ")
        return host != socket.gethostname() or int(pid) not in _ancestors()
    return token != mine


def _busy(err: BaseException) -> bool:
    text = str(err).lower()
    return "eaddrinuse" in text or "address already in use" in text


def _port_in_use(port: str) -> str:
    return (f"port {port} is in use by another job; pass --master_port (e.g. deepspeed --master_port {int(port) + 1} "
            f"..., torchrun --master_port {int(port) + 1} ..., or MASTER_PORT={int(port) + 1})")


def join_own_job(backend: str | None, timeout: datetime.timedelta) -> None:
    """``init_process_group`` through a store this job owns, or a one-line :class:`RendezvousError`.

    Under an env:// launcher (``deepspeed``, or any that sets MASTER_ADDR/PORT, RANK, WORLD_SIZE and no
    torchrun agent store) rank 0 creates the rendezvous store itself: when the master port is taken it
    says so. It then publishes :func:`job_token`; every other rank reads it before joining and refuses a
    store whose token is another job's, so two jobs started on one port never mix their collectives.
    No-op when torch.distributed is initialised or the variables are missing (torchrun's agent hosts
    its own store: a second agent on a busy port fails in torchrun itself).

    Example:
        >>> join_own_job("gloo", datetime.timedelta(seconds=600))   # init_distributed does this
    """
    env = os.environ
    if dist.is_initialized() or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or \
            not all(env.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        return
    host, port, rank, world = env["MASTER_ADDR"], env["MASTER_PORT"], int(env["RANK"]), int(env["WORLD_SIZE"])
    token = job_token()
    try:
        store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    except Exception as err:  # noqa: BLE001 - the bind of a busy port, said in one line
        if rank == 0 and _busy(err):
            raise RendezvousError(f"rank 0: {_port_in_use(port)}") from None
        raise
    if rank == 0:
        store.set(JOB_KEY, f"{world} {token or ''}")
    else:
        store.wait([JOB_KEY], timeout)
        theirs = store.get(JOB_KEY).decode()
        if foreign(theirs, token, world):
            their_world, _, their_token = theirs.partition(" ")
            raise RendezvousError(f"rank {rank}: {_port_in_use(port)}: the rendezvous store at {host}:{port} belongs "
                                  f"to a job of {their_world} ranks whose rank 0 runs under {their_token or 'no job id'}"
                                  f", this rank (of {world}) under {token or 'no job id'}")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _validate_on_rank(config: str | os.PathLike | Mapping[str, Any],
                      world: int | None) -> tuple[TwoLevelConfig | None, dict | None, ValueError | None]:
    """(two_level, DeepSpeed dict, None) or (None, None, the ValueError): this rank's reading of the config."""
    try:
        tl, ds = load_deepspeed_config(config)
        if world is not None:
            check_deepspeed_config(tl, ds, world, device_type=device_type())
        return tl, ds, None
    except ValueError as err:  # name this rank's file: another rank may have read another copy
        named = isinstance(config, (str, os.PathLike)) and str(config) not in str(err)
        return None, None, ValueError(f"{str(config)!r}: {err}") if named else err


def build_mesh(config: str | os.PathLike | Mapping[str, Any]) -> TwoLevelMesh:
    """Validate the config, initialise distributed and build the dp x n x m mesh.

    Every rank reads and checks the config itself, then the ranks agree on the outcome
    (``ds_twolevel.parallel.agreement``: one 4-byte all-reduce): a config that fails on any rank — the same
    file everywhere, or one node's copy — raises the same AgreementError on every rank, naming the
    rank(s) and the file, instead of leaving the others waiting for it in the rendezvous or the
    first collective. The mesh is built under a second agreement.

    Example:
        >>> mesh = build_mesh("ds_configs/zero2_n2_m2.json")   # under the deepspeed launcher
    """
    world = env_world_size()
    tl, ds, error = _validate_on_rank(config, world)
    if error is not None and world in (None, 1) and not dist.is_initialized():
        raise error  # a single process: nobody to tell
    # a rank whose config failed still joins the rendezvous (its own timeout, if readable, else the
    # default) so that the agreement can tell every rank
    try:
        init_distributed(tl or _fallback_two_level(config))
    except RendezvousError:  # another job's port or store: nothing of this job can be agreed on
        raise
    except Exception:
        if error is not None:  # the rendezvous failed too: this rank's own problem comes first
            raise error from None
        raise
    if error is None:
        try:
            layout = check_deepspeed_config(tl, ds, dist.get_world_size(), device_type=device_type())
        except ValueError as err:
            error = err
    agree(error, None, what="validating the DeepSpeed config")
    with agreement(None, what="building the dp x n x m mesh"):
        return layout.build(timeout=datetime.timedelta(seconds=tl.timeout_s))


def _fallback_two_level(config: str | os.PathLike | Mapping[str, Any]) -> TwoLevelConfig:
    """The settings a rank whose config failed uses to reach the agreement: its own timeout and
    backend when those two are valid, the defaults otherwise."""
    try:
        section = dict(read_json(config).get("two_level") or {})
    except (ValueError, OSError, TypeError, AttributeError):
        section = {}
    kept = {}
    for key in ("timeout_s", "dist_backend"):
        try:
            TwoLevelConfig(n=1, m=1, **{key: section[key]})
            kept[key] = section[key]
        except (KeyError, ValueError, TypeError):
            pass
    return TwoLevelConfig(n=1, m=1, **kept)
