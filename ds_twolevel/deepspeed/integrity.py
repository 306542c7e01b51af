"""Integrity of a two-level checkpoint: every file recorded with its size and checksum, verified before use.

A save records, in its tag's ``two_level.json`` (``info["files"]``), every file of the tag directory
with its size in bytes and its CRC-32 (``zlib.crc32``, streamed in 16 MiB chunks: ~4 GB/s on one
core, so it costs a re-read of the files, from the page cache, right after they were written), and
a random ``save_id``. Each rank hashes the files of its own (tp, dp) coordinate, so the cost is
spread like the writes. A resume verifies every file it is about to read against that record
before any tensor is used: a file copied in from another save (another tag, another run),
truncated, or rewritten is refused, naming the file, its (tp, dp) rank and what differs, and the
tag the file really belongs to when a sibling tag records the same size and checksum.

CRC-32 detects damage and mixed files, not tampering: it is not a cryptographic hash.

Save failures of the file system (full disk, read-only or forbidden directory) are caught where
DeepSpeed writes (its checkpoint engine's ``save``) and reported after DeepSpeed's own save has
returned on every rank (so no rank is left waiting in DeepSpeed's barrier), as one line naming the
directory and the bytes the save needs (:func:`estimate_save_bytes`).

Example:
    >>> record = file_record(Path("ckpt/global_step4/mp_rank_00_model_states.pt"))
    >>> record
    {'bytes': 563728, 'crc32': '8f3c0a91'}
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch

from ds_twolevel.sharding.shard_manifest import MANIFEST_NAME, ShardManifest

CHUNK = 16 << 20
"""bytes read at a time while hashing."""
FILES_KEY = "files"
"""``info`` key of the manifest: relative file name -> {"bytes": int, "crc32": "8 hex digits"}."""


# -- recording and verifying files ----------------------------------------------------------------------
def file_record(path: Path) -> dict[str, Any]:
    """Size and CRC-32 of one file, read in :data:`CHUNK` pieces."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def coordinate_of(name: str) -> str:
    """'tp rank 1, dp rank 0' for DeepSpeed's file names (``mp_rank_01``, ``zero_pp_rank_0``); '' otherwise."""
    tp = name.split("mp_rank_")[1][:2] if "mp_rank_" in name else None
    dp = name.split("zero_pp_rank_")[1].split("_")[0] if "zero_pp_rank_" in name else None
    parts = ([f"tp rank {int(tp)}"] if tp and tp.isdigit() else []) + ([f"dp rank {dp}"] if dp else [])
    return ", ".join(parts)


def own_files(tag_dir: Path, stage: int, tp_rank: int, dp_rank: int, prefix: str) -> list[Path]:
    """The files DeepSpeed writes on the rank at (tp_rank, dp_rank): its optimizer-states file
    (ZeRO 1-3), and the model-states file on dp rank 0 (every dp rank under ZeRO-3)."""
    from ds_twolevel.deepspeed.zero_files import model_file, optim_file

    files = [model_file(tag_dir, stage, tp_rank, dp_rank)] if stage == 3 or dp_rank == 0 else []
    if stage > 0:
        files.append(optim_file(tag_dir, tp_rank, dp_rank, prefix))
    return [f for f in files if f.is_file()]


def record_tag(tag_dir: Path, gathered: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The ``files`` record of a tag: the records the ranks made of their own files (``gathered``),
    plus every other file of the directory (hashed here), the manifest excepted."""
    files: dict[str, dict[str, Any]] = {}
    for records in gathered:
        files.update(records)
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        name = path.relative_to(tag_dir).as_posix()
        if name != MANIFEST_NAME and name not in files and not path.name.startswith("."):
            files[name] = file_record(path)
    return dict(sorted(files.items()))


def _owner(tag_dir: Path, name: str, record: dict[str, Any]) -> str | None:
    """The sibling tag whose manifest records ``name`` with this exact size and checksum."""
    for other in sorted(tag_dir.parent.iterdir()):
        if other == tag_dir or not (other / MANIFEST_NAME).is_file():
            continue
        try:
            files = ShardManifest.read(other).info.get(FILES_KEY) or {}
        except (OSError, ValueError):  # a damaged sibling says nothing
            continue
        if any(r == record for r in files.values()):
            return other.name
    return None


def verify_file(tag_dir: Path, name: str, files: dict[str, dict[str, Any]]) -> None:
    """ValueError naming ``tag_dir.name/name``, its rank and what differs from the manifest's record."""
    path, where = tag_dir / name, f"{tag_dir.name}/{name}"
    coord = coordinate_of(name)
    rank = f" ({coord})" if coord else ""
    expected = files.get(name)
    if expected is None:
        raise ValueError(f"{where}{rank} is not recorded in {tag_dir.name}/{MANIFEST_NAME}: it was not written by this "
                         f"save; resume from another tag")
    if not path.is_file():
        raise ValueError(f"{where}{rank} is missing (the manifest records {expected['bytes']} bytes); the checkpoint "
                         f"is incomplete, resume from another tag")
    size = path.stat().st_size
    got = file_record(path) if size == expected["bytes"] else {"bytes": size, "crc32": None}
    if got == expected:
        return
    owner = _owner(tag_dir, name, got) if got["crc32"] is not None else None
    whose = f"; it is {owner}'s file (same size and checksum)" if owner else ""
    what = (f"{size} bytes, the manifest records {expected['bytes']}" if size != expected["bytes"] else
            f"checksum differs from the manifest (crc32 {got['crc32']}, recorded {expected['crc32']})")
    raise ValueError(f"{where}{rank}: {what}{whose}; the tag holds a file of another save or a damaged one: "
                     f"resume from another tag, or restore the file")


def verify_files(tag_dir: Path, manifest: ShardManifest, paths: list[Path]) -> bool:
    """Verify ``paths`` (files of ``tag_dir``) against the manifest's record, in order; ValueError at
    the first that differs. False (nothing verified) for a manifest without a record (an older save)."""
    files = manifest.info.get(FILES_KEY)
    if files is None:
        return False
    for path in paths:
        verify_file(tag_dir, path.relative_to(tag_dir).as_posix(), files)
    return True


# -- the manifest's own consistency ---------------------------------------------------------------------
def check_structure(manifest: ShardManifest, source: str) -> None:
    """ValueError naming the entry when the manifest contradicts itself: an entry whose dense tensor
    is not listed, a dim or run outside the dense shape, a rank count other than the layout's, or a
    dense tensor with no entry (a deleted entry)."""
    tp = manifest.tp_size
    for name, entry in manifest.entries.items():
        if entry.key not in manifest.dense:
            raise ValueError(f"{source}: entry {name!r} names dense tensor {entry.key!r}, which the manifest does not "
                             f"list; the manifest is damaged, resume from another tag")
        if entry.dim is None:
            continue
        shape = manifest.dense[entry.key][0]
        if not 0 <= entry.dim < len(shape) or len(entry.runs) != tp:
            raise ValueError(f"{source}: entry {name!r} has dim {entry.dim} and runs for {len(entry.runs)} tp ranks; "
                             f"{entry.key} has shape {tuple(shape)} and the layout {manifest.describe()} has {tp} tp "
                             f"ranks; the manifest is damaged, resume from another tag")
        for rank, runs in enumerate(entry.runs):
            for start, stop in runs:
                if not 0 <= start < stop <= shape[entry.dim]:
                    raise ValueError(f"{source}: entry {name!r}, tp rank {rank}: run [{start}, {stop}) is out of range "
                                     f"for dim {entry.dim} of {entry.key} (size {shape[entry.dim]}); the manifest is "
                                     f"damaged, resume from another tag")
    orphans = sorted(set(manifest.dense) - {e.key for e in manifest.entries.values()})
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise ValueError(f"{source}: dense tensor {orphans[0]!r}{more} "
                         f"has no entry (an entry was deleted); the manifest is damaged, resume from another tag")


# -- save failures of the file system ---------------------------------------------------------------------
def _params_numel(engine: Any) -> tuple[int, int]:
    """(elements of this rank's model tensors, bytes per element)."""
    params = list(engine.module.parameters())
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    return numel, params[0].element_size() if params else 4


def _moments(engine: Any) -> int:
    """Optimizer state tensors per parameter: counted on the optimizer once it stepped (2 for Adam before)."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in getattr(base, "state", {}).values():
        return sum(1 for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return 2 if "adam" in type(base).__name__.lower() else 1


def estimate_save_bytes(engine: Any, tp_size: int) -> int:
    """Bytes a save of ``engine`` writes, over all ranks: per tp rank (``tp_size`` of them), the model tensors in their dtype
    plus fp32 master weights (ZeRO 1-3, or fp16/bf16) and the optimizer's moments in fp32.

    An estimate (within a few % of the files for Adam; ``tests/test_checkpoint_integrity.py`` compares
    it with a real save): it leaves out the pickled metadata.
    """
    from ds_twolevel.deepspeed.engine_state import zero_stage

    numel, elem = _params_numel(engine)
    master = 1 if zero_stage(engine) > 0 or elem != 4 else 0
    return tp_size * numel * (elem + 4 * (master + _moments(engine)))


def human(n: int) -> str:
    """``1.5 MiB (1572864 bytes)``."""
    unit = min(int(math.log(max(n, 1), 1024)), 4)
    return f"{n / 1024 ** unit:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]} ({n} bytes)"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (of its nearest existing parent); None when unknown."""
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:  # missing, or not searchable by this user
            continue
    return None


FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)
_TORCH_WRITE = ("unexpected pos", "iostream error", "failed writing file", "file write failed", "No space left")


def _not_writable(path: Path) -> bool:
    """``path`` exists and this process may not write into it."""
    try:
        return path.exists() and not os.access(path, os.W_OK)
    except OSError:
        return True


def _size_limit() -> int | None:
    """This process's file-size limit (``ulimit -f``) in bytes, None when unlimited."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def write_failure(err: BaseException, save_dir: Path, needed: int, free_before: int | None) -> str:
    """One line for a failed checkpoint write: the directory, the cause, the bytes the save needs.

    torch's zip writer reports a failed write without its errno ("unexpected pos ...", "file write
    failed"); the cause is then read off the file system: not writable, full, or a file-size limit.
    """
    code = getattr(err, "errno", None)
    text = str(err)
    free = free_bytes(save_dir)
    need = f"the save needs about {human(needed)}"
    torch_write = code is None and any(s in text for s in _TORCH_WRITE)
    if code in DENIED or (torch_write and _not_writable(save_dir)):
        if code in (errno.EROFS, None):
            return f"{save_dir} is on a read-only file system (EROFS): {need}; save elsewhere, or remount it read-write"
        return (f"{save_dir} is not writable by this user ({errno.errorcode.get(code, 'EACCES')}): {need}; give "
                f"the user write permission there, or save elsewhere")
    if code == errno.EFBIG or (torch_write and _size_limit() is not None):
        return (f"a file in {save_dir} exceeds this process's file-size limit (EFBIG; the limit, ulimit -f, is "
                f"{_size_limit()} bytes): {need}; raise the limit or save elsewhere (nothing of this save is kept)")
    if code in FULL or (torch_write and free is not None and free < needed):
        name = errno.errorcode.get(code, "ENOSPC")
        before = f", {human(free_before)} were free before it" if free_before is not None else ""
        return (f"no space left in {save_dir} ({name}): {need}{before}; free space there or save elsewhere "
                f"(nothing of this save is kept)")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"writing the checkpoint into {save_dir} failed ({type(err).__name__}: {first}); {need}"


def probe_writable(save_dir: Path) -> None:
    """Create ``save_dir`` and a small file in it (then remove it): raises OSError with the file
    system's errno (EROFS, EACCES, ENOSPC) before DeepSpeed writes anything."""
    save_dir.mkdir(parents=True, exist_ok=True)
    probe = save_dir / f".ds_twolevel_probe.tmp{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


__all__ = ["CHUNK", "FILES_KEY", "check_structure", "coordinate_of", "estimate_save_bytes", "file_record", "free_bytes",
           "human", "own_files", "probe_writable", "record_tag", "verify_file", "verify_files", "write_failure"]
