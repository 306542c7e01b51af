"""DeepSpeed AutoTP as a row of the layout benchmark: ``deepspeed.init_inference`` at tp = ranks,
its bytes read from DeepSpeed's own comms logger."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch
from torch import nn

from ds_twolevel.parallel.collectives import ring_bytes
from ds_twolevel.tools.bench.config import BenchConfig
from ds_twolevel.tools.bench.model import layer_param_bytes
from ds_twolevel.tools.bench.variants import Variant, VariantResult, hf_variant


def autotp_variant(hf_model: nn.Module, inp: dict, cfg: BenchConfig, ref: dict) -> Variant:
    """DeepSpeed AutoTP at tp = ranks on a copy of the model."""
    os.environ["LOCAL_SIZE"] = os.environ["WORLD_SIZE"]  # else inference_all_reduce segfaults on CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from ds_twolevel.deepspeed.runtime import release_shm_workspace

    engine = deepspeed.init_inference(copy.deepcopy(hf_model), tensor_parallel={"tp_size": cfg.ranks},
                                      dtype=torch.float32, replace_with_kernel_inject=False)
    release_shm_workspace()  # DeepSpeed never unlinks its /dev/shm workspace
    model = engine.module.model
    uneven = f" (attention on {cfg.kv_heads} of {cfg.ranks} ranks)" if cfg.ranks > cfg.kv_heads else ""
    res = VariantResult(f"DeepSpeed AutoTP tp={cfg.ranks}", "AutoTP" + uneven, param_bytes=layer_param_bytes(model.layers))
    variant = hf_variant(model, inp, res, ref, heads=_kv_heads(model, cfg))
    for phase, step in variant.steps.items():
        setattr(res, f"{phase}_bytes_per_layer", _ds_counted_bytes(step, cfg.ranks) // cfg.layers)
    return variant


def _kv_heads(model: nn.Module, cfg: BenchConfig) -> list[int]:
    """The KV heads this rank's AutoTP shard holds: its k_proj rows / d, after those of the ranks before it
    (DeepSpeed deals whole KV heads out in rank order)."""
    import torch.distributed as dist

    local = model.layers[0].self_attn.k_proj.weight.shape[0] // cfg.head_dim
    counts: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(counts, local)
    first = sum(counts[:dist.get_rank()])
    return list(range(first, first + local))


def _ds_counted_bytes(step: Callable[[], Any], ranks: int) -> int:
    """Bytes this rank sends in ``step``, from DeepSpeed's own comms logger (``deepspeed.comm``):
    every collective DeepSpeed issues is logged with its tensor size; a ring all-reduce over
    ``ranks`` sends 2 (p-1)/p of it. Run outside the timed steps (the logger synchronises)."""
    import deepspeed.comm as ds_comm

    ds_comm.reset_log()
    ds_comm.configure(enabled=True, prof_all=True, verbose=False)
    try:
        step()
    finally:
        ds_comm.configure(enabled=False)
    logged = {name: dict(sizes) for name, sizes in ds_comm.comms_logger.comms_dict.items()}
    ds_comm.reset_log()
    if any("all_reduce" not in name for name in logged):
        raise RuntimeError(f"AutoTP issued collectives other than all-reduce: {sorted(logged)}")
    return sum(vals[0] * ring_bytes("all_reduce", size, ranks) for sizes in logged.values() for size, vals in sizes.items())
