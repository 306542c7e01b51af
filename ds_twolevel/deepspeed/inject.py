"""The injection policy of the DeepSpeed path: how ``initialize`` / ``init_inference`` partition a
dense model (Hugging Face models through ``hf_integration.patch_model``, anything else through
``policy=``), gathering ZeRO-3 partitioned dense weights while the policy reads them.

Example:
    >>> model = patch(model, mesh, two_level_config)          # what ds_twolevel.initialize does
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ds_twolevel.deepspeed.config import TwoLevelConfig
from ds_twolevel.deepspeed.engine_hooks import install
from ds_twolevel.deepspeed.zero import is_zero_partitioned
from ds_twolevel.parallel.layout import TwoLevelMesh

Policy = Callable[[nn.Module, TwoLevelMesh, TwoLevelConfig], nn.Module]


def _is_patched(model: nn.Module) -> bool:
    from ds_twolevel.layers.attention import TwoLevelAttention

    return any(isinstance(mod, TwoLevelAttention) for mod in model.modules())


def default_policy(model: nn.Module, mesh: TwoLevelMesh, tl: TwoLevelConfig) -> nn.Module:
    """Partition a Hugging Face model in place through ``hf_integration.patch_model``.

    Anything else has no default policy: pass ``policy=`` to :func:`ds_twolevel.initialize`.

    Example:
        >>> model = default_policy(model, mesh, TwoLevelConfig(n=2, m=2))
    """
    if not hasattr(model, "config"):
        raise ValueError(
            f"no two-level injection policy for {type(model).__name__} (not a Hugging Face PreTrainedModel); "
            "pass policy=lambda model, mesh, cfg: ... that partitions it")
    try:
        from hf_integration import patch_model
    except ImportError as err:
        raise ValueError(
            f"no two-level injection policy for {type(model).__name__}: hf_integration.patch_model is not "
            f"importable ({err}); pass policy=... or a model ds_twolevel knows") from err
    out = patch_model(model, mesh, strict=tl.strict, strategy=tl.strategy, kv_replication=tl.kv_replication,
                      probe=tl.probe, hardware=tl.hardware, reduce_dtype=tl.reduce_dtype, sequence_parallel=tl.sequence_parallel,
                      vocab_parallel=tl.vocab_parallel)
    return model if out is None or not isinstance(out, nn.Module) else out


@torch.no_grad()
def _sync_dense_weights(model: nn.Module, mesh: TwoLevelMesh) -> None:
    """Broadcast every (dense, not ZeRO-partitioned) tensor from tp rank 0 over the tp axis."""
    tp = mesh.axes.tp
    if tp.size == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        if not hasattr(tensor, "ds_id"):
            dist.broadcast(tensor.data, group=tp.group, group_src=0)


def patch(model: nn.Module, mesh: TwoLevelMesh, tl: TwoLevelConfig, policy: Policy | None = None) -> nn.Module:
    """Apply the injection policy (gathering ZeRO-3 partitioned dense weights while it reads them).

    A model that already holds two-level layers is returned as is.

    Example:
        >>> model = patch(model, mesh, tl)        # tl: the config's TwoLevelConfig
    """
    install()  # DeepSpeed's save/load methods, right for two-level engines
    if _is_patched(model):
        return model
    policy = policy or default_policy
    if tl.sync_init:
        _sync_dense_weights(model, mesh)
    if not is_zero_partitioned(model):
        return policy(model, mesh, tl)
    import deepspeed

    # zero.Init partitioned the dense model over dp: gather it while the policy slices it; the
    # new (n*m-partitioned) layers' parameters are converted to ZeRO-3 by deepspeed.initialize.
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return policy(model, mesh, tl)
