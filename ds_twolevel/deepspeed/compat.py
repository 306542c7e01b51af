"""Every workaround of a private (or undocumented) API of DeepSpeed, transformers, accelerate and
torch.distributed that ds_twolevel's integration layer and hf_integration use: one small function each.

Checked with torch 2.13, deepspeed 0.19.8, transformers 5.24 and accelerate 1.15. Each function's
comment names the private API it touches and what breaks if that changes, so a version bump starts
here. Nothing heavy is imported at module level: each function imports what it needs, so this module
is as light as ``import ds_twolevel``.

Private APIs used elsewhere, on purpose (not wrapped here):

* the CORE may not import the integration layer, and torch 2.13 has no public equivalent of what
  ``ds_twolevel/parallel/layout.py`` uses: ``torch._C._distributed_c10d.Backend.Options`` (the type
  ``init_device_mesh(backend_override=...)`` takes; torch's own ``device_mesh.py`` imports it from
  there), ``Options._timeout`` (the only way to give the mesh's sub-groups a timeout; without it
  they get c10d's 10/30 min default), ``DeviceMesh._flatten`` (the "tp" axis) and
  ``DeviceMesh._unflatten`` (the "kv_rep" axis). If they change, building a mesh fails loudly.
  ``ds_twolevel/layers/dropout.py`` uses ``torch._C._current_autograd_node()`` (whether a backward
  node is running: where activation checkpointing recomputes, so a recompute reuses its forward's
  dropout key); if it disappears, ``in_backward`` raises AttributeError on the first dropout forward.
* ``nn.Module._parameters`` (hf_integration ``weights``, ``checkpoint``, ``probe``): replace a
  parameter in place and keep tied weights tied; torch's long-standing module internals.
* transformers' internal (undocumented, not underscored) loading modules:
  ``transformers.conversion_mapping.get_model_conversion_mapping`` and
  ``transformers.core_model_loading.{WeightRenaming, rename_source_key}`` (hf_integration
  ``checkpoint.checkpoint_keys``, ``fused_sources``); a change makes ``load_partitioned`` report
  tensors as missing (loud, before any collective).
* ``sys._getframe`` (``ds_twolevel.guard``): CPython, not one of the four libraries.

The ``DeepSpeedEngine`` methods that ``ds_twolevel.deepspeed.engine_hooks`` wraps include two private
ones, :data:`ZERO3_CONSOLIDATED` and :data:`CONSOLIDATED`.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

# -- DeepSpeed 0.19.8 ---------------------------------------------------------------------------------
ZERO3_CONSOLIDATED = "_zero3_consolidated_16bit_state_dict"
"""Private ``DeepSpeedEngine`` method that accelerate 1.15 ``Accelerator.get_state_dict`` and
transformers 5.24 ``Trainer.save_model`` call under ZeRO-3. If renamed, ``engine_hooks.install``
fails with AttributeError (loud), and those callers would get rank 0's shards if they called a new name."""
CONSOLIDATED = "_consolidated_16bit_state_dict"
"""Private ``DeepSpeedEngine`` method, the ZeRO-0/1/2 counterpart of :data:`ZERO3_CONSOLIDATED`."""
RECOVERY_SCRIPT_COPY = "_copy_recovery_script"
"""Private ``DeepSpeedEngine`` method (0.19.8) that copies ``zero_to_fp32.py`` into the save directory
on global rank 0 inside ``save_checkpoint``, outside its checkpoint engine's ``save``.
``ds_twolevel.deepspeed.engine_hooks`` guards it during a save so that a full or read-only disk there
is reported on every rank instead of taking rank 0 out of DeepSpeed's barrier; if it is renamed, the
guard does nothing and a failed copy raises on rank 0 alone, as in DeepSpeed."""


def ds_comm_backend() -> Any:
    """DeepSpeed's live comm backend, or None before ``deepspeed.init_distributed``.

    Private: the module global ``deepspeed.comm.comm.cdb``. If it moves, :func:`release_shm_workspace`
    and :func:`use_current_collective_names` silently do nothing (a /dev/shm leak, FutureWarnings).
    """
    from deepspeed.comm import comm as ds_comm  # the module holding the live ``cdb`` global

    return getattr(ds_comm, "cdb", None)


def release_shm_workspace() -> None:
    """Unlink the name of DeepSpeed's CPU shared-memory all-reduce workspace once every rank has it.

    DeepSpeed's CPU comm backend (deepspeed 0.19.8, ``ops/csrc/cpu/comm/shm.cpp``) creates a 69 MB
    POSIX shared-memory file per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    and never unlinks it: each launch leaks ranks x 69 MB of RAM until reboot. After a barrier every
    rank has mapped every other rank's workspace, so removing the names is safe: mappings outlive
    them. Collective when the shm op is loaded (the same on every rank); a no-op otherwise.
    Private: ``cdb.shm_comm_op`` and the file-name format; if either changes the leak returns
    (tests/test_deepspeed_e2e.py checks /dev/shm after a launch).

    Example:
        >>> release_shm_workspace()   # right after deepspeed.init_distributed (init_distributed does it)
    """
    import torch.distributed as dist

    if getattr(ds_comm_backend(), "shm_comm_op", None) is None or not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # shm not used (LOCAL_SIZE != world size) or already released
        pass


_RENAMED = (("all_gather_function", "all_gather_into_tensor", "all_gather_single"),
            ("reduce_scatter_function", "reduce_scatter_tensor", "reduce_scatter_single"))
"""(DeepSpeed backend attribute, name deprecated in torch 2.13, the same collective's current name)."""


def use_current_collective_names() -> None:
    """Point DeepSpeed's comm backend at ``all_gather_single`` / ``reduce_scatter_single``.

    DeepSpeed 0.19.8 picks ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (ZeRO's
    partition gathers and ZeRO-3's gradient reduce-scatter), which torch 2.13 deprecates with a
    ``FutureWarning`` on every rank; the ``*_single`` functions are the same collectives with the
    same arguments. Nothing changes where torch has no ``*_single`` or DeepSpeed chose otherwise.
    Private: the backend attributes ``all_gather_function`` / ``reduce_scatter_function`` of
    :func:`ds_comm_backend`; if renamed, the FutureWarnings come back (nothing else).
    """
    import torch.distributed as dist

    backend = ds_comm_backend()
    for attribute, old, new in _RENAMED:
        current = getattr(dist, new, None)
        if current is not None and getattr(backend, attribute, None) is getattr(dist, old, None):
            setattr(backend, attribute, current)


def record_stage0_grad_norm(engine: Any) -> None:
    """Stage 0 fp32 clips through ``clip_grad_norm_`` but drops the norm; keep it for
    ``engine.get_global_grad_norm()`` like the ZeRO optimizers do.

    Private: ``DeepSpeedEngine.clip_fp32_gradients`` (replaced on the instance) and the attribute
    ``_global_grad_norm`` that ``get_global_grad_norm`` returns. If they change, stage-0 fp32 engines
    report a grad norm of None again (tests/test_deepspeed_e2e.py compares it with the dense norm).
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record


def relink_optimizer_fragments(engine: Any) -> None:
    """ZeRO-1/2 link each parameter's fragment to the optimizer state only at the next step (after
    init or a load); ``safe_get_full_optimizer_state`` needs the link.

    Private: ``param._hp_mapping.optim_fragment``, ``DeepSpeedZeroOptimizer._hp_optimizer_states_linked``
    and ``_lazy_init_hp_params_optimizer_state``. If they change, reading moments right after a load
    fails with AttributeError (loud) or returns None (the checkpoint tests compare moments).
    """
    opt = engine.optimizer
    if any(getattr(getattr(p, "_hp_mapping", None), "optim_fragment", {}) is None for p in engine.module.parameters()):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def set_universal_checkpoint_info(module: Any, reason: str) -> None:
    """Make DeepSpeed's ``ds_to_universal`` refuse this model's checkpoints with ``reason``.

    Private: the model attribute ``universal_checkpoint_info`` (saved in the model states) with the key
    ``AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS``, read by ``deepspeed/checkpoint/ds_to_universal.py:
    _validate_autotp_conversion_support``. If it changes, ds_to_universal would convert our shards as
    contiguous TP slices: wrong weights (tests/test_deepspeed_e2e.py checks the refusal).
    """
    from deepspeed.checkpoint.constants import (AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    module.universal_checkpoint_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
                                        AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS: {".*": reason}}


def mark_autotp_parsed(model: Any) -> None:
    """Make DeepSpeed's AutoTP training leave a partitioned model alone.

    Undocumented: ``DeepSpeedEngine._apply_autotp_partitioning`` returns early when
    ``model.ds_autotp_parsed`` is set. If that changes, accelerate / the Trainer with
    ``tensor_parallel.autotp_size`` would re-partition our shards; the guard then refuses (loud).

    The Trainer then calls ``deepspeed.tp_model_init`` on the marked model, which logs on every rank
    that the attribute exists and that it only records its arguments: what this mark is for, so
    that one record is dropped from DeepSpeed's logger (:class:`_DropAutotpRecord`).
    """
    model.ds_autotp_parsed = True
    from deepspeed.utils import logger

    if not any(isinstance(f, _DropAutotpRecord) for f in logger.filters):
        logger.addFilter(_DropAutotpRecord())


class _DropAutotpRecord:
    """Drops deepspeed 0.19's ``tp_model_init`` record about an existing ``ds_autotp_parsed``."""

    MESSAGE = "ds_autotp_parsed' attribute already exists in the model; tp_model_init is now record-only."

    def filter(self, record: Any) -> bool:
        return not (record.funcName == "tp_model_init" and record.getMessage() == self.MESSAGE)


# -- accelerate 1.15 ----------------------------------------------------------------------------------
def accelerate_state_initialized() -> bool:
    """Whether accelerate set up this process (without importing accelerate).

    Private: ``accelerate.state.PartialState._shared_state`` (the borg state, empty until a
    ``PartialState`` / ``Accelerator`` is made). If it changes, the guard's messages only lose the
    words "(made by accelerate's Accelerator.prepare)".
    """
    state = getattr(sys.modules.get("accelerate.state"), "PartialState", None)
    return bool(state is not None and getattr(state, "_shared_state", None))


# -- transformers 5.24 --------------------------------------------------------------------------------
def hf_mark_uninitialized(model: Any) -> None:
    """Undo ``post_init``'s marks so that transformers' weight init runs again on every module.

    Private: the per-module flag ``_is_hf_initialized``. If renamed, ``zero_init_model`` leaves
    ZeRO-3 models with their empty-shard values (tests/test_deepspeed_e2e.py checks the init).
    """
    for module in model.modules():
        module._is_hf_initialized = False


def hf_init_function(module: Any) -> Callable[[Any, bool], None]:
    """The ``(module, is_remote_code)`` init function transformers applies to a PreTrainedModel's modules.

    Private: ``PreTrainedModel._initialize_weights``. If renamed: AttributeError in ``zero_init_model`` (loud).
    """
    return module._initialize_weights


def hf_init_guard() -> Any:
    """transformers' context that keeps ``torch.nn.init`` from touching already initialised tensors.

    Internal: ``transformers.initialization.guard_torch_init_functions``. If it moves: ImportError /
    AttributeError in ``zero_init_model`` (loud).
    """
    from transformers import initialization as hf_init

    return hf_init.guard_torch_init_functions()


def hf_from_config(cls: type, config: Any, dtype: Any = None) -> Any:
    """``cls`` built from ``config`` without loading weights (what ``from_pretrained`` does first).

    Private: ``PreTrainedModel._from_config``. If renamed: AttributeError in ``load_partitioned`` (loud).
    """
    return cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)


def hf_report_unexpected_keys(model: Any, unexpected: set[str], source: str) -> None:
    """transformers' own LOAD REPORT for checkpoint tensors the model does not use.

    Private / internal: ``PreTrainedModel._adjust_missing_and_unexpected_keys`` (the rotary inv_freq /
    position_ids exceptions) and ``transformers.utils.loading_report.{LoadStateDictInfo,
    log_state_dict_report}``. If they change: an error while loading (loud) or a different warning text.
    """
    from transformers.modeling_utils import logger as hf_logger
    from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

    info = LoadStateDictInfo(missing_keys=set(), unexpected_keys=unexpected, mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())
    model._adjust_missing_and_unexpected_keys(info)
    log_state_dict_report(model=model, pretrained_model_name_or_path=source, ignore_mismatched_sizes=False,
                          loading_info=info, logger=hf_logger)


def hf_experts_functions(experts: Any) -> tuple[Callable, Callable]:
    """(gate, forward) of a transformers experts module, to run on a slice of every expert.

    Private: ``MixtralExperts._apply_gate`` (act(gate) * up), and ``forward``'s dispatch on
    ``config._experts_implementation`` (transformers.integrations.moe). If they change: AttributeError
    at patch time (loud), or a different result, which the parity probe refuses on every rank.
    """
    cls = type(experts)
    return cls._apply_gate, cls.forward


def hf_experts_not_expert_parallel(module: Any) -> None:
    """Tell transformers' experts functions that ``module`` holds every expert (no expert parallelism).

    Private: the attribute ``_is_expert_parallel`` read by transformers.integrations.moe. If renamed,
    the functions may route tokens as if experts were spread over ranks; the parity probe refuses.
    """
    module._is_expert_parallel = False


# -- torch 2.13 ---------------------------------------------------------------------------------------
def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` applied to every leaf of nested tuples / lists / dicts (torch has no public pytree).

    Private: ``torch.utils._pytree.tree_map``. If it moves: ImportError in the parity probe (loud).
    """
    from torch.utils._pytree import tree_map as torch_tree_map

    return torch_tree_map(fn, tree)
