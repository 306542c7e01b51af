"""What every DeepSpeed launch of this package passes through before ``deepspeed.init_distributed``.

DeepSpeed 0.19.8 on CPU JIT-compiles a shared-memory comm op (``deepspeed_shm_comm``) in every
rank's first ``init_distributed``, through ``torch.utils.cpp_extension.load``:

- torch's default build root (``~/.cache/torch_extensions/py311_cpu``) is shared by every Python
  environment of the user, so each environment that uses it rewrites the build file and recompiles
  (about 2 min of CPU time; 8-14 min of wall time on a loaded 2-core machine), while the other ranks
  wait silently on the build's lock file. :func:`use_environment_extensions_dir` gives each
  environment its own root (``TORCH_EXTENSIONS_DIR``, unless the user set one).
- DeepSpeed prints ``... built successfully`` on every rank, also when nothing was built.
  :func:`load_shm_comm_op` loads the op with a message from local rank 0 only: what it compiles,
  where, and how long it has waited, and ``built ... in N s`` only when the library file changed.
- ``ds-twolevel prebuild`` compiles it ahead of time (``install.sh`` runs it).

Two more things every launch met (:func:`quiet_launch`): DeepSpeed's backend gathers with
``torch.distributed.all_gather_into_tensor`` and reduce-scatters with ``reduce_scatter_tensor``,
both deprecated in torch 2.13 (a ``FutureWarning`` on every rank at the first ZeRO step): the
backend is pointed at ``all_gather_single`` / ``reduce_scatter_single``, the same collectives
under their current names. And ``WarmupLR``'s constructor calls its own ``get_lr`` before
the first step, which logs "Attempting to get learning rate from scheduler before it has started"
on every rank: that one record is dropped.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator, TextIO

from ds_twolevel.deepspeed.compat import ds_comm_backend, use_current_collective_names

NOTICE_AFTER_S = 5.0
"""a load that has not finished after this many seconds says what it waits for."""
SPEAKER_WAIT_S = 1800.0
"""how long ranks other than local rank 0 wait for it to build a missing op before building it themselves."""
HEARTBEAT_S = 60.0
"""then it says how long it has waited this often."""
STALE_HINT_S = 900.0
"""after this long, the notice mentions the lock file a killed build leaves behind."""
SHM_OP = "deepspeed_shm_comm"
_BUILT_LINE = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
_LR_WARNING = "Attempting to get learning rate from scheduler before it has started"


def extensions_dir() -> Path:
    """This environment's root for torch's JIT-built extensions.

    ``<sys.prefix>/var/ds_twolevel/torch_extensions`` when the environment is writable (a venv,
    pyenv, conda), else ``~/.cache/torch_extensions/env-<hash of sys.prefix>``.

    Example:
        >>> extensions_dir()
        PosixPath('/home/me/venv/var/ds_twolevel/torch_extensions')
    """
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "var" / "ds_twolevel" / "torch_extensions"
    tag = hashlib.sha1(str(prefix.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"env-{tag}"


def use_environment_extensions_dir() -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` to :func:`extensions_dir` unless it is set; return the one in force."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def _speaker() -> bool:
    """Local rank 0 speaks for the node (every rank of a node shares one build directory)."""
    return os.environ.get("LOCAL_RANK", "0") in ("0", "")


def _say(text: str) -> None:
    print(f"[ds_twolevel] {text}", file=sys.stderr, flush=True)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class _Waiting:
    """A background notice while a load runs: at once (or after NOTICE_AFTER_S), then every HEARTBEAT_S."""

    def __init__(self, build_dir: Path, *, at_once: bool) -> None:
        self.build_dir, self.at_once = build_dir, at_once
        self.done = threading.Event()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True, name="ds_twolevel-build-notice")

    def __enter__(self) -> "_Waiting":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        if not self.at_once and self.done.wait(NOTICE_AFTER_S):
            return
        _say(f"compiling DeepSpeed's CPU shared-memory comm op ({SHM_OP}) in {self.build_dir} (or waiting "
             "for the rank that compiles it): once per environment, about 2 min of CPU time (30 s on an idle "
             "2-core machine, several minutes under load); later launches reuse it")
        while not self.done.wait(HEARTBEAT_S):
            waited, lock = time.monotonic() - self.start, self.build_dir / "lock"
            hint = (f"; if no compiler (c++, ninja) is running, a killed build left {lock}: remove it"
                    if waited >= STALE_HINT_S and lock.exists() else "")
            _say(f"still compiling {SHM_OP} ({waited:.0f} s so far){hint}")


def _wait_for(library: Path, timeout_s: float = SPEAKER_WAIT_S) -> None:
    """Until ``library`` exists (local rank 0 is building it), at most ``timeout_s``; then the
    caller loads it (or builds it itself, if local rank 0 never did: DeepSpeed's lock serialises).
    Without this, whichever rank came first built the op, and local rank 0, finding it there or
    waiting on the lock, said nothing while the job sat silent for minutes."""
    deadline = time.monotonic() + timeout_s
    while not library.exists() and time.monotonic() < deadline:
        time.sleep(0.5)


@contextlib.contextmanager
def _stderr_fd_to_devnull() -> Iterator[None]:
    """File descriptor 2 (what compiler subprocesses inherit) to /dev/null for a ``with`` block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def compatible_ops() -> dict[str, bool]:
    """``deepspeed.ops.__compatible_ops__``, probed once per process with the probes' compiler output
    dropped. DeepSpeed probes every op on first access (a test compile and link each) and silences the
    compiler by redirecting ``sys.stderr.fileno()``; in a Jupyter kernel (and the processes
    ``notebook_launcher`` forks from it) that is not descriptor 2, so the async_io probe's
    ``/usr/bin/ld: cannot find -laio`` and ``collect2: error`` reached the notebook from every rank.

    Example:
        >>> compatible_ops()["deepspeed_shm_comm"]
        True
    """
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        with _stderr_fd_to_devnull():
            deepspeed.ops.__compatible_ops__  # noqa: B018 - computed and cached by DeepSpeed on access
    return deepspeed.ops.__compatible_ops__


def load_shm_comm_op() -> ModuleType | None:
    """DeepSpeed's CPU shared-memory comm op, loaded or compiled with a visible message.

    Returns None where DeepSpeed does not use it (another accelerator, not Linux), as DeepSpeed's
    own ``build_shm_op`` does. An op prebuilt into DeepSpeed (``DS_BUILD_SHM_COMM=1``) is imported.

    Example:
        >>> op = load_shm_comm_op()   # before deepspeed.init_distributed; it then reuses the loaded op
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not compatible_ops().get(builder.NAME, False):
        return None
    if installed_ops.get(builder.NAME, False):
        return builder.load(verbose=False)
    build_dir = Path(use_environment_extensions_dir()) / builder.NAME
    library = build_dir / f"{builder.NAME}.so"
    if not _speaker():  # local rank 0 builds a missing op and says so; the others wait for it
        _wait_for(library)
    before, t0 = _stamp(library), time.monotonic()
    with _Waiting(build_dir, at_once=before is None) if _speaker() else contextlib.nullcontext():
        module = builder.load(verbose=False)
    if _speaker() and _stamp(library) != before:
        _say(f"built {builder.NAME} in {time.monotonic() - t0:.0f} s ({library}); later launches in this "
             "environment reuse it")
    return module


class _DropLine(io.TextIOBase):
    """A text stream that forwards everything to ``target`` except whole lines equal to ``line``."""

    def __init__(self, target: TextIO, line: str) -> None:
        self.target, self.line, self.pending = target, line, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for one in lines:
            if one.strip() != self.line:
                self.target.write(one + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and self.pending.strip() != self.line:
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


class _DropLrWarning(logging.Filter):
    """Drops the record WarmupLR's constructor logs when it sets the first learning rate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == "get_lr" and record.getMessage() == _LR_WARNING)


_LR_FILTER = _DropLrWarning()


def drop_startup_lr_warning() -> None:
    """Attach the filter for WarmupLR's start-up record to DeepSpeed's logger (once)."""
    from deepspeed.utils import logger

    if _LR_FILTER not in logger.filters:
        logger.addFilter(_LR_FILTER)


@contextlib.contextmanager
def quiet_launch() -> Iterator[None]:
    """Wrap ``deepspeed.init_distributed``: the shm op loads with a message instead of 8 silent
    minutes and 8 "built successfully" lines; afterwards the backend uses the current collective
    names (:func:`ds_twolevel.deepspeed.compat.use_current_collective_names`) and WarmupLR's start-up warning is dropped.

    Example:
        >>> with quiet_launch():
        ...     deepspeed.init_distributed(dist_backend="gloo")
    """
    use_environment_extensions_dir()
    backend = ds_comm_backend()
    if backend is None or not backend.is_initialized():  # init_distributed will build its backend
        load_shm_comm_op()  # cached by DeepSpeed's op builder: the backend's own load returns it at once
    stdout = sys.stdout
    sys.stdout = _DropLine(stdout, _BUILT_LINE)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = stdout
    use_current_collective_names()
    drop_startup_lr_warning()


# -- ``ds-twolevel prebuild`` -------------------------------------------------------------------------
HELP = """\
Compile DeepSpeed's CPU shared-memory comm op (deepspeed_shm_comm) for this Python environment now,
into TORCH_EXTENSIONS_DIR (default: a directory inside the environment), instead of in the first
launch's ranks. About 2 min of CPU time once (30 s on an idle 2-core machine, several minutes under
load); afterwards it only checks that the op is up to date (a few seconds). install.sh runs it.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def main(args: argparse.Namespace | None = None) -> int:
    """Build (or check) the op; print where it is."""
    root = use_environment_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    t0 = time.monotonic()
    op = load_shm_comm_op()
    if op is None:
        print(f"ds-twolevel prebuild: nothing to build for accelerator {get_accelerator().device_name()!r} "
              "(DeepSpeed's shm comm op serves CPU ranks)")
    else:
        print(f"ds-twolevel prebuild: DeepSpeed's {SHM_OP} op is ready ({time.monotonic() - t0:.0f} s): "
              f"{op.__file__} (TORCH_EXTENSIONS_DIR={root})")
    return 0
