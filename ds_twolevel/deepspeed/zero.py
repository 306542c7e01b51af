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


def zero_init_model(factory: Callable[[], nn.Module], config: str | os.PathLike | Mapping[str, Any],
                    mesh: TwoLevelMesh) -> nn.Module:
    """``factory()`` under :func:`zero_init`; Hugging Face models then get their weight init.

    transformers' own ZeRO-3 path cannot be used: it partitions over the whole world (ranks of
    one layer would mix different shards) and initialises on global rank 0 only. Here every rank
    runs ``_init_weights`` on gathered parameters: with the same seed every rank draws the same
    values. (They are a valid init, but not the same draw as ``factory()`` without ZeRO: the
    order in which random numbers are consumed differs.)

    Example:
        >>> model = ds_twolevel.zero_init_model(lambda: LlamaForCausalLM(cfg), "ds_configs/zero3_init_n2_m2.json", mesh)
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # no transformers: nothing HF-specific to do
        PreTrainedModel = None
    with zero_init(config, mesh):
        model = factory()  # post_init ran on empty shards: it drew no random numbers
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        _init_weights_gathered(model, PreTrainedModel)
    return model


@torch.no_grad()
def _init_weights_gathered(model: nn.Module, pretrained_cls: type) -> None:
    """transformers' ``initialize_weights`` order (children first), each module's parameters gathered."""
    import deepspeed

    remote = model.is_remote_code()
    compat.hf_mark_uninitialized(model)  # post_init marked the (empty) modules initialised

    def apply(module: nn.Module, fn: Callable) -> None:
        for child in module.children():
            apply(child, compat.hf_init_function(child) if isinstance(child, pretrained_cls) else fn)
        params = list(module.parameters(recurse=False))
        params += [p for c in module.children() if not isinstance(c, pretrained_cls) for p in c.parameters(recurse=False)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0) if params else contextlib.nullcontext():
            fn(module, remote)  # on every rank: identical values, rank 0 of each dp group keeps them

    with compat.hf_init_guard():
        apply(model, compat.hf_init_function(model))
