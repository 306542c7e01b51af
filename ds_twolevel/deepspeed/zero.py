"""ZeRO-3 with the two-level layout: ``zero.Init`` over the dp axis only, transformers' weight init
on gathered parameters, and gathering a partitioned module for a read.

Example:
    >>> mesh = ds_twolevel.build_mesh("ds_configs/zero3_init_n2_m2.json")
    >>> model = ds_twolevel.zero_init_model(lambda: LlamaForCausalLM(cfg), "ds_configs/zero3_init_n2_m2.json", mesh)
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ds_twolevel.deepspeed import compat
from ds_twolevel.deepspeed.config import load_deepspeed_config, zero_stage
from ds_twolevel.parallel.layout import TwoLevelMesh


def is_zero_partitioned(model: nn.Module) -> bool:
    """Some parameter of ``model`` was partitioned by ``deepspeed.zero.Init`` (it has a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """ZeRO-3: materialise every parameter over the dp axis (read-only); otherwise nothing to do."""
    if not is_zero_partitioned(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


@contextlib.contextmanager
def zero_init(config: str | os.PathLike | Mapping[str, Any], mesh: TwoLevelMesh) -> Iterator[None]:
    """``deepspeed.zero.Init`` partitioning over the mesh's dp axis only (ZeRO stage 3).

    Import model classes (e.g. transformers) before entering it.

    Example:
        >>> mesh = ds_twolevel.build_mesh(cfg_path)
        >>> with ds_twolevel.zero_init(cfg_path, mesh):
        ...     model = MyModel()   # Hugging Face models: zero_init_model (it also runs their weight init)
        >>> engine, *_ = ds_twolevel.initialize(model=model, config=cfg_path, mesh=mesh)
    """
    import deepspeed

    _, ds = load_deepspeed_config(config)
    if zero_stage(ds) != 3:
        raise ValueError(f"zero_init needs ZeRO stage 3, the config has stage {zero_stage(ds)}; "
                         'set "zero_optimization": {"stage": 3}')
    # axes.zero: the dp axis, or dp x sp under Ulysses (the ranks holding the same two-level shards)
    with deepspeed.zero.Init(config_dict_or_path=ds, mpu=mesh, data_parallel_group=mesh.axes.zero.group):
        yield


def partition_over_sequence_data(model: nn.Module, ds: Mapping[str, Any], mesh: TwoLevelMesh) -> None:
    """ZeRO-3 under Ulysses (sp > 1): partition the patched ``model`` over dp x sp, as Ulysses does, and make
    its gradients the sum over sp averaged over dp. Nothing to do at sp = 1 or below stage 3.

    - DeepSpeed's engine would convert the model over the mpu's data-parallel group (dp alone: DeepSpeed's
      own Ulysses mpu has none, so it takes the world) and then reduce each gradient over dp only, leaving
      out the sum over sp; so the model is partitioned here first (a model built under zero.Init already is,
      :func:`zero_init`).
    - Stages 0-2 divide the gradients summed over dp x sp by dp (the sum over sp of each rank's share of the
      loss is the batch's gradient). Stage 3's reduce-scatter (``DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads``,
      deepspeed 0.19) divides by dp x sp: each gradient is multiplied by sp as it arrives (exact for sp a
      power of two), so that every stage trains on the same loss shares. Its other path (``"reduce_scatter":
      false``, which divides by dp for small buckets only) is refused by the config check.

    Example:
        >>> partition_over_sequence_data(model, ds, mesh)   # ds_twolevel.initialize calls it
    """
    sp = mesh.layout.sp
    if zero_stage(ds) != 3 or sp == 1:
        return
    import deepspeed

    if not is_zero_partitioned(model):
        deepspeed.zero.Init(module=model, config_dict_or_path=dict(ds), mpu=mesh,
                            data_parallel_group=mesh.axes.zero.group)
    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(functools.partial(torch.mul, other=float(sp)))
