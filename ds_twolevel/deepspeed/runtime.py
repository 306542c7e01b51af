"""DeepSpeed integration: ``ds_twolevel.initialize`` mirrors ``deepspeed.initialize``.

What it does, in order (every check before any collective):

1. reads the DeepSpeed config through :func:`~ds_twolevel.deepspeed.config.load_deepspeed_config` (the
   ``"two_level"`` section becomes a :class:`~ds_twolevel.deepspeed.config.TwoLevelConfig`) and refuses what
   cannot be honoured (:func:`~ds_twolevel.deepspeed.config.check_deepspeed_config`);
2. initialises distributed through ``deepspeed.init_distributed`` (gloo on CPU) with the
   configured timeout, and builds the dp x n x m mesh;
3. partitions the model in place through the injection policy (Hugging Face models through
   ``hf_integration.patch_model``, anything else through ``policy=``);
4. calls ``deepspeed.initialize(..., mpu=mesh)``: ZeRO shards and averages only over the dp axis,
   and DeepSpeed's gradient-norm code counts ``tensor_model_parallel`` shards on every rank of a
   layer and replicated parameters once (on tensor-parallel rank 0), so the clipped norm is the
   dense one. Replicated parameters need no extra all-reduce: the tp ranks of a replica see the
   same batch and the input all-reduces of the layers make their gradients identical.

Steps 2 and 3 live in :mod:`~ds_twolevel.deepspeed.rendezvous` and :mod:`~ds_twolevel.deepspeed.inject`;
ZeRO-3 construction in :mod:`~ds_twolevel.deepspeed.zero`, fail-fast in :mod:`~ds_twolevel.deepspeed.faults`,
checkpoints in :mod:`~ds_twolevel.deepspeed.checkpoint`, the dense export in :mod:`~ds_twolevel.deepspeed.export`.

Data: the dp replicas get different batches, the n*m ranks of one replica the SAME batch — use
:func:`replica_rows` (or ``training_data=``, whose sampler DeepSpeed builds from the mpu's dp axis).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ds_twolevel import guard
from ds_twolevel.deepspeed import ulysses
from ds_twolevel.deepspeed.compat import record_stage0_grad_norm, release_shm_workspace
from ds_twolevel.deepspeed.config import TwoLevelConfig, check_deepspeed_config, load_deepspeed_config, zero_stage
from ds_twolevel.deepspeed.inject import Policy, default_policy, patch
from ds_twolevel.deepspeed.rendezvous import build_mesh, device_type, env_world_size, init_distributed
from ds_twolevel.deepspeed.zero import is_zero_partitioned, partition_over_sequence_data
from ds_twolevel.parallel.layout import TwoLevelMesh

__all__ = ["Policy", "TwoLevelRuntime", "build_mesh", "default_policy", "init_distributed", "init_inference",
           "initialize", "patch", "release_shm_workspace", "replica_rows"]
"""Also importable from here: the rendezvous (:mod:`~ds_twolevel.deepspeed.rendezvous`), the injection
policy (:mod:`~ds_twolevel.deepspeed.inject`) and ``release_shm_workspace`` (:mod:`~ds_twolevel.deepspeed.compat`)."""


@dataclass
class TwoLevelRuntime:
    """What ``initialize`` attaches to the engine as ``engine.two_level``."""

    config: TwoLevelConfig
    """the validated "two_level" section."""
    mesh: TwoLevelMesh
    """the dp x n x m mesh handed to DeepSpeed as its mpu."""
    ds_config: dict[str, Any]
    """the DeepSpeed dict deepspeed.initialize received (no "two_level" section)."""


# -- initialize ------------------------------------------------------------------------------------
def _resolve_config(config: Any, args: Any) -> tuple[Any, Any]:
    """DeepSpeed accepts the config via ``config=`` or ``args.deepspeed_config``: take either."""
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if config is not None and from_args is not None:
        raise ValueError("the DeepSpeed config was given twice (config= and args.deepspeed_config); pass one")
    if config is None and from_args is None:
        raise ValueError("no DeepSpeed config: pass config= (path or dict) or --deepspeed_config")
    if from_args is not None:
        args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})
    return (config if config is not None else from_args), args


def _mesh_for(config: Any, tl: TwoLevelConfig, ds: dict[str, Any], mesh: TwoLevelMesh | None) -> TwoLevelMesh:
    """The mesh ``initialize`` uses: built from the config, or the given one checked against it."""
    if mesh is None:
        return build_mesh(config)
    if (mesh.layout.n, mesh.layout.m) != (tl.n, tl.m):
        raise ValueError(f"mesh has n={mesh.layout.n}, m={mesh.layout.m} but the config says n={tl.n}, m={tl.m}")
    layout = check_deepspeed_config(tl, ds, dist.get_world_size(), device_type=device_type())
    if layout.sp != mesh.layout.sp:
        raise ValueError(f'mesh has sp={mesh.layout.sp} but the config says "sequence_parallel_size" = {layout.sp}')
    return mesh


def initialize(model: nn.Module | None = None, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
               args: Any = None, mesh: TwoLevelMesh | None = None, policy: Policy | None = None,
               sequence_parallel: bool | None = None, vocab_parallel: bool | None = None,
               **deepspeed_kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """Partition ``model`` m x n and wrap it in a DeepSpeed engine; returns DeepSpeed's own tuple
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Args:
        model: a dense model (Hugging Face, or any model ``policy`` partitions) or one already partitioned.
        config: DeepSpeed config (path or dict) with a ``"two_level"`` section; or ``args.deepspeed_config``.
        args: as for ``deepspeed.initialize`` (``local_rank``, ``deepspeed_config``).
        mesh: a mesh from :func:`build_mesh` to reuse; built from the config otherwise.
        policy: ``policy(model, mesh, two_level_config) -> model``; default :func:`default_policy`.
        sequence_parallel: overrides the config's ``two_level.sequence_parallel`` (None: the config's); feed the
            engine each rank's shard (``hf_integration.sequence_data.SequenceShardLoader``).
        vocab_parallel: overrides the config's ``two_level.vocab_parallel`` (None: the config's).
        **deepspeed_kwargs: passed to ``deepspeed.initialize`` (optimizer, model_parameters,
            training_data, lr_scheduler, collate_fn, ...). ``mpu`` is ours.

    Example:
        >>> engine, optimizer, _, _ = ds_twolevel.initialize(model=model, config="ds_configs/zero2_n2_m2.json")
        >>> loss = engine(ids); engine.backward(loss); engine.step()
    """
    import deepspeed

    if model is None:
        raise ValueError("initialize needs model=")
    if "mpu" in deepspeed_kwargs:
        raise ValueError("mpu= is set by ds_twolevel.initialize (the two-level mesh); do not pass it")
    config, args = _resolve_config(config, args)
    tl, ds = load_deepspeed_config(config)
    switches = {k: bool(v) for k, v in (("sequence_parallel", sequence_parallel), ("vocab_parallel", vocab_parallel))
                if v is not None}
    if switches:
        tl = dataclasses.replace(tl, **switches)
    ulysses.check_model(model, tl, ds)  # "sequence_parallel_size": the model's heads, before any collective
    mesh = _mesh_for(config, tl, ds, mesh)
    if is_zero_partitioned(model) and zero_stage(ds) != 3:
        raise ValueError(f"the model was built under deepspeed.zero.Init but the config has ZeRO stage {zero_stage(ds)};"
                         ' build it normally or set "zero_optimization": {"stage": 3}')
    model = patch(model, mesh, tl, policy)
    partition_over_sequence_data(model, ds, mesh)  # ZeRO-3 under Ulysses: over dp x sp, not dp alone
    if "model_parameters" not in deepspeed_kwargs and deepspeed_kwargs.get("optimizer") is None:
        deepspeed_kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
    if getattr(model, "_twolevel_guard", None) is None:  # a policy= model: patch_model installs it otherwise
        guard.install(model, mesh)
    # "tensor_parallel.autotp_size" = n*m (accepted by check_deepspeed_config) is for accelerate and the
    # Trainer; with mpu=mesh DeepSpeed needs no groups of its own
    ds = {k: v for k, v in ds.items() if k != "tensor_parallel"}
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config=ds, args=args, mpu=mesh,
                                                                **deepspeed_kwargs)
    guard.check_now(model, wrapper=engine)  # groups and shards, before the first step (collective)
    engine.two_level = TwoLevelRuntime(tl, mesh, ds)
    if zero_stage(ds) == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        record_stage0_grad_norm(engine)
    return engine, optimizer, loader, scheduler


# -- inference -------------------------------------------------------------------------------------
def init_inference(model: nn.Module, config: str | os.PathLike | Mapping[str, Any], *, mesh: TwoLevelMesh | None = None,
                   policy: Policy | None = None) -> Any:
    """``deepspeed.init_inference`` with the two-level policy: returns DeepSpeed's InferenceEngine.

    The config is a DeepSpeed *inference* config (``dtype``, ``replace_with_kernel_inject``, ...)
    plus the ``"two_level"`` section. Our policy does the tensor parallelism, so DeepSpeed's own
    (``tensor_parallel.tp_size``, kernel injection) must stay off.

    Example:
        >>> engine = ds_twolevel.init_inference(model, "ds_configs/inference_n2_m2.json")
        >>> out = engine.generate(ids, max_new_tokens=16, do_sample=False)
    """
    import deepspeed

    tl, ds = load_deepspeed_config(config, inference=True)
    tp_size = int((ds.get("tensor_parallel") or {}).get("tp_size", 1) or 1)
    if tp_size > 1:
        raise ValueError(f'"tensor_parallel.tp_size" = {tp_size} contradicts "two_level" (n*m = {tl.tp_size} ranks '
                         'share each layer already); remove "tensor_parallel"')
    if ds.get("replace_with_kernel_inject"):
        raise ValueError('"replace_with_kernel_inject": true replaces the attention we partition; set it to false')
    if mesh is None:
        world = env_world_size()
        if world is not None:
            tl.layout(world)
        init_distributed(tl)
        mesh = tl.layout(dist.get_world_size()).build(timeout=datetime.timedelta(seconds=tl.timeout_s))
    model = patch(model, mesh, tl, policy)
    partition_over_sequence_data(model, ds, mesh)  # ZeRO-3 under Ulysses: over dp x sp, not dp alone
    engine = deepspeed.init_inference(model, config={**ds, "tensor_parallel": {"tp_size": 1},
                                                     "replace_with_kernel_inject": False})
    engine.two_level = TwoLevelRuntime(tl, mesh, ds)
    return engine


# -- data ------------------------------------------------------------------------------------------
def replica_rows(batch: torch.Tensor, mesh: TwoLevelMesh) -> torch.Tensor:
    """This data-parallel replica's rows of a global batch (the same rows on all n*m ranks of it).

    Example:
        >>> ids = replica_rows(global_ids, engine.two_level.mesh)   # (B/dp, s)
    """
    dp = mesh.get_data_parallel_world_size()
    if batch.shape[0] % dp:
        raise ValueError(f"global batch of {batch.shape[0]} rows does not split over dp = {dp} replicas; "
                         f"use a multiple of {dp}")
    rows = batch.shape[0] // dp
    start = mesh.get_data_parallel_rank() * rows
    return batch[start:start + rows]
