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
from ds_twolevel.parallel.sequence import gather_sequence, gather_tokens_no_grad, scatter_sequence
from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.sharding.partition import even_chunk

from hf_integration.specs import MoELayout, get_path
from hf_integration.weights import StateDictReader, TensorMap, check_tensor_shapes, dense_numel, moe_tensor_maps, unplaced_parameters

EXPECTED_FLAGS = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                  "has_post_expert_norm": False}
"""Layout flags of transformers' experts modules for the default MoELayout (Mixtral's); :func:`expected_flags`
gives a layout's own."""


def expected_flags(lay: MoELayout) -> dict[str, bool]:
    """The transformers experts flags the layout ``lay`` describes (transposed, packing, biases)."""
    return dict(EXPECTED_FLAGS, is_transposed=lay.transposed, is_concatenated=lay.packing == "concat",
                has_bias=lay.bias)


def experts_plan(owner: nn.Module, config: Any, lay: MoELayout, *, where: str) -> dict[str, Any]:
    """Validated constructor options of the partitioned experts of one MoE block (nothing touched)."""
    experts = get_path(owner, lay.target)
    for flag, want in expected_flags(lay).items():
        if getattr(experts, flag, want) != want:
            raise ValueError(f"{where}.{lay.target} ({type(experts).__name__}): {flag}={getattr(experts, flag)!r}, "
                             f"the MoELayout says {flag}={want!r} (MoELayout.transposed / packing / bias)")
    num = int(getattr(config, lay.num_experts_attr))
    inter = int(getattr(config, lay.intermediate_attr))
    maps = moe_tensor_maps(lay, config.hidden_size, inter, num)
    check_tensor_shapes(maps, StateDictReader(dict(owner.state_dict(keep_vars=True))), where=where)
    left = unplaced_parameters(owner, maps, lay.target, lay.identity)
    if left:
        raise ValueError(f"{where} ({type(owner).__name__}): parameters {', '.join(left)} are not described by the "
                         f"MoELayout, so a partitioned layer would drop them; fix the spec")
    return dict(intermediate_size=inter, num_experts=num, experts=experts, tensor_maps=maps,
                owner_class=type(owner).__name__, target=lay.target, act_fn=None if lay.act is None else get_path(owner, lay.act), layout=lay)


class HFTwoLevelExperts(nn.Module):
    """This rank's I/p slice of every expert; called like the HF experts module it replaces.

    Example:
        >>> out = experts(hidden_states, top_k_index, top_k_weights)   # (tokens, H), replicated
    """

    def __init__(self, hidden_size: int, *, tp: AxisGroup, intermediate_size: int, num_experts: int,
                 experts: nn.Module, tensor_maps: dict[str, TensorMap], owner_class: str, target: str,
                 act_fn: Any, layout: MoELayout = MoELayout(owner=""), reduce_dtype: Any = torch.float32,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.reduce_dtype = check_reduce_dtype(reduce_dtype)  # the output (and input-gradient) all-reduce
        tp = replace(tp, reduce_dtype=self.reduce_dtype)
        start, stop = even_chunk(intermediate_size, tp.size, tp.rank, what="intermediate_size")
        self.tp, self.hidden_size, self.intermediate_size = tp, hidden_size, intermediate_size
        self.hidden_dim, self.intermediate_dim, self.num_experts = hidden_size, stop - start, num_experts
        self.tensor_maps, self.owner_class, self.target, self.act_fn = tensor_maps, owner_class, target, act_fn
        kw = {"device": device, "dtype": dtype}
        self.layout, local = layout, stop - start
        for name, tmap in tensor_maps.items():  # this rank's slice of each (dense-shaped) expert tensor
            shape = list(tmap.hf_shape)
            if tmap.core_dim is not None:
                shape[tmap.core_dim] = shape[tmap.core_dim] // intermediate_size * local
            setattr(self, name, nn.Parameter(torch.empty(*shape, **kw)))
            tag_parallel(getattr(self, name), sharded=tmap.core_dim is not None, partition_dim=tmap.core_dim)
        # what the HF experts functions read from ``self`` (transformers.integrations.moe), and the
        # scalars its gate reads (GPT-OSS: alpha, limit)
        self.config = experts.config
        for name, value in vars(experts).items():
            if isinstance(value, (bool, int, float)) and not name.startswith("_") and not hasattr(self, name):
                setattr(self, name, value)
        for flag, value in expected_flags(layout).items():
            setattr(self, flag, value)
        compat.hf_experts_not_expert_parallel(self)
        # act(gate) * up of the [gate | up] halves; forward dispatches on config._experts_implementation
        self._hf_gate, self._hf_forward = compat.hf_experts_functions(experts)

    def shard_index(self, tp_rank: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
        """Dense tensor name -> (index, dim) of this rank's slice: [gate f | up I + f] rows, f columns."""
        rank = self.tp.rank if tp_rank is None else tp_rank
        feats = torch.arange(*even_chunk(self.intermediate_size, self.tp.size, rank))
        if self.layout.packing == "interleaved":  # [g0 u0 g1 u1 ...]: each feature's gate/up pair stays together
            gate_up = torch.stack([2 * feats, 2 * feats + 1], dim=-1).flatten()
        else:  # [gate: I | up: I]
            gate_up = torch.cat([feats, feats + self.intermediate_size])
        maps = self.tensor_maps
        out = {"gate_up_proj": (gate_up, maps["gate_up_proj"].core_dim), "down_proj": (feats, maps["down_proj"].core_dim)}
        if "gate_up_proj_bias" in maps:
            out["gate_up_proj_bias"] = (gate_up, 1)
        return out

    def replicated_tensors(self) -> dict[str, str]:
        """Core name -> attribute of tensors every rank holds whole (the down bias, if any)."""
        return {"down_proj_bias": "down_proj_bias"} if "down_proj_bias" in self.tensor_maps else {}

    def dense_numel(self) -> int:
        """Parameters of the dense experts this partition came from."""
        return dense_numel(self.tensor_maps)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        """The HF experts' gating on this rank's [gate f | up f] columns."""
        return self._hf_gate(self, gate_up_out)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """(tokens, H) replicated, routing replicated -> (tokens, H) replicated. With
        ``sequence_parallel``: this rank's tokens and their routing -> this rank's tokens (the experts
        act per token, so the gathered tokens are in rank order, not sequence order)."""
        if getattr(self, "sequence_parallel", False) and self.tp.size > 1:
            x = gather_sequence(hidden_states, self.tp, "moe_in", dim=0)  # (tokens of every rank, H)
            index = gather_tokens_no_grad(top_k_index, self.tp, "moe_index", dim=0)
            weights = gather_sequence(top_k_weights, self.tp, "moe_weights", dim=0)  # backward: each rank's rows
            partial = self._hf_forward(self, x, index, weights)
            return scatter_sequence(partial, self.tp, "moe_out", dim=0)  # (this rank's tokens, H)
        x = copy_to_axis(hidden_states, self.tp, "moe_in")
        weights = copy_to_axis(top_k_weights, self.tp, "moe_weights")  # router gradient: sum over ranks
        experts: Any = self
        if "down_proj_bias" in self.tensor_maps:  # added once over the ranks: rank 0's copy, the others' zeroed
            bias = copy_to_axis(self.down_proj_bias, self.tp, "moe_down_bias")  # gradient: summed over ranks
            experts = _WithDownBias(self, bias if self.tp.rank == 0 else bias * 0)  # in the graph on every rank
        partial = self._hf_forward(experts, x, top_k_index, weights)  # (tokens, H): this rank's features only
        return reduce_from_axis(partial, self.tp, "moe_out")


class _WithDownBias:
    """The experts module as HF's experts functions read it, with ``down_proj_bias`` replaced (rank 0: the
    bias, other ranks: zeros, so the all-reduce adds it once)."""

    def __init__(self, experts: HFTwoLevelExperts, down_proj_bias: torch.Tensor) -> None:
        self._experts, self.down_proj_bias = experts, down_proj_bias

    def __getattr__(self, name: str) -> Any:
        return getattr(self._experts, name)
