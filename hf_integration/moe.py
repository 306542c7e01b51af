"""Mixture-of-experts blocks on the two-level layout: every expert's MLP split over the n*m ranks.

transformers 5.x stores the experts of a sparse MoE block fused (``MixtralExperts``)::

    gate_up_proj  (E, 2I, H)   rows [gate: I | up: I] of every expert
    down_proj     (E, H, I)

Rank r of the layer's p = n*m ranks holds features f = [r*I/p, (r+1)*I/p) of every expert:
``gate_up_proj[:, [f | I + f], :]`` and ``down_proj[:, :, f]``. The router stays replicated: every
rank routes the same (replicated) tokens to the same experts, runs its slice of each chosen
expert with the HF experts function itself (eager, grouped_mm, ... as ``config._experts_implementation``
says), and the partial outputs are summed by one all-reduce over the tensor-parallel axis.
Backward: the input and the routing weights get an all-reduce each (the router's gradient is
the dense one on every rank).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ds_twolevel.deepspeed import compat
from ds_twolevel.layers.attention import tag_parallel
from ds_twolevel.parallel.collectives import copy_to_axis, reduce_dtype as check_reduce_dtype, reduce_from_axis
from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.sharding.partition import even_chunk

from hf_integration.specs import MoELayout, get_path
from hf_integration.weights import StateDictReader, TensorMap, check_tensor_shapes, dense_numel, moe_tensor_maps, unplaced_parameters

EXPECTED_FLAGS = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                  "has_post_expert_norm": False}
"""Layout flags of transformers' experts modules this integration partitions (Mixtral's)."""


def experts_plan(owner: nn.Module, config: Any, lay: MoELayout, *, where: str) -> dict[str, Any]:
    """Validated constructor options of the partitioned experts of one MoE block (nothing touched)."""
    experts = get_path(owner, lay.target)
    for flag, want in EXPECTED_FLAGS.items():
        if getattr(experts, flag, want) != want:
            raise ValueError(f"{where}.{lay.target} ({type(experts).__name__}): {flag}={getattr(experts, flag)!r}, "
                             f"the MoELayout partitions {flag}={want!r} only (Mixtral's fused layout)")
    num = int(getattr(config, lay.num_experts_attr))
    inter = int(getattr(config, lay.intermediate_attr))
    maps = moe_tensor_maps(lay, config.hidden_size, inter, num)
    check_tensor_shapes(maps, StateDictReader(dict(owner.state_dict(keep_vars=True))), where=where)
    left = unplaced_parameters(owner, maps, lay.target, lay.identity)
    if left:
        raise ValueError(f"{where} ({type(owner).__name__}): parameters {', '.join(left)} are not described by the "
                         f"MoELayout, so a partitioned layer would drop them; fix the spec")
    return dict(intermediate_size=inter, num_experts=num, experts=experts, tensor_maps=maps,
                owner_class=type(owner).__name__, target=lay.target, act_fn=get_path(owner, lay.act))


class HFTwoLevelExperts(nn.Module):
    """This rank's I/p slice of every expert; called like the HF experts module it replaces.

    Example:
        >>> out = experts(hidden_states, top_k_index, top_k_weights)   # (tokens, H), replicated
    """

    def __init__(self, hidden_size: int, *, tp: AxisGroup, intermediate_size: int, num_experts: int,
                 experts: nn.Module, tensor_maps: dict[str, TensorMap], owner_class: str, target: str,
                 act_fn: Any, reduce_dtype: Any = torch.float32, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.reduce_dtype = check_reduce_dtype(reduce_dtype)  # the output (and input-gradient) all-reduce
        tp = replace(tp, reduce_dtype=self.reduce_dtype)
        start, stop = even_chunk(intermediate_size, tp.size, tp.rank, what="intermediate_size")
        self.tp, self.hidden_size, self.intermediate_size = tp, hidden_size, intermediate_size
        self.hidden_dim, self.intermediate_dim, self.num_experts = hidden_size, stop - start, num_experts
        self.tensor_maps, self.owner_class, self.target, self.act_fn = tensor_maps, owner_class, target, act_fn
        kw = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * (stop - start), hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, stop - start, **kw))
        tag_parallel(self.gate_up_proj, sharded=True, partition_dim=1)
        tag_parallel(self.down_proj, sharded=True, partition_dim=2)
        # what the HF experts functions read from ``self`` (transformers.integrations.moe)
        self.config = experts.config
        for flag, value in EXPECTED_FLAGS.items():
            setattr(self, flag, value)
        compat.hf_experts_not_expert_parallel(self)
        # act(gate) * up of the [gate | up] halves; forward dispatches on config._experts_implementation
        self._hf_gate, self._hf_forward = compat.hf_experts_functions(experts)

    def shard_index(self, tp_rank: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
        """Dense tensor name -> (index, dim) of this rank's slice: [gate f | up I + f] rows, f columns."""
        rank = self.tp.rank if tp_rank is None else tp_rank
        feats = torch.arange(*even_chunk(self.intermediate_size, self.tp.size, rank))
        return {"gate_up_proj": (torch.cat([feats, feats + self.intermediate_size]), 1), "down_proj": (feats, 2)}

    def replicated_tensors(self) -> dict[str, str]:
        """Core name -> attribute of tensors every rank holds whole (none)."""
        return {}

    def dense_numel(self) -> int:
        """Parameters of the dense experts this partition came from."""
        return dense_numel(self.tensor_maps)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        """The HF experts' gating on this rank's [gate f | up f] columns."""
        return self._hf_gate(self, gate_up_out)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """(tokens, H) replicated, routing replicated -> (tokens, H) replicated."""
        x = copy_to_axis(hidden_states, self.tp, "moe_in")
        weights = copy_to_axis(top_k_weights, self.tp, "moe_weights")  # router gradient: sum over ranks
        partial = self._hf_forward(self, x, top_k_index, weights)  # (tokens, H): this rank's features only
        return reduce_from_axis(partial, self.tp, "moe_out")
