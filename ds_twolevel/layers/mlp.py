"""Column/row-parallel MLP over the n*m ranks of a layer (Megatron style)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from ds_twolevel.layers.attention import tag_parallel
from ds_twolevel.parallel.collectives import copy_to_axis, reduce_dtype as check_reduce_dtype, reduce_from_axis
from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.parallel.sequence import gather_sequence, scatter_sequence
from ds_twolevel.sharding.partition import even_chunk, shard_dim
from ds_twolevel.layers.activations import ACTIVATIONS, GatedDownProj


class TwoLevelMLP(nn.Module):
    """Rank tp_rank holds intermediate features [tp_rank*I/p, (tp_rank+1)*I/p), p = n*m.

    gate/up are column-parallel, down is row-parallel followed by one all-reduce over the tp
    axis; the down bias is replicated and added after it.

    Example:
        >>> mlp = TwoLevelMLP.from_dense(dense_mlp, mesh.axes.tp)
    """

    def __init__(self, hidden_size: int, intermediate_size: int, tp: AxisGroup, *, gated: bool = True,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = "silu", bias: bool = False,
                 reduce_dtype: Any = torch.float32, sequence_parallel: bool = False, device=None,
                 dtype=None) -> None:
        """``activation``: a name in ``ACTIVATIONS`` or the callable itself (e.g. a Hugging Face
        module's own ``act_fn``, so its exact GELU/SiLU variant is used). ``reduce_dtype``: dtype of
        the output (and input-gradient) all-reduce when wider than the activations' (see
        :class:`~ds_twolevel.layers.attention.TwoLevelAttention`; "input"/None: the activations').
        ``sequence_parallel``: input and output are this rank's s/p tokens (b, s/p, H): all-gathered
        before gate/up, reduce-scattered after down (:mod:`ds_twolevel.parallel.sequence`)."""
        super().__init__()
        self.sequence_parallel = sequence_parallel
        if isinstance(activation, str) and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
        self.act_fn = ACTIVATIONS[activation] if isinstance(activation, str) else activation
        self.reduce_dtype = check_reduce_dtype(reduce_dtype)
        tp = replace(tp, reduce_dtype=self.reduce_dtype)
        start, stop = even_chunk(intermediate_size, tp.size, tp.rank, what="intermediate_size")
        self.features = torch.arange(start, stop)
        self.tp, self.gated, self.activation = tp, gated, activation
        self.hidden_size, self.intermediate_size, self.bias = hidden_size, intermediate_size, bias
        local, kw = stop - start, {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, local, bias=bias, **kw) if gated else None
        self.up_proj = nn.Linear(hidden_size, local, bias=bias, **kw)
        self.down_proj = GatedDownProj(local, hidden_size, bias=False, **kw)
        self.down_bias = nn.Parameter(torch.zeros(hidden_size, **kw)) if bias else None
        for proj in (self.gate_proj, self.up_proj):
            for p in proj.parameters() if proj is not None else ():
                tag_parallel(p, sharded=True, partition_dim=0)
        tag_parallel(self.down_proj.weight, sharded=True, partition_dim=1)
        if self.down_bias is not None:
            tag_parallel(self.down_bias, sharded=False, partition_dim=None)

    def shard_index(self, tp_rank: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
        """Dense parameter name -> (index, dim) of the slice held by ``tp_rank`` (default: this rank)."""
        features = self.features
        if tp_rank is not None:
            features = torch.arange(*even_chunk(self.intermediate_size, self.tp.size, tp_rank))
        names = ["up_proj.weight", "up_proj.bias", "down_proj.weight"]
        if self.gated:
            names += ["gate_proj.weight", "gate_proj.bias"]
        out = {n: (features, 1 if n.startswith("down") else 0) for n in names}
        return {k: v for k, v in out.items() if not k.endswith("bias") or self.down_bias is not None}

    @torch.no_grad()
    def load_dense_state(self, dense: dict[str, torch.Tensor]) -> None:
        """Copy this rank's slices out of dense weights (``down_proj.bias`` replicated)."""
        for name, (index, dim) in self.shard_index().items():
            self.get_parameter(name).copy_(shard_dim(dense[name], index, dim))
        if self.down_bias is not None:
            self.down_bias.copy_(dense["down_proj.bias"])

    @classmethod
    def from_dense(cls, dense: Any, tp: AxisGroup) -> "TwoLevelMLP":
        """Partition a :class:`~ds_twolevel.testing.reference.DenseMLP` (or any module with gate/up/down)."""
        w = dense.up_proj.weight
        mlp = cls(dense.hidden_size, dense.intermediate_size, tp, gated=dense.gated,
                  activation=dense.activation, bias=dense.bias, device=w.device, dtype=w.dtype)
        mlp.load_dense_state({k: v.detach() for k, v in dense.state_dict().items()})
        return mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, H) replicated -> (b, s, H) replicated; with ``sequence_parallel`` (b, s/p, H) -> (b, s/p, H)."""
        act, sp = self.act_fn, self.sequence_parallel and self.tp.size > 1
        x = gather_sequence(x, self.tp, "mlp_in") if sp else copy_to_axis(x, self.tp, "mlp_in")  # (b, s, H)
        if self.gated:  # keeps gate and up (b, s, I/p) for backward, not act(gate) and the product
            partial = self.down_proj(self.gate_proj(x), self.up_proj(x), act)  # (b, s, H) this rank's share of the sum
        else:
            partial = self.down_proj(act(self.up_proj(x)))  # (b, s, H)
        if not sp:
            y = reduce_from_axis(partial, self.tp, "mlp_out")  # (b, s, H)
            return y if self.down_bias is None else y + self.down_bias
        y = scatter_sequence(partial, self.tp, "mlp_out")  # (b, s/p, H)
        # the bias meets this rank's tokens only: its gradient is summed over the layer's ranks
        return y if self.down_bias is None else y + copy_to_axis(self.down_bias, self.tp, "replicated_grad")
