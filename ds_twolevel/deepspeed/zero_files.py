"""Read a DeepSpeed checkpoint of a two-level model from disk: every tp rank's tensors, full over dp.

DeepSpeed writes one model-states file per tp rank (per dp x tp rank under ZeRO-3) and one
optimizer-states file per dp x tp rank. DeepSpeed's own ``zero_to_fp32`` assumes a single tp rank
(it counts every ``*_optim_states.pt`` as a dp rank: "Expected 2 ... but found 4"). This module
reads each tp rank's files separately, with the reconstruction protocol of DeepSpeed 0.19.8's
``deepspeed/utils/zero_to_fp32.py`` (flat fp32 partitions concatenated over dp, parameters in
``param_shapes`` order; ZeRO-1/2 parameter alignment paddings; ZeRO-3 per-parameter partitions of
ceil(numel / dp)), applied to the fp32 master weights *and* to the optimizer moments (elementwise,
so laid out exactly like the weights). No DeepSpeed engine or process group is needed; DeepSpeed
must be importable because the files pickle its classes.

File formats relied on (DeepSpeed 0.19.8; checked by ``tests/test_checkpoint_resharding.py``):
    model states: ``module``, ``buffer_names``, ``param_shapes``, ``shared_params``,
        ``frozen_param_shapes`` / ``frozen_param_fragments``, ``optimizer`` (stage 0 only),
        ``lr_scheduler``, ``global_steps``, ``global_samples``, ``skipped_steps``, client keys;
    ZeRO-1/2 optimizer states: ``optimizer_state_dict`` with ``single_partition_of_fp32_groups``
        (padding removed), ``base_optimizer_state`` (torch state dict, or per-group list when
        elastic), ``group_paddings``, ``param_alignment_paddings``;
    ZeRO-3 optimizer states: ``optimizer_state_dict`` with ``fp32_flat_groups`` and
        ``optimizer_state_dict`` (torch state dict over the flat sub-groups).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ds_twolevel.sharding.shard_manifest import ShardManifest

DEEPSPEED_STATE_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                        "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                        "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                        "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info")
"""Keys of a model-states file that DeepSpeed writes itself; the others are the client state."""


@dataclass
class RankTensors:
    """One tp rank's local tensors, each whole (gathered over the dp partitions)."""

    fp32: dict[str, torch.Tensor] = field(default_factory=dict)
    """master weights (stage 0: the module's own parameters)."""
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """optimizer state key (``exp_avg``, ...) -> local name -> tensor."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """persistent buffers (module state entries that are not parameters)."""
    step: torch.Tensor | None = None
    """the optimizer's step count (one value for every parameter)."""


@dataclass
class CheckpointTensors:
    """Everything a resume needs from a checkpoint, layout-independent except ``ranks``."""

    ranks: list[RankTensors]
    """per tp rank."""
    common: dict[str, Any]
    """global_steps, global_samples, skipped_steps, lr_scheduler, param_groups, client_state."""


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete (a rank did not save?)")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def model_file(tag_dir: Path, stage: int, tp_rank: int, dp_rank: int = 0) -> Path:
    """DeepSpeed's model-states file name of (dp_rank, tp_rank)."""
    if stage == 3:
        return tag_dir / f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt"
    return tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"


def optim_file(tag_dir: Path, tp_rank: int, dp_rank: int, prefix: str = "") -> Path:
    """DeepSpeed's ZeRO optimizer-states file name of (dp_rank, tp_rank); ``prefix`` is "bf16_" for
    a bf16 engine (DeepSpeed 0.19.8 ``_get_zero_ckpt_prefix``)."""
    return tag_dir / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


def _one_step(steps: list[Any], where: str) -> torch.Tensor | None:
    """The step count shared by every parameter (Adam keeps one per flat group / parameter)."""
    values = {float(s) for s in steps if s is not None}
    if len(values) > 1:
        raise ValueError(f"{where}: parameters were stepped different numbers of times ({sorted(values)}); a resharded "
                         f"resume would need one step count per parameter; resume at the saved layout")
    return None if not values else next(s for s in steps if s is not None).clone()


def _moment_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]


def _buffers(model_state: dict) -> dict[str, torch.Tensor]:
    names = model_state.get("buffer_names") or []
    module = model_state.get("module") or {}
    return {k: module[k].clone() for k in names if k in module}


# -- stage 0 ----------------------------------------------------------------------------------------
def read_stage0(tag_dir: Path, manifest: ShardManifest, tp_rank: int) -> RankTensors:
    """Stage 0: the module file holds the weights, its ``optimizer`` entry the torch optimizer state."""
    state = _load(model_file(tag_dir, 0, tp_rank))
    optim = state.get("optimizer") or {}
    if "state" not in optim or "param_groups" not in optim:
        raise ValueError(f"{tag_dir}: the stage-0 optimizer state is not a torch optimizer's (fp16/bf16 wrappers keep "
                         f"their own format); resume at the saved layout")
    order = [name for group in manifest.info.get("optimizer_params", []) for name in group]
    buffers = _buffers(state)
    out = RankTensors(fp32={k: v.clone() for k, v in state["module"].items() if k not in buffers}, buffers=buffers)
    steps = []
    for index, per_param in optim["state"].items():
        name = order[int(index)]
        steps.append(per_param.get("step"))
        for key in _moment_keys(per_param):
            out.moments.setdefault(key, {})[name] = per_param[key]
    out.step = _one_step(steps, str(tag_dir))
    return out


# -- ZeRO-1/2 ---------------------------------------------------------------------------------------
def _zero12_group_flats(osd: dict) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]], list[Any]]:
    """(fp32 partition per group, moments per key per group, steps) of one dp rank, padding removed."""
    fp32 = list(osd["single_partition_of_fp32_groups"])
    base = osd["base_optimizer_state"]
    groups = base if isinstance(base, list) else [base["state"].get(g, {}) for g in range(len(fp32))]
    moments: dict[str, list[torch.Tensor]] = {}
    steps = [osd.get("base_optimizer_state_step")] if isinstance(base, list) else []
    for g, state in enumerate(groups):
        steps.append(state.get("step"))
        for key in _moment_keys(state):
            moments.setdefault(key, []).append(state[key].narrow(0, 0, fp32[g].numel()))
    return fp32, moments, steps


def _split_flat(flat: torch.Tensor, shapes: dict[str, torch.Size], paddings: list[int] | None,
                where: str) -> dict[str, torch.Tensor]:
    """Parameters of one ZeRO-1/2 group out of its flat vector (DeepSpeed's reconstruction protocol)."""
    out, offset = {}, 0
    for k, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        if offset + n > flat.numel():
            raise ValueError(f"{where}: the flat fp32 group holds {flat.numel()} values but its parameters need more "
                             f"(at {name}); the file does not match its model-states file")
        out[name] = flat.narrow(0, offset, n).view(shape).clone()
        offset += n + (paddings[k] if paddings else 0)
    return out


def read_zero12(tag_dir: Path, manifest: ShardManifest, tp_rank: int) -> RankTensors:
    """ZeRO-1/2: concatenate each group's fp32 (and moment) partitions over dp, then split by parameter."""
    dp, prefix = manifest.zero_size, manifest.info.get("optim_prefix", "")
    model_state = _load(model_file(tag_dir, 1, tp_rank))
    osds = [_load(optim_file(tag_dir, tp_rank, d, prefix))["optimizer_state_dict"] for d in range(dp)]
    per_dp = [_zero12_group_flats(osd) for osd in osds]
    paddings = osds[0].get("param_alignment_paddings")
    out = RankTensors(buffers=_buffers(model_state))
    where = str(optim_file(tag_dir, tp_rank, 0, prefix))
    for g, shapes in enumerate(model_state["param_shapes"]):
        pad = paddings[g] if paddings else None
        out.fp32.update(_split_flat(torch.cat([r[0][g] for r in per_dp]), shapes, pad, where))
        for key in per_dp[0][1]:
            flat = torch.cat([r[1][key][g] for r in per_dp])
            out.moments.setdefault(key, {}).update(_split_flat(flat, shapes, pad, where))
    out.step = _one_step([s for r in per_dp for s in r[2]], where)
    _add_frozen(out, model_state, [model_state])
    return out


# -- ZeRO-3 -----------------------------------------------------------------------------------------
def _zero3_flats(osd: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Any]]:
    """(fp32, moments per key, steps) of one dp rank, its sub-groups concatenated."""
    groups = list(osd["fp32_flat_groups"])
    state = osd["optimizer_state_dict"]["state"]
    keys = _moment_keys(state.get(0, {})) if state else []
    moments = {k: torch.cat([state[g][k] for g in range(len(groups))]) for k in keys}
    return torch.cat(groups), moments, [state[g].get("step") for g in state]


def _split_zero3(flats: list[torch.Tensor], shapes: dict[str, torch.Size], where: str) -> dict[str, torch.Tensor]:
    """Each parameter is split over dp in ceil(numel / dp) pieces at the same offset on every rank."""
    dp, out, offset = len(flats), {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        part = math.ceil(n / dp)
        out[name] = torch.cat([f.narrow(0, offset, part) for f in flats])[:n].view(shape).clone()
        offset += part
    if offset != flats[0].numel():
        raise ValueError(f"{where}: consumed {offset} of {flats[0].numel()} values of the flat fp32 partition; "
                         f"the file does not match its model-states file")
    return out


def read_zero3(tag_dir: Path, manifest: ShardManifest, tp_rank: int) -> RankTensors:
    """ZeRO-3: every parameter is partitioned over dp separately (padding at its end)."""
    dp, prefix = manifest.zero_size, manifest.info.get("optim_prefix", "")
    model_states = [_load(model_file(tag_dir, 3, tp_rank, d)) for d in range(dp)]
    per_dp = [_zero3_flats(_load(optim_file(tag_dir, tp_rank, d, prefix))["optimizer_state_dict"]) for d in range(dp)]
    shapes = {k: v for group in model_states[0]["param_shapes"] for k, v in group.items()}
    where = str(optim_file(tag_dir, tp_rank, 0, prefix))
    out = RankTensors(fp32=_split_zero3([r[0] for r in per_dp], shapes, where), buffers=_buffers(model_states[0]))
    for key in per_dp[0][1]:
        out.moments[key] = _split_zero3([r[1][key] for r in per_dp], shapes, where)
    out.step = _one_step([s for r in per_dp for s in r[2]], where)
    _add_frozen(out, model_states[0], model_states)
    return out


def _add_frozen(out: RankTensors, model_state: dict, per_dp: list[dict]) -> None:
    """Frozen (not optimized) parameters: whole in the file (ZeRO-1/2) or partitioned over dp (ZeRO-3)."""
    for name, shape in (model_state.get("frozen_param_shapes") or {}).items():
        parts = [s["frozen_param_fragments"][name] for s in per_dp]
        out.fp32[name] = torch.cat([p.flatten() for p in parts])[:math.prod(shape)].view(shape).float()


def _add_shared(out: RankTensors, shared: dict[str, str]) -> None:
    """Tied parameters (``shared_params``: alias -> the name DeepSpeed stored) under both names."""
    for alias, source in shared.items():
        if source in out.fp32:
            out.fp32[alias] = out.fp32[source]
            for moments in out.moments.values():
                if source in moments:
                    moments[alias] = moments[source]


# -- everything -------------------------------------------------------------------------------------
READERS = {0: read_stage0, 1: read_zero12, 2: read_zero12, 3: read_zero3}


def common_state(tag_dir: Path, manifest: ShardManifest) -> dict[str, Any]:
    """What is not a tensor of the model: steps, scheduler, optimizer hyper-parameters, client state."""
    stage, prefix = int(manifest.info["zero_stage"]), manifest.info.get("optim_prefix", "")
    state = _load(model_file(tag_dir, stage, 0))
    if stage == 0:
        groups = (state.get("optimizer") or {}).get("param_groups", [])
    elif stage == 3:
        groups = _load(optim_file(tag_dir, 0, 0, prefix))["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    else:
        base = _load(optim_file(tag_dir, 0, 0, prefix))["optimizer_state_dict"]["base_optimizer_state"]
        groups = base.get("param_groups", []) if isinstance(base, dict) else []
    return {"global_steps": state["global_steps"], "global_samples": state.get("global_samples"),
            "skipped_steps": state["skipped_steps"], "lr_scheduler": state.get("lr_scheduler"),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
            "client_state": {k: v for k, v in state.items() if k not in DEEPSPEED_STATE_KEYS}}


def read_checkpoint(tag_dir: str | Path, manifest: ShardManifest) -> CheckpointTensors:
    """Every tp rank's tensors and the common state of the checkpoint in ``tag_dir``.

    Example:
        >>> ckpt = read_checkpoint("ckpt/global_step10", ShardManifest.read("ckpt/global_step10"))
        >>> ckpt.ranks[0].fp32["model.layers.0.self_attn.q_proj.weight"].shape
    """
    tag_dir = Path(tag_dir)
    stage = int(manifest.info.get("zero_stage", -1))
    if stage not in READERS:
        raise ValueError(f"{tag_dir}: ZeRO stage {stage} is not one ds_twolevel can read (0, 1, 2, 3)")
    ranks = [READERS[stage](tag_dir, manifest, r) for r in range(manifest.tp_size)]
    # DeepSpeed records the tied names on global rank 0 only; every tp rank's module ties the same names
    shared = _load(model_file(tag_dir, stage, 0)).get("shared_params") or {} if stage > 0 else {}
    for rank in ranks:
        _add_shared(rank, shared)
    return CheckpointTensors(ranks, common_state(tag_dir, manifest))
