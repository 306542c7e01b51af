"""Orphaned ranks stop, and a peer that stopped answering is named.

One daemon thread per rank, started by :func:`ds_twolevel.deepspeed.runtime.init_distributed`
(so by ``build_mesh``, ``initialize`` and ``init_inference``) and by
:func:`ds_twolevel.accelerate.build_mesh`, does two things every
:data:`INTERVAL_S` seconds:

- **orphan watchdog.** Killing the ``deepspeed`` launcher alone used to leave every rank training
  to the end. The thread remembers the launcher processes this rank depends on — its parent (the
  ``deepspeed.launcher.launch`` process, the ``torchrun`` agent, accelerate's or a test's spawner)
  and, above a ``deepspeed.launcher.launch`` parent, the ``deepspeed`` runner that started it —
  and when one of them exits (its child is re-parented, which also catches a launcher that is a
  zombie), it prints one line and ends the rank with :data:`EXIT_ORPHANED`. Checkpoint and export
  writes are atomic, so an exit at any instant leaves no half-written file. Portable: the parent
  check needs only ``os.getppid`` (POSIX); the runner check reads ``/proc`` (Linux) and is skipped
  where it does not exist. A parent-death signal (``PR_SET_PDEATHSIG``) is not used: Linux sends
  it when the parent *thread* that forked the rank exits, which can be long before the launcher.
- **heartbeat.** It adds 1 to ``ds_twolevel/hb/<rank>`` in the job's rendezvous store (its own
  client of ``MASTER_ADDR:MASTER_PORT``). When a collective fails because a peer died or stalled,
  :func:`unresponsive_peers` compares the counters over a few intervals: the ranks whose counter
  stood still are the ones that died, were stopped or hang with the GIL held — so
  ``fail_fast``'s message names them.

``DS_TWOLEVEL_WATCHDOG=0`` turns both off (a rank started by hand from a shell that may close).

Example:
    >>> start(rank=dist.get_rank())            # once per process, after init_process_group
    >>> unresponsive_peers()                   # after a failed collective
    {1: 'pid 4242 on this host, stopped (SIGSTOP/SIGTSTP)'}
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

INTERVAL_S = 1.0
"""seconds between two checks of the launcher and two heartbeats."""
EXIT_ORPHANED = 18
"""exit status of a rank that stopped because its launcher exited."""
ENV_SWITCH = "DS_TWOLEVEL_WATCHDOG"
KEY = "ds_twolevel/hb/"
WHO = "ds_twolevel/who/"


@dataclass(frozen=True)
class Watched:
    """A launcher process this rank depends on, and the parent it had when the rank started."""

    pid: int
    parent: int
    name: str


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid`` from /proc (Linux); None where unavailable or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _name(pid: int) -> str:
    """A short name of the program ``pid`` runs ("deepspeed", "deepspeed.launcher.launch", "torchrun")."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    argv = [a for a in argv if a]
    if argv and os.path.basename(argv[0]).startswith("python"):
        argv = [a for a in argv[1:] if a not in ("-u", "-m", "-O", "-B")] or argv
    return os.path.basename(argv[0]) if argv else f"pid {pid}"


def launcher_chain() -> list[Watched]:
    """The processes whose exit orphans this rank: the parent, and the runner above a
    ``deepspeed.launcher.launch`` parent (Linux). Empty for a process without a real parent."""
    parent = os.getppid()
    if parent <= 1:
        return []
    chain = [Watched(parent, -1, _name(parent))]
    stat = _proc_stat(parent)
    if stat is not None and chain[0].name == "deepspeed.launcher.launch" and stat[1] > 1:
        chain.append(Watched(stat[1], parent, _name(stat[1])))
    return chain


def gone(chain: list[Watched], parent_at_start: int) -> Watched | None:
    """The first watched launcher that has exited, or None."""
    for watched in chain:
        if watched.parent == -1:  # our own parent: POSIX re-parents us when it exits
            if os.getppid() != parent_at_start:
                return watched
        else:  # the runner above our parent: our parent was re-parented when it exited
            stat = _proc_stat(watched.parent)
            if stat is not None and stat[1] != watched.pid:
                return watched
    return None


def _listening() -> bool:
    """Whether the rendezvous store still accepts connections (a refused connect is silent, unlike
    an operation on a store client whose server is gone)."""
    try:
        socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=2).close()
        return True
    except (OSError, KeyError, ValueError):
        return False


def _rendezvous_store(timeout_s: float):
    """A new client of the job's rendezvous store (env:// variables), or None."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception:  # noqa: BLE001 - no store, no heartbeat; nothing else depends on it
        return None


def _state_text(pid: int) -> str:
    """What /proc shows of a process on this host: "exited", "stopped (SIGSTOP/SIGTSTP)", ..."""
    stat = _proc_stat(pid)
    return {None: "exited", "Z": "exited", "X": "exited", "T": "stopped (SIGSTOP/SIGTSTP)",
            "t": "stopped (traced)"}.get(None if stat is None else stat[0], "alive but not answering")


class Watchdog(threading.Thread):
    """The daemon thread: orphan check + heartbeat every ``interval`` seconds.

    Before each store operation it checks that the store still listens and, when the process
    hosting it (rank 0, or the torchrun agent) is on this host, that it is not stopped: an
    operation on a store that is gone prints a C++ warning with a stack trace, which a job that
    ended normally must not show.
    """

    def __init__(self, rank: int, world_size: int, chain: list[Watched], store, interval: float) -> None:
        super().__init__(name="ds_twolevel-watchdog", daemon=True)
        self.rank, self.world_size, self.chain, self.store, self.interval = rank, world_size, chain, store, interval
        self.parent_at_start = os.getppid()
        self.lock = threading.Lock()
        self.host_pid, self.host_rank = self._store_host()
        self.host_lost: str | None = None
        """why the store host's process is gone ("exited", "stopped ..."), once seen."""
        self.stopping = threading.Event()
        if store is not None:
            self._store_op(lambda s: s.set(f"{WHO}{rank}", f"{socket.gethostname()} {os.getpid()} {node_rank()}"))

    def _store_host(self) -> tuple[int | None, int | None]:
        """(pid of the store's host process when on this host, its rank or None for an agent)."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun: the agent hosts it
            return (os.getppid() if os.environ.get("GROUP_RANK", "0") == "0" else None), None
        return (os.getpid() if self.rank == 0 else None), 0  # env://: rank 0; its pid is read from WHO/0

    def _host_alive(self) -> bool:
        """False once the store's host process (on this host) has exited or is stopped."""
        if self.host_pid is None and self.host_rank == 0 and self.store is not None:
            try:  # rank 0 publishes "<host> <pid>" when its watchdog starts
                if self.store.check([f"{WHO}0"]):
                    host, pid, _ = _who(self.store.get(f"{WHO}0"))
                    self.host_pid = pid if host == socket.gethostname() else -1
            except Exception:  # noqa: BLE001 - treated like any failed store operation
                return False
        if self.host_pid is not None and self.host_pid > 0 and self.host_pid != os.getpid():
            state = _state_text(self.host_pid)
            if state != "alive but not answering":
                self.host_lost = state
                return False
        return self.host_pid == os.getpid() or _listening()

    def _store_op(self, op):
        """Run ``op(store)``; on failure, stop using the store (it may be gone with rank 0)."""
        with self.lock:
            if self.store is None:
                return None
            try:
                if not self._host_alive():
                    self.store = None
                    return None
                return op(self.store)
            except Exception:  # noqa: BLE001 - the job is ending; the heartbeat must not add noise
                self.store = None
                return None

    def run(self) -> None:
        while True:
            lost = gone(self.chain, self.parent_at_start)
            if lost is not None:
                print(f"[ds_twolevel] rank {self.rank}: the launcher is gone (process {lost.pid}, {lost.name}, "
                      f"exited); stopping this rank (exit {EXIT_ORPHANED}) instead of running on without it "
                      f"({ENV_SWITCH}=0 keeps ranks running)", file=sys.stderr, flush=True)
                os._exit(EXIT_ORPHANED)
            self._store_op(lambda s: s.add(f"{KEY}{self.rank}", 1))
            if self.stopping.wait(self.interval):
                return

    def stop(self) -> None:
        """End the thread and drop its store client while no store operation is in flight: a daemon
        thread still inside a TCPStore call when the interpreter exits aborts the process
        ("terminate called without an active exception", exit -6) after a job that succeeded."""
        self.stopping.set()
        with self.lock:
            self.store = None
        if self is not threading.current_thread():
            self.join(timeout=self.interval + 5)

    def counters(self) -> dict[int, int] | None:
        """Every rank's heartbeat count (0 for one that never beat), or None without a store."""
        out = {}
        for r in range(self.world_size):
            value = self._store_op(lambda s, r=r: s.add(f"{KEY}{r}", 0))
            if value is None:
                return None
            out[r] = int(value)
        return out

    def where(self, rank: int) -> str:
        """What can be seen of ``rank``'s process from here ("pid 42 on this host, stopped ...")."""
        who = self._store_op(lambda s: s.get(f"{WHO}{rank}") if s.check([f"{WHO}{rank}"]) else None)
        if not who:
            return "never started its heartbeat"
        host, pid, node = _who(who)
        node = f" (node {node})" if node else ""
        if host != socket.gethostname():
            return f"pid {pid} on {host}{node}"
        return f"pid {pid} on this host{node}, {_state_text(pid)}"


def node_rank() -> str:
    """This rank's node (torchrun's ``GROUP_RANK``, the ``deepspeed`` launcher's ``CROSS_RANK``) in a
    multi-node job, else ""."""
    nodes = os.environ.get("GROUP_WORLD_SIZE") or os.environ.get("CROSS_SIZE") or "1"
    return "" if nodes == "1" else os.environ.get("GROUP_RANK") or os.environ.get("CROSS_RANK") or ""


def _who(value: bytes) -> tuple[str, int, str]:
    """(host, pid, node rank or "") of a ``WHO`` record."""
    host, pid, *node = value.decode().split(" ")
    return host, int(pid), node[0] if node else ""


_WATCHDOG: Watchdog | None = None


def start(rank: int, world_size: int | None = None, *, interval: float = INTERVAL_S) -> Watchdog | None:
    """Start this process's watchdog once (no-op when already running or ``DS_TWOLEVEL_WATCHDOG=0``).

    Call after ``init_process_group`` (the heartbeat connects to the rendezvous store).
    """
    global _WATCHDOG
    if _WATCHDOG is not None or os.environ.get(ENV_SWITCH, "1") == "0":
        return _WATCHDOG
    import torch.distributed as dist

    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    store = _rendezvous_store(timeout_s=max(3 * interval, 5.0)) if world_size > 1 else None
    _WATCHDOG = Watchdog(rank, world_size, launcher_chain(), store, interval)
    _WATCHDOG.start()
    atexit.register(_WATCHDOG.stop)  # atexit runs while daemon threads still run: stop it cleanly first
    return _WATCHDOG


def unresponsive_peers(wait_s: float | None = None) -> dict[int, str] | None:
    """After a failed collective: the other ranks whose heartbeat stood still for ``wait_s``
    (default 3 intervals), each with what is visible of its process. When the store's host is
    rank 0 on this host and it exited or is stopped, that is the answer. None when this process has
    no heartbeat (no watchdog, no store) or the store is unreachable for another reason."""
    dog = _WATCHDOG
    if dog is None:
        return None
    wait_s = 3 * dog.interval if wait_s is None else wait_s
    before = dog.counters()
    if before is not None:
        time.sleep(wait_s)
    after = dog.counters() if before is not None else None
    if after is None:
        if dog.host_lost is not None and dog.host_rank == 0 and dog.rank != 0:
            return {0: f"pid {dog.host_pid} on this host, {dog.host_lost}; it hosts the rendezvous store"}
        return None
    return {r: dog.where(r) for r in range(dog.world_size) if r != dog.rank and after[r] == before[r]}


def describe_peers(peers: dict[int, str] | None) -> str:
    """``unresponsive_peers()`` as text for an error line."""
    if peers is None:
        store_host = "the torchrun agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
        return (f"which rank is unknown (no heartbeat, or the rendezvous store, hosted by {store_host}, "
                f"is unreachable: then {store_host} is the one that stopped)")
    if not peers:
        return ("every peer's heartbeat is still running: a peer is alive but did not join the collective in time "
                "(slower than the timeout, or busy elsewhere)")
    return "; ".join(f"rank {r} stopped responding ({what})" for r, what in sorted(peers.items()))
