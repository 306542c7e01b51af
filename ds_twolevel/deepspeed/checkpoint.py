"""Checkpoints of two-level DeepSpeed engines: layout record, atomic save, checked and resharded resume.

Every checkpoint directory gets a ``two_level.json`` (:class:`~ds_twolevel.sharding.shard_manifest.ShardManifest`):
the layout dp x sp x n x m (sp: Ulysses' sequence shards, 1 without), the ZeRO stage, the dense model's shapes and each local tensor's shard
coordinates. It is written last, so a tag directory with it is complete.

Save (:func:`save_checkpoint`): DeepSpeed writes into ``<tag>.partial/``; one rank per file system
then commits with renames so that ``latest`` names a complete checkpoint at every instant, also
when the tag already exists (the old directory is kept as a hard-linked ``<tag>.old/`` and ``latest``
points there while ``<tag>/`` is replaced). A kill in any window leaves a loadable ``latest``; the
next save removes what the killed one left.

The manifest also records every file of the tag with its size and CRC-32, a random ``save_id``
and a digest of itself (:mod:`~ds_twolevel.deepspeed.integrity`). A save that the file system
refuses (full, read-only, forbidden) ends with one line on every rank naming the directory and the
bytes the save needs, and leaves no partial tag.

Resume (:func:`load_checkpoint`): without ``tag=``, the tag ``latest`` names (as DeepSpeed does).
On every rank, before any state is loaded, the saved manifest is checked (its digest and
structure) and compared with the running model (one agreement step), and every file the rank
will read is verified against the manifest's record: a file of another save, an edited manifest
or another model is refused, naming the file or entry; the same layout and ZeRO stage load through
DeepSpeed's own ``load_checkpoint``; any other dp x sp x n x m (or ZeRO stage) is resharded exactly:
every rank reads the checkpoint's tensors, assembles the dense fp32 weights and optimizer moments,
and writes its own shards of them into the engine.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ds_twolevel.deepspeed.integrity import (FILES_KEY, check_structure, estimate_save_bytes, file_record, own_files,
                                            record_tag, verify_files, write_failure)
from ds_twolevel.parallel.agreement import AgreementError, agreement
from ds_twolevel.sharding.shard_manifest import (MANIFEST_NAME, ShardManifest, assemble, digest_matches, extract,
                                                 manifest_for, model_differences, same_shards)
from ds_twolevel.deepspeed.zero_files import RankTensors, model_file, optim_file, read_checkpoint

KILL_ENV = "DS_TWOLEVEL_TEST_KILL_AT"
"""Tests only: the save window (one of :data:`SAVE_WINDOWS`) at which the committing rank SIGKILLs itself."""
SAVE_WINDOWS = ("written", "marked", "renamed", "linking", "linked", "latest_old", "removing", "removed",
                "replaced", "committed")
"""Instants of a save, in order: DeepSpeed's files written; the manifest written; ``<tag>.partial``
renamed to a new tag; (tag exists:) the old copy half linked, linked, ``latest`` naming it, the old
tag half removed, removed, the new one renamed into place; ``latest`` naming the new tag."""
LATEST = "latest"


def _kill_point(window: str) -> None:
    if os.environ.get(KILL_ENV) == window:
        os.kill(os.getpid(), signal.SIGKILL)


# -- small file-system steps ---------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` through a temp file + fsync + ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_latest(save_dir: Path) -> str | None:
    path = save_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def is_complete(tag_dir: Path) -> bool:
    """A checkpoint directory is complete when its manifest (written last) is there."""
    return (tag_dir / MANIFEST_NAME).is_file()


def remove_checkpoint(tag_dir: Path) -> None:
    """Delete a checkpoint directory, its manifest first (a half-deleted one is never 'complete')."""
    if not tag_dir.exists():
        return
    (tag_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _fsync_dir(tag_dir)
    for i, child in enumerate(sorted(tag_dir.iterdir())):
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
        if i == 0:
            _kill_point("removing")
    tag_dir.rmdir()


def link_tree(src: Path, dst: Path) -> None:
    """``dst``: a copy of checkpoint ``src`` made of hard links (a plain copy where links fail), its
    manifest last, so that a half-made copy is never 'complete'."""
    dst.mkdir()
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    for i, file in enumerate(files + [src / MANIFEST_NAME]):
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:  # no hard links on this file system
            shutil.copy2(file, target)
        if i == 0:
            _kill_point("linking")
    _fsync_dir(dst)


# -- the manifest ------------------------------------------------------------------------------------
def mesh_of(engine: Any) -> Any:
    """The two-level mesh of an engine (ours, or one whose module was patched by ``patch_model``)."""
    runtime = getattr(engine, "two_level", None)
    mesh = runtime.mesh if runtime is not None else getattr(engine.module, "_twolevel_mesh", None)
    if mesh is None:
        raise ValueError(f"{type(engine.module).__name__} is not a two-level model (no mesh): partition it with "
                         f"ds_twolevel.initialize or hf_integration.patch_model")
    return mesh


def current_manifest(engine: Any, **info: Any) -> ShardManifest:
    """The manifest of the running engine (pure on every rank)."""
    from ds_twolevel.deepspeed.engine_state import optimizer_param_order, zero_stage

    layout = mesh_of(engine).layout
    stage = zero_stage(engine)
    param = next(engine.module.parameters())
    info = {"zero_stage": stage, "dtype": str(param.dtype).removeprefix("torch."), "world_size": layout.world_size,
            "optim_prefix": "bf16_" if engine.bfloat16_enabled() else "", **info}
    if stage == 0 and isinstance(engine.optimizer, torch.optim.Optimizer):  # not DeepSpeed's fp16/bf16 wrapper
        info["optimizer_params"] = optimizer_param_order(engine)
    return manifest_for(engine.module, (layout.dp, layout.n, layout.m), info=info, sp=layout.sp)


def _model_info(module: Any) -> dict[str, Any]:
    config = getattr(module, "config", None)
    out: dict[str, Any] = {"class": type(module).__name__}
    if config is not None and hasattr(config, "to_dict"):
        out["config"] = config.to_dict()
    return out


def write_manifest(engine: Any, tag_dir: Path, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Write ``two_level.json`` into ``tag_dir`` (call on the committing rank, after every rank saved),
    with ``files``: every file of the tag with its size and checksum (:mod:`~ds_twolevel.deepspeed.integrity`)."""
    import deepspeed

    from ds_twolevel import __version__

    manifest = current_manifest(engine, global_steps=int(engine.global_steps), saved_at_ns=time.time_ns(),
                                ds_version=deepspeed.__version__, ds_twolevel_version=__version__,
                                model=_model_info(engine.module), save_id=uuid.uuid4().hex,
                                checksum="crc32", **({FILES_KEY: files} if files is not None else {}))
    write_atomic(tag_dir / MANIFEST_NAME, manifest.to_json())


# -- save ------------------------------------------------------------------------------------------
def is_writer(engine: Any) -> bool:
    """One rank commits per file system: global rank 0, or local rank 0 with node-local storage."""
    node_local = bool(engine.use_node_local_storage())
    rank = int(os.environ.get("LOCAL_RANK", "0")) if node_local else dist.get_rank()
    return rank == 0


def clean_stale(save_dir: Path) -> None:
    """Remove what killed saves left: ``*.partial`` directories, ``*.old`` copies ``latest`` does not
    name, and temp files of ``latest``."""
    latest = read_latest(save_dir)
    for child in save_dir.iterdir():
        if child.name.startswith(".") and ".tmp" in child.name and child.is_file():  # write_atomic's temp files
            child.unlink(missing_ok=True)
        elif child.is_dir() and (child.name.endswith(".partial") or (child.name.endswith(".old") and child.name != latest)):
            remove_checkpoint(child)


def commit(save_dir: Path, tag: str) -> None:
    """Move the complete ``<tag>.partial`` to ``<tag>`` and point ``latest`` at it, keeping a
    complete checkpoint named by ``latest`` at every instant (see :data:`SAVE_WINDOWS`)."""
    partial, final, old = save_dir / f"{tag}.partial", save_dir / tag, save_dir / f"{tag}.old"
    if final.exists():
        if is_complete(final) and not (old.exists() and read_latest(save_dir) == old.name):
            # (else: a killed save left ``old`` as the copy ``latest`` names, or ``final`` is a half-deleted one)
            remove_checkpoint(old)
            link_tree(final, old)
            _kill_point("linked")
            write_atomic(save_dir / LATEST, old.name)
            _kill_point("latest_old")
        remove_checkpoint(final)
        _kill_point("removed")
        os.replace(partial, final)
        _fsync_dir(save_dir)
        _kill_point("replaced")
    else:
        os.replace(partial, final)
        _fsync_dir(save_dir)
        _kill_point("renamed")
    write_atomic(save_dir / LATEST, tag)
    _kill_point("committed")
    clean_stale(save_dir)


def save_checkpoint(engine: Any, save_dir: str | os.PathLike, tag: str | None = None,
                    client_state: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """``engine.save_checkpoint`` made atomic in every window, with the layout recorded
    (``two_level.json``); see the module docstring.

    Example:
        >>> ds_twolevel.save_checkpoint(engine, "ckpt", client_state={"step": step})
    """
    from ds_twolevel.deepspeed.engine_patch import ensure_installed

    ensure_installed()
    save_dir = Path(save_dir)
    tag = str(tag or f"global_step{engine.global_steps}")
    writer = is_writer(engine)
    with agreement(None, what=f"saving {save_dir / tag}"):  # every rank learns of a failure
        if writer:
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                remove_checkpoint(save_dir / f"{tag}.partial")  # left by a save that was killed
            except OSError as err:  # read-only, forbidden: named with the bytes the save needs
                raise OSError(write_failure(err, save_dir, estimate_save_bytes(engine, mesh_of(engine).layout.tp_size), None)) from None
    engine.save_checkpoint(str(save_dir), tag=f"{tag}.partial", client_state=client_state or {},
                           save_latest=False, **kwargs)  # writes the manifest last (engine_hooks)
    with agreement(None, what=f"committing {save_dir / tag}"):
        if writer:
            commit(save_dir, tag)
    return save_dir / tag


def after_deepspeed_save(engine: Any, save_dir: Path, tag: str, *, write_scripts: Callable[[Path], None],
                         failure: str | None = None) -> None:
    """What ``engine.save_checkpoint`` does after DeepSpeed's own save (engine_hooks), in agreement
    steps (every rank learns of any rank's failure): a write that failed on some rank (``failure``,
    one line) is raised on every rank and the tag directory removed; else each rank records its own
    files (size, CRC-32), and the writer writes the manifest with all records and the conversion
    scripts beside the tag (``write_scripts(save_dir)``: ``convert.write_recovery_scripts``)."""
    from ds_twolevel.deepspeed.engine_state import zero_stage

    tag_dir, writer = save_dir / tag, is_writer(engine)
    try:
        with agreement(None, what=f"saving {save_dir / tag.removesuffix('.partial')}"):
            if failure is not None:
                raise OSError(failure)
            axes = mesh_of(engine).axes
            prefix = "bf16_" if engine.bfloat16_enabled() else ""
            mine = own_files(tag_dir, zero_stage(engine), axes.tp.rank, axes.zero.rank, prefix)
            records = {p.relative_to(tag_dir).as_posix(): file_record(p) for p in mine}
    except AgreementError:
        if writer:  # nothing half-written stays behind (DeepSpeed's barrier has passed: no rank writes)
            try:
                remove_checkpoint(tag_dir)
            except OSError:  # a read-only directory: nothing was written into it either
                pass
        raise
    gathered: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, records)
    else:
        gathered = [records]
    with agreement(None, what=f"recording the layout of {tag_dir}"):
        if writer:
            _kill_point("written")
            write_manifest(engine, tag_dir, files=record_tag(tag_dir, gathered))
            write_scripts(save_dir)
            _kill_point("marked")


# -- resume --------------------------------------------------------------------------------------------
def find_checkpoint(load_dir: Path, tag: str | None = None) -> str:
    """The tag to resume: ``tag``, else the one the ``latest`` file names (as DeepSpeed does); other
    tags are never read, so a damaged or newer-looking older tag cannot change the choice.

    ValueError (one line, with what is there) when there is none.
    """
    if tag is not None:
        if not (load_dir / tag).is_dir():
            raise ValueError(f"checkpoint {str(load_dir / tag)!r} does not exist; tags in {str(load_dir)!r}: "
                             f"{_tags(load_dir) or 'none'}")
        return tag
    latest = read_latest(load_dir) if load_dir.is_dir() else None
    if latest is not None and (load_dir / latest).is_dir():
        return latest
    where = f"'latest' names {latest!r}, which is missing" if latest else "no 'latest' file"
    raise ValueError(f"no checkpoint to resume in {str(load_dir)!r} ({where}; tags: {_tags(load_dir) or 'none'}); "
                     f"save one with ds_twolevel.save_checkpoint, or pass tag=")


def _tags(load_dir: Path) -> str:
    if not load_dir.is_dir():
        return ""
    return ", ".join(sorted(d.name for d in load_dir.iterdir() if d.is_dir()))


def _expected_files(tag_dir: Path, manifest: ShardManifest) -> list[Path]:
    dp, stage = manifest.zero_size, int(manifest.info["zero_stage"])
    files = [model_file(tag_dir, stage, r, d) for r in range(manifest.tp_size) for d in range(dp if stage == 3 else 1)]
    if stage > 0:
        prefix = manifest.info.get("optim_prefix", "")
        files += [optim_file(tag_dir, r, d, prefix) for r in range(manifest.tp_size) for d in range(dp)]
    return files


def _layouts(saved: ShardManifest, current: ShardManifest) -> str:
    return (f"saved at {saved.describe()} with ZeRO {saved.info.get('zero_stage')}, this job runs "
            f"{current.describe()} with ZeRO {current.info.get('zero_stage')}")


def _check_loadable(engine: Any, tag_dir: Path, saved: ShardManifest, current: ShardManifest) -> None:
    """ValueError when the checkpoint holds another model, lacks a file, or the config asks for a
    DeepSpeed universal checkpoint."""
    diffs = model_differences(saved, current)
    if diffs:
        raise ValueError(f"{tag_dir} holds another model than this job's ({'; '.join(diffs)}); resume it with the "
                         f"model it was saved from ({saved.info.get('model', {}).get('class', '?')})")
    missing = [p.name for p in _expected_files(tag_dir, saved) if not p.is_file()]
    if missing:
        raise ValueError(f"{tag_dir} is incomplete: {len(missing)} file(s) missing ({', '.join(missing[:3])}); "
                         f"resume from another checkpoint")
    if engine.load_universal_checkpoint():
        raise ValueError('"checkpoint": {"load_universal": true} is not supported for two-level models; remove it: '
                         "ds_twolevel.load_checkpoint reshards a checkpoint to any dp x n x m itself")


def _check_reshardable(engine: Any, tag_dir: Path, saved: ShardManifest, current: ShardManifest) -> None:
    """ValueError naming both layouts when the engine's or the checkpoint's state is not per tensor."""
    from ds_twolevel.deepspeed.engine_state import check_supported

    try:
        check_supported(engine, what="resharding a checkpoint")
        if saved.info.get("zero_stage") == 0 and saved.info.get("dtype") != "float32":
            raise ValueError("a ZeRO-0 fp16/bf16 checkpoint keeps its fp32 state in DeepSpeed's wrapper format")
    except ValueError as err:
        raise ValueError(f"{tag_dir} was {_layouts(saved, current)} and cannot be resharded ({err}); resume at "
                         f"{saved.describe()} with ZeRO {saved.info.get('zero_stage')}, or start from its dense "
                         f"weights: ds-twolevel convert {tag_dir.parent} OUT") from None


def _probe_own_files(engine: Any, tag_dir: Path, saved: ShardManifest) -> None:
    """Open the files DeepSpeed will read on this rank (memory-mapped: their index, not their data),
    so that a truncated or corrupt file fails inside the agreement step, on every rank, and not
    halfway through DeepSpeed's load while the other ranks wait in a collective."""
    mesh, stage = mesh_of(engine), int(saved.info["zero_stage"])
    tp_rank, dp_rank = mesh.axes.tp.rank, mesh.axes.zero.rank
    files = [model_file(tag_dir, stage, tp_rank, dp_rank if stage == 3 else 0)]
    if stage > 0:
        files.append(optim_file(tag_dir, tp_rank, dp_rank, saved.info.get("optim_prefix", "")))
    for file in files:
        try:
            torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{file} cannot be read ({type(err).__name__}: {first}); the checkpoint is damaged, "
                             f"resume from another one") from None


def files_read(engine: Any, tag_dir: Path, saved: ShardManifest, plan: str) -> list[Path]:
    """The files this rank reads: those of its own tp rank (DeepSpeed's load, which reads every dp
    rank's optimizer file of it), or every file (a resharded load)."""
    files = _expected_files(tag_dir, saved)
    if plan == "native":
        mine = f"mp_rank_{mesh_of(engine).axes.tp.rank:02d}_"
        files = [f for f in files if mine in f.name]
    return files


def read_manifest(tag_dir: Path, current: ShardManifest) -> ShardManifest:
    """The saved manifest, checked against its digest and its own structure; ValueError naming the
    file and, for an edited one saved at the running layout, the first entry that differs from it."""
    path = tag_dir / MANIFEST_NAME
    saved = ShardManifest.read(tag_dir, check_digest=False)
    if digest_matches(path.read_text()) is False:
        differ = [k for k in sorted(set(saved.entries) | set(current.entries))
                  if saved.entries.get(k) != current.entries.get(k)] if saved.layout == current.layout else []
        entry = f" (entry {differ[0]!r} differs from what {saved.describe()} places)" if differ else ""
        raise ValueError(f"{path}: its content does not match its digest{entry}: it was edited or damaged after the "
                         f"save; resume from another tag")
    check_structure(saved, str(path))
    return saved


def plan_resume(engine: Any, tag_dir: Path) -> tuple[str, ShardManifest, ShardManifest]:
    """("native" | "reshard", saved manifest, current manifest), or ValueError naming both layouts,
    or the file or manifest entry that does not belong to the checkpoint.

    Every file this rank will read is verified against the manifest's record (size, CRC-32) here,
    before any tensor is used. Pure (no collective); the caller runs it inside an agreement step.
    """
    if not is_complete(tag_dir):
        raise ValueError(f"{tag_dir} has no {MANIFEST_NAME}: it was not written by ds_twolevel (plain "
                         f"engine.save_checkpoint before ds_twolevel was imported, or an older version), so its "
                         f"layout cannot be checked; resume from a checkpoint saved by ds_twolevel.save_checkpoint")
    current = current_manifest(engine)
    saved = read_manifest(tag_dir, current)
    _check_loadable(engine, tag_dir, saved, current)
    same = (same_shards(saved, current) and saved.info.get("zero_stage") == current.info["zero_stage"]
            and saved.info.get("dtype") == current.info["dtype"])
    plan = "native" if same else "reshard"
    if not same:
        _check_reshardable(engine, tag_dir, saved, current)
    verify_files(tag_dir, saved, files_read(engine, tag_dir, saved, plan))
    if same:
        _probe_own_files(engine, tag_dir, saved)
    return plan, saved, current


def load_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: str | None = None, *,
                    native_load: Any = None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, load_module_only: bool = False,
                    **kwargs: Any) -> tuple[str, dict]:
    """Resume from the tag ``latest`` names (or ``tag``), its files verified first: refused naming the
    file or manifest entry that does not belong to it, or both layouts when it holds another model;
    resharded exactly when dp x n x m (or the ZeRO stage) changed (see the module docstring).
    Returns (path, client_state).

    ``native_load`` is DeepSpeed's own ``load_checkpoint`` (the unwrapped method; default: looked up).

    Example:
        >>> _, client = ds_twolevel.load_checkpoint(engine, "ckpt")   # any layout of the same model
    """
    from ds_twolevel.deepspeed.engine_patch import ensure_installed, original

    ensure_installed()
    load_dir = Path(load_dir)
    with agreement(None, what=f"loading checkpoint {load_dir}"):
        tag = find_checkpoint(load_dir, tag)
        plan, saved, current = plan_resume(engine, load_dir / tag)
    if FILES_KEY not in saved.info and dist.get_rank() == 0:
        print(f"[ds_twolevel] warning: {load_dir / tag} records no file checksums (saved by an older ds_twolevel): "
              f"its files are not verified; re-save it to add them", file=sys.stderr, flush=True)
    if load_module_only:
        load_optimizer_states = load_lr_scheduler_states = False
    if plan == "native":
        if native_load is None:
            native_load = original("load_checkpoint")
        path, client = native_load(engine, str(load_dir), tag=tag, load_optimizer_states=load_optimizer_states,
                                   load_lr_scheduler_states=load_lr_scheduler_states,
                                   load_module_only=load_module_only, **kwargs)
        if path is None:
            raise ValueError(f"DeepSpeed could not load {load_dir / tag} (see its log above); resume from another tag")
        return path, client or {}
    if dist.get_rank() == 0:
        print(f"[ds_twolevel] resharding {load_dir / tag}: {_layouts(saved, current)}", file=sys.stderr, flush=True)
    return reshard_load(engine, load_dir / tag, saved, current, load_optimizer_states=load_optimizer_states,
                        load_lr_scheduler_states=load_lr_scheduler_states)


def reshard_load(engine: Any, tag_dir: Path, saved: ShardManifest, current: ShardManifest, *,
                 load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True) -> tuple[str, dict]:
    """Load a checkpoint saved at another layout (or ZeRO stage): dense fp32 weights and moments
    assembled from its files, this rank's shards cut out for the current layout."""
    from ds_twolevel.deepspeed.engine_state import load_local_state

    with agreement(None, what=f"reading {tag_dir}"):
        ckpt = read_checkpoint(tag_dir, saved)
    params = {n for n, _ in engine.module.named_parameters(remove_duplicate=False)}
    tp_rank = mesh_of(engine).axes.tp.rank
    fp32 = assemble(saved, [{**r.fp32, **r.buffers} for r in ckpt.ranks])
    local_all = extract(current, fp32, tp_rank)
    local = RankTensors(fp32={k: v for k, v in local_all.items() if k in params},
                        buffers={k: v for k, v in local_all.items() if k not in params}, step=ckpt.ranks[0].step)
    for key in ckpt.ranks[0].moments if load_optimizer_states else ():
        dense = assemble(saved, [r.moments[key] for r in ckpt.ranks])
        local.moments[key] = extract(current, dense, tp_rank)
    load_local_state(engine, local, ckpt.common, load_optimizer_states=load_optimizer_states,
                     load_lr_scheduler_states=load_lr_scheduler_states)
    return str(tag_dir), dict(ckpt.common["client_state"])


def dense_from_checkpoint(tag_dir: str | os.PathLike, *, states: tuple[str, ...] = ("fp32",)
                          ) -> dict[str, dict[str, torch.Tensor]]:
    """The dense tensors of a checkpoint, per state: ``"fp32"`` (master weights and buffers), and any
    optimizer state key (``"exp_avg"``, ``"exp_avg_sq"``). Pure (no process group).

    Example:
        >>> dense_from_checkpoint("ckpt/global_step10")["fp32"]["model.embed_tokens.weight"]
    """
    tag_dir = Path(tag_dir)
    manifest = ShardManifest.read(tag_dir)
    check_structure(manifest, str(tag_dir / MANIFEST_NAME))
    verify_files(tag_dir, manifest, _expected_files(tag_dir, manifest))
    ckpt = read_checkpoint(tag_dir, manifest)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for state in states:
        if state == "fp32":
            out[state] = assemble(manifest, [{**r.fp32, **r.buffers} for r in ckpt.ranks])
        else:
            out[state] = assemble(manifest, [r.moments.get(state, {}) for r in ckpt.ranks])
    return out
