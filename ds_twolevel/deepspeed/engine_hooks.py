"""DeepSpeed's own save and load entry points, made right for engines that hold a two-level model.

DeepSpeed knows nothing of two-level shards: ``save_16bit_model`` writes rank 0's *shards* under
the dense names, ``engine.load_checkpoint`` loads shards into whatever coordinates the running
layout has, ``zero_to_fp32`` cannot merge tp x dp files. The Hugging Face Trainer and accelerate
call exactly these methods (``save_16bit_model``, ``_zero3_consolidated_16bit_state_dict``,
``_consolidated_16bit_state_dict``, ``save_checkpoint``, ``load_checkpoint``), so :func:`install`
wraps them once, on the ``DeepSpeedEngine`` class. A wrapper checks whether the engine's module is
a two-level model and otherwise calls DeepSpeed's original untouched:

* ``save_16bit_model`` / ``_zero3_consolidated_16bit_state_dict`` / ``_consolidated_16bit_state_dict``:
  the dense state dict (:func:`ds_twolevel.dense_state_dict`, the unpatched model's names and shapes),
  which ``from_pretrained`` loads;
* ``save_checkpoint``: DeepSpeed's save, then the layout manifest in the tag directory, and our
  ``zero_to_fp32.py`` beside it; the model carries a ``universal_checkpoint_info`` that makes
  DeepSpeed's ``ds_to_universal`` refuse with a pointer to ``ds-twolevel convert``;
* ``load_checkpoint``: :func:`ds_twolevel.deepspeed.checkpoint.load_checkpoint` (checked, resharded when
  the layout changed).

``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` returns the dense fp32
state dict for our checkpoints. :func:`install` runs in ``ds_twolevel.initialize``, in
``ds_twolevel.save_checkpoint`` / ``load_checkpoint``, and, through :func:`install_when_imported`,
as soon as DeepSpeed's engine module is imported after a model was patched.

The private DeepSpeed API this touches (two private engine methods, ``universal_checkpoint_info``)
lives, version-commented, in :mod:`ds_twolevel.deepspeed.compat` (:data:`~ds_twolevel.deepspeed.compat.
ZERO3_CONSOLIDATED`, :data:`~ds_twolevel.deepspeed.compat.CONSOLIDATED`,
:func:`~ds_twolevel.deepspeed.compat.set_universal_checkpoint_info`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ds_twolevel.deepspeed.compat import (CONSOLIDATED, RECOVERY_SCRIPT_COPY, ZERO3_CONSOLIDATED,
                                         set_universal_checkpoint_info)
from ds_twolevel.deepspeed.engine_patch import MARK as _MARK
from ds_twolevel.deepspeed.engine_patch import original, register_installer  # noqa: F401 (original re-exported)
from ds_twolevel.deepspeed.import_hooks import when_imported

logger = logging.getLogger("ds_twolevel")
ENGINE_MODULE = "deepspeed.runtime.engine"


def is_two_level(engine: Any) -> bool:
    """The engine's module holds two-level layers."""
    from ds_twolevel.sharding.shard_manifest import partitioned_modules

    module = getattr(engine, "module", None)
    return module is not None and bool(partitioned_modules(module))


def _rank0(state: dict) -> dict | None:
    """DeepSpeed's contract: the consolidated state dict on global rank 0, None elsewhere."""
    return state if dist.get_rank() == 0 else None


def _drop_frozen(engine: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the dense tensors all of whose shards are frozen (``exclude_frozen_parameters``)."""
    from ds_twolevel.deepspeed.checkpoint import current_manifest

    manifest = current_manifest(engine)
    trainable = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if p.requires_grad}
    keep = {e.key for n, e in manifest.entries.items() if n in trainable}
    return {k: v for k, v in state.items() if k in keep}


def dense_16bit(engine: Any, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
    """The dense state dict in the module's own dtype, on every rank (collective)."""
    from ds_twolevel.deepspeed.export import dense_state_dict

    state = dense_state_dict(engine)
    return _drop_frozen(engine, state) if exclude_frozen_parameters else state


# -- the wrappers ------------------------------------------------------------------------------------
def _zero3_consolidated_16bit_state_dict(original: Callable, self: Any, exclude_frozen_parameters: bool = False):
    if not is_two_level(self):
        return original(self, exclude_frozen_parameters)
    if not self.zero_optimization_partition_weights():
        raise ValueError("this function requires ZeRO-3 mode")
    return _rank0(dense_16bit(self, exclude_frozen_parameters))


def _consolidated_16bit_state_dict(original: Callable, self: Any, exclude_frozen_parameters: bool = False):
    if not is_two_level(self):
        return original(self, exclude_frozen_parameters)
    return _rank0(dense_16bit(self, exclude_frozen_parameters))


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors for ``*.safetensors`` names, torch.save otherwise; temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)


def _save_16bit_model(original: Callable, self: Any, save_dir: str, save_filename: str = "pytorch_model.bin",
                      exclude_frozen_parameters: bool = False) -> bool:
    if not is_two_level(self):
        return original(self, save_dir, save_filename, exclude_frozen_parameters)
    path = Path(save_dir) / save_filename
    if self.zero_optimization_partition_weights() and not self.zero_gather_16bit_weights_on_model_save():
        logger.info("Did not save the model %s because stage3_gather_16bit_weights_on_model_save is False", path)
        return False  # DeepSpeed's own behaviour; ds_twolevel.export_dense always gathers
    state = dense_16bit(self, exclude_frozen_parameters)
    if dist.get_rank() == 0:
        _save_weights(state, path)
    dist.barrier()
    return True


def _universal_reason(engine: Any) -> str:
    """Why DeepSpeed's ds_to_universal must not convert this engine's checkpoints, and what works."""
    from ds_twolevel.deepspeed.checkpoint import mesh_of

    layout = mesh_of(engine).layout
    return (f"ds_twolevel two-level shards (dp={layout.dp} x n={layout.n} x m={layout.m}) are not contiguous tensor-"
              f"parallel slices; get the dense weights with `ds-twolevel convert CHECKPOINT_DIR OUT`, and resume at any "
              f"layout with ds_twolevel.load_checkpoint (it reshards)")


def _save_checkpoint(original: Callable, self: Any, save_dir: str, tag: Any = None, client_state: dict | None = None,
                     save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
    if not is_two_level(self):
        return original(self, save_dir, tag, client_state if client_state is not None else {}, save_latest,
                        exclude_frozen_parameters)
    from ds_twolevel.deepspeed.checkpoint import after_deepspeed_save
    from ds_twolevel.deepspeed.convert import write_recovery_scripts

    tag = str(tag if tag is not None else f"global_step{self.global_steps}")
    needed, free = _before_save(self, Path(save_dir), tag)
    set_universal_checkpoint_info(self.module, _universal_reason(self))  # DeepSpeed saves it in the model states
    with _write_failures(self, Path(save_dir), needed, free) as failures:
        result = original(self, save_dir, tag, client_state or {}, save_latest, exclude_frozen_parameters)
    after_deepspeed_save(self, Path(save_dir), tag, write_scripts=write_recovery_scripts,
                         failure=failures[0] if failures else None)
    return result


def _before_save(engine: Any, save_dir: Path, tag: str) -> tuple[int, int | None]:
    """(bytes the save needs, bytes free in ``save_dir``), after an agreement step in which the
    writing rank creates ``save_dir`` and a small file in it and checks the free space: a read-only,
    forbidden or too full directory is refused on every rank before DeepSpeed writes anything."""
    import errno
    import shutil

    from ds_twolevel.deepspeed.checkpoint import is_writer, mesh_of
    from ds_twolevel.deepspeed.integrity import estimate_save_bytes, free_bytes, probe_writable, write_failure
    from ds_twolevel.parallel.agreement import agreement

    needed, free = estimate_save_bytes(engine, mesh_of(engine).layout.tp_size), free_bytes(save_dir)
    with agreement(None, what=f"saving {save_dir / tag.removesuffix('.partial')}"):
        if is_writer(engine):
            try:
                probe_writable(save_dir)
                if shutil.disk_usage(save_dir).free < needed:
                    raise OSError(errno.ENOSPC, "the save does not fit")
            except OSError as err:
                raise OSError(write_failure(err, save_dir, needed, free)) from None
    return needed, free


@contextlib.contextmanager
def _write_failures(engine: Any, save_dir: Path, needed: int, free: int | None) -> Iterator[list[str]]:
    """While DeepSpeed saves: a file its checkpoint engine fails to write (full disk, read-only) is
    removed and recorded as one line in the yielded list instead of raised, and later writes are
    skipped, so that this rank still reaches DeepSpeed's barriers; the caller raises it on every rank."""
    from ds_twolevel.deepspeed.integrity import write_failure

    checkpoint_engine, failures = engine.checkpoint_engine, []
    own = checkpoint_engine.__dict__.get("save")
    original_save = checkpoint_engine.save

    def save(state_dict: Any, path: str) -> None:
        if failures:
            return
        try:
            original_save(state_dict, path)
        except (OSError, RuntimeError) as err:
            failures.append(write_failure(err, save_dir, needed, free))
            with contextlib.suppress(OSError):  # free the space a partial file holds
                Path(path).unlink(missing_ok=True)

    def copy_script(save_path: str) -> None:
        if failures:
            return
        try:
            original_copy(save_path)
        except OSError as err:
            failures.append(write_failure(err, save_dir, needed, free))

    original_copy = getattr(engine, RECOVERY_SCRIPT_COPY, None)
    checkpoint_engine.save = save
    if original_copy is not None:
        setattr(engine, RECOVERY_SCRIPT_COPY, copy_script)
    try:
        yield failures
    finally:
        if own is None:
            del checkpoint_engine.save
        else:
            checkpoint_engine.save = own
        if original_copy is not None:
            delattr(engine, RECOVERY_SCRIPT_COPY)  # the class's method again


def _load_checkpoint(original: Callable, self: Any, load_dir: str, tag: Any = None, load_module_strict: bool = True,
                     load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                     load_module_only: bool = False, custom_load_fn: Callable | None = None):
    if not is_two_level(self):
        return original(self, load_dir, tag, load_module_strict, load_optimizer_states, load_lr_scheduler_states,
                        load_module_only, custom_load_fn)
    from ds_twolevel.deepspeed.checkpoint import load_checkpoint

    extra = {"load_module_strict": load_module_strict, "custom_load_fn": custom_load_fn}
    return load_checkpoint(self, load_dir, None if tag is None else str(tag), native_load=original,
                           load_optimizer_states=load_optimizer_states, load_module_only=load_module_only,
                           load_lr_scheduler_states=load_lr_scheduler_states, **extra)


WRAPPERS: dict[str, Callable] = {
    "save_16bit_model": _save_16bit_model,
    ZERO3_CONSOLIDATED: _zero3_consolidated_16bit_state_dict,
    CONSOLIDATED: _consolidated_16bit_state_dict,
    "save_checkpoint": _save_checkpoint,
    "load_checkpoint": _load_checkpoint,
}


def _wrap(original: Callable, wrapper: Callable) -> Callable:
    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(original, self, *args, **kwargs)

    return method


def _get_fp32_state_dict(original: Callable, checkpoint_dir: str, tag: str | None = None,
                         exclude_frozen_parameters: bool = False, lazy_mode: bool = False) -> dict:
    """DeepSpeed's function, or for a ds_twolevel checkpoint its dense fp32 state dict."""
    from ds_twolevel.deepspeed.convert import dense_fp32
    from ds_twolevel.sharding.shard_manifest import MANIFEST_NAME

    latest = Path(checkpoint_dir) / "latest"
    resolved = tag or (latest.read_text().strip() if latest.is_file() else None)
    if resolved is not None and (Path(checkpoint_dir) / resolved / MANIFEST_NAME).is_file():
        if exclude_frozen_parameters:
            raise ValueError("exclude_frozen_parameters is not supported for two-level checkpoints; drop it")
        return dense_fp32(checkpoint_dir, resolved)
    return original(checkpoint_dir, tag, exclude_frozen_parameters, lazy_mode)


def install() -> None:
    """Wrap the DeepSpeedEngine methods and ``get_fp32_state_dict_from_zero_checkpoint`` (idempotent)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import zero_to_fp32

    if _MARK in DeepSpeedEngine.__dict__:
        return
    originals = {name: getattr(DeepSpeedEngine, name) for name in WRAPPERS}
    for name, wrapper in WRAPPERS.items():
        setattr(DeepSpeedEngine, name, _wrap(originals[name], wrapper))
    original_fp32 = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
    zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint = functools.wraps(original_fp32)(
        functools.partial(_get_fp32_state_dict, original_fp32))
    setattr(DeepSpeedEngine, _MARK, {**originals, "get_fp32_state_dict_from_zero_checkpoint": original_fp32})


def install_when_imported() -> None:
    """:func:`install` now if DeepSpeed's engine is imported, else as soon as it is (patched models call this)."""
    when_imported(ENGINE_MODULE, lambda module: install())


register_installer(install)  # checkpoint's save/load make sure the wrappers are in place
