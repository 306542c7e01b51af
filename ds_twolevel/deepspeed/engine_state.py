"""A live DeepSpeed engine's weights and optimizer state, read and written per local tensor.

Used by the cross-layout resume (write resharded tensors into a fresh engine) and by tests (read
the fp32 master weights and Adam moments of a trained engine to compare with a checkpoint).
Stage 0 holds everything in the module and a torch optimizer; ZeRO-1/2/3 keep fp32 partitions
that DeepSpeed's tensor-fragment API (``deepspeed.utils.safe_get/set_full_*``, public) reads and
writes per parameter, and ZeRO's own ``state_dict()`` / ``load_state_dict()`` restore the
optimizer from a state dict of this rank's partition.

DeepSpeed attributes used here (checked against DeepSpeed 0.19.8; anything private is marked):
    ``engine.optimizer`` (ZeRO optimizer or the torch optimizer at stage 0),
    ``engine.zero_optimization_stage()``, ``engine.global_steps`` / ``global_samples`` /
    ``skipped_steps``, ``engine.lr_scheduler``, ``optimizer.dp_process_group`` (ZeRO),
    ``optimizer.optimizer`` (the wrapped torch optimizer, ZeRO-1/2),
    the state-dict keys ``base_optimizer_state`` / ``single_partition_of_fp32_groups`` (ZeRO-1/2)
    and ``optimizer_state_dict`` / ``fp32_flat_groups`` (ZeRO-3).
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ds_twolevel.sharding.shard_manifest import ShardManifest, assemble, local_shape
from ds_twolevel.deepspeed.compat import relink_optimizer_fragments
from ds_twolevel.deepspeed.zero_files import RankTensors


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def check_supported(engine: Any, *, what: str) -> None:
    """ValueError naming the setting when the engine's state cannot be read or written per tensor."""
    stage = zero_stage(engine)
    mixed = engine.fp16_enabled() or engine.bfloat16_enabled()
    if stage == 0 and mixed:
        raise ValueError(f"{what} needs ZeRO stage 1-3 with fp16/bf16 (stage 0 wraps the optimizer in DeepSpeed's "
                         f"fp16/bf16 optimizer, whose state is not per tensor); use ZeRO stage 1 or fp32")
    if stage > 0 and (engine.zero_cpu_offload() or engine.zero_nvme_offload_optimizer()):
        raise ValueError(f"{what} does not support ZeRO optimizer offload (the state lives outside the optimizer); "
                         f'remove "offload_optimizer" from "zero_optimization"')
    if stage == 0 and not isinstance(engine.optimizer, torch.optim.Optimizer):
        raise ValueError(f"{what} needs a torch optimizer at ZeRO stage 0, the engine has "
                         f"{type(engine.optimizer).__name__}")


def named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every (name, parameter), tied names included (state-dict names)."""
    return module.named_parameters(remove_duplicate=False)


def optimizer_param_order(engine: Any) -> list[list[str]]:
    """Stage 0: the names of the torch optimizer's parameters, group by group (its state is by index)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


# -- reading -----------------------------------------------------------------------------------------
def _base_state(engine: Any) -> dict:
    """The torch optimizer's state dict (stage 0: the optimizer itself; ZeRO: the one it wraps)."""
    stage, opt = zero_stage(engine), engine.optimizer
    if stage == 0:
        return opt.state_dict()
    sd = opt.state_dict()
    return sd["optimizer_state_dict"] if stage == 3 else sd["base_optimizer_state"]


def moment_keys(engine: Any) -> list[str]:
    """Tensor state keys of the optimizer (``exp_avg``, ``exp_avg_sq`` for Adam); empty before a step."""
    state = _base_state(engine)["state"]
    first = state[next(iter(state))] if state else {}
    return [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]


def local_state(engine: Any) -> RankTensors:
    """This rank's local tensors, whole over dp: fp32 master weights, moments, buffers and step.

    Collective over the dp group under ZeRO (DeepSpeed gathers each parameter's partitions).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module, stage = engine.module, zero_stage(engine)
    keys = moment_keys(engine)
    if stage in (1, 2):
        relink_optimizer_fragments(engine)
    out = RankTensors(buffers={k: b.detach().clone() for k, b in module.state_dict().items()
                               if k not in dict(named_parameters(module))})
    for name, p in named_parameters(module):
        if stage == 0:
            out.fp32[name] = p.detach().clone()
            state = engine.optimizer.state.get(p, {})
            values = {k: state[k] for k in keys if k in state}
        else:
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            out.fp32[name] = master.detach().clone() if master is not None else _gathered_copy(p)
            values = {k: safe_get_full_optimizer_state(p, k) for k in keys} if p.requires_grad else {}
        for k, v in values.items():
            out.moments.setdefault(k, {})[name] = v.detach().clone()
    state = _base_state(engine)["state"]
    out.step = state[next(iter(state))]["step"].clone() if state else None
    return out


def _gathered_copy(p: nn.Parameter) -> torch.Tensor:
    """A frozen parameter (no fp32 master): its own values, gathered over dp under ZeRO-3."""
    if not hasattr(p, "ds_id"):
        return p.detach().float().clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.detach().float().clone()


def dense_state(engine: Any, mesh: Any, manifest: ShardManifest) -> dict[str, dict[str, torch.Tensor]]:
    """``{"fp32": dense weights, <moment key>: dense moment, ...}`` of a live engine, on every rank.

    Collective over the world (dp inside DeepSpeed, then an all-gather over tp per tensor).
    """
    local = local_state(engine)
    out = {"fp32": _gather_tp(local.fp32, mesh, manifest)}
    for key, tensors in local.moments.items():
        out[key] = _gather_tp(tensors, mesh, manifest)
    return out


def _gather_tp(local: dict[str, torch.Tensor], mesh: Any, manifest: ShardManifest) -> dict[str, torch.Tensor]:
    """Every tp rank's local tensors, assembled dense. Shards of unequal size (vocab rows when n*m does not
    divide V) travel padded to the largest one (their shapes come from the manifest)."""
    tp = mesh.axes.tp
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp.size)]
    for name in sorted(local):
        tensor = local[name].contiguous()
        if tp.size == 1:
            per_rank[0][name] = tensor
            continue
        shapes = [local_shape(manifest, name, r) if name in manifest.entries else tuple(tensor.shape)
                  for r in range(tp.size)]
        width = max(math.prod(shape) for shape in shapes)
        flat = torch.zeros(width, dtype=tensor.dtype, device=tensor.device)
        flat[:tensor.numel()] = tensor.flatten()
        parts = [torch.empty_like(flat) for _ in range(tp.size)]
        dist.all_gather(parts, flat, group=tp.group)
        for r, (part, shape) in enumerate(zip(parts, shapes)):
            per_rank[r][name] = part[:math.prod(shape)].view(shape)  # (this rank's local shape)
    return assemble(manifest, per_rank)


# -- writing -----------------------------------------------------------------------------------------
def load_local_state(engine: Any, local: RankTensors, common: dict[str, Any], *,
                     load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True) -> None:
    """Write this rank's resharded tensors into the engine: weights, fp32 masters, moments, buffers,
    step counters and scheduler. Collective over dp under ZeRO (``load_state_dict``)."""
    stage = zero_stage(engine)
    if load_optimizer_states and stage > 0:
        _load_zero_optimizer(engine, local, common)
    elif load_optimizer_states:
        _load_torch_optimizer(engine, local, common)
    elif stage > 0:
        _set_fp32_masters(engine, local.fp32)
    _set_module(engine, local)
    engine.global_steps = common["global_steps"]
    engine.global_samples = common.get("global_samples") or engine.global_steps * engine.train_batch_size()
    engine.skipped_steps = common["skipped_steps"]
    if load_lr_scheduler_states and engine.lr_scheduler is not None and common.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])


@torch.no_grad()
def _set_module(engine: Any, local: RankTensors) -> None:
    """The module's own tensors (bit16 or fp32 copies of the masters; ZeRO-3 through a gather)."""
    module = engine.module
    params = [(n, p) for n, p in module.named_parameters()]
    if zero_stage(engine) == 3:  # partitioned parameters: gather, write on every rank, re-partition
        import deepspeed

        for name, p in params:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.copy_(local.fp32[name].to(p.dtype))
    else:
        for name, p in params:
            p.copy_(local.fp32[name].to(p.dtype))
    for name, value in local.buffers.items():
        module.get_buffer(name).copy_(value)


def _hyper(groups: list[dict], saved: list[dict]) -> None:
    """Optimizer hyper-parameters (lr, betas, ...) of the checkpoint into ``groups``."""
    if saved and len(saved) != len(groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this one {len(groups)}; "
                         f"build the optimizer with the same groups")
    for group, old in zip(groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})


def _state_entry(step: torch.Tensor | None, moments: dict[str, torch.Tensor]) -> dict[str, Any]:
    entry: dict[str, Any] = dict(moments)
    if step is not None:
        entry["step"] = step.clone()
    return entry


def _load_torch_optimizer(engine: Any, local: RankTensors, common: dict) -> None:
    """Stage 0: the torch optimizer's state by parameter index (torch's own ``load_state_dict``)."""
    opt = engine.optimizer
    names = [n for group in optimizer_param_order(engine) for n in group]
    sd = opt.state_dict()
    sd["state"] = {i: _state_entry(local.step, {k: local.moments[k][n] for k in local.moments if n in local.moments[k]})
                   for i, n in enumerate(names)}
    _hyper(sd["param_groups"], common.get("param_groups", []))
    opt.load_state_dict(sd)


def _optimized(engine: Any) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _scatter(engine: Any, values: dict[str, torch.Tensor], flats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Write every parameter's whole value into this rank's fp32 partitions (DeepSpeed places the
    fragments) and return copies of the partitions: the flat layout of ``values``."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in _optimized(engine):
        safe_set_full_fp32_param(p, values[name].to(torch.float32))
    return [f.detach().clone() for f in flats]


def _set_fp32_masters(engine: Any, fp32: dict[str, torch.Tensor]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in _optimized(engine):
        safe_set_full_fp32_param(p, fp32[name].to(torch.float32))


def _load_zero_optimizer(engine: Any, local: RankTensors, common: dict) -> None:
    """ZeRO-1/2/3: this rank's partitions of the moments and masters, through the optimizer's own
    ``load_state_dict`` (a state dict in the format its ``state_dict()`` returns)."""
    opt, stage = engine.optimizer, zero_stage(engine)
    sd = opt.state_dict()
    if stage == 3:
        flats, base = list(sd["fp32_flat_groups"]), sd["optimizer_state_dict"]
    else:  # the torch optimizer's parameters are the padded fp32 partitions, one per group
        flats, base = [g["params"][0] for g in opt.optimizer.param_groups], opt.optimizer.state_dict()
    moments = {k: _scatter(engine, v, flats) for k, v in local.moments.items()}
    masters = _scatter(engine, local.fp32, flats)
    base["state"] = {g: _state_entry(local.step, {k: moments[k][g] for k in moments}) for g in range(len(flats))}
    _hyper(base["param_groups"], common.get("param_groups", []))
    if stage == 3:
        sd["optimizer_state_dict"], sd["fp32_flat_groups"] = base, masters
    else:
        sd["base_optimizer_state"], sd["single_partition_of_fp32_groups"] = base, masters
    dp, dp_rank = dist.get_world_size(opt.dp_process_group), dist.get_rank(opt.dp_process_group)
    per_dp = [sd if d == dp_rank else None for d in range(dp)]
    if stage == 3:
        opt.load_state_dict(per_dp, load_optimizer_states=True)
    else:
        opt.load_state_dict(per_dp, load_optimizer_states=True, load_from_fp32_weights=True)
