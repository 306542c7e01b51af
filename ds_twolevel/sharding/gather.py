"""Gather the shards of partitioned layers back into dense weights (the inverse of slicing)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ds_twolevel.sharding.partition import unshard_dim


def gather_dense_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Dense weights of a TwoLevelAttention / TwoLevelMLP, assembled on every rank of its layer.

    Collective over the layer's tp axis (all ranks of the layer must call it). Replicated
    parameters (output bias, down bias) are returned as held. Names are those of
    ``layer.shard_index()``, plus ``o_bias`` / ``down_proj.bias``.

    Example:
        >>> dense = gather_dense_state(attn)   # {"q_proj.weight": (h*d, H), ...}
    """
    if callable(getattr(layer, "gather_dense", None)):  # vocab shards: uneven row counts, padded gather
        return layer.gather_dense()
    tp = layer.tp if hasattr(layer, "tp") else layer.axes.tp
    out: dict[str, torch.Tensor] = {}
    indices = [layer.shard_index(r) for r in range(tp.size)]
    for name, (_, dim) in layer.shard_index().items():
        local = layer.get_parameter(name).detach().contiguous()
        if tp.size == 1:
            shards = [local]
        else:
            shards = [torch.empty_like(local) for _ in range(tp.size)]
            dist.all_gather(shards, local, group=tp.group)
        size = int(max(int(idx[name][0].max()) for idx in indices)) + 1
        out[name] = unshard_dim([(indices[r][name][0], shards[r]) for r in range(tp.size)], size, dim)
    replicated = {"o_bias": "o_bias", "down_proj.bias": "down_bias", **getattr(layer, "replicated_tensors", dict)()}
    for name, attr in replicated.items():  # e.g. the experts' down_proj_bias
        if getattr(layer, attr, None) is not None:
            out[name] = getattr(layer, attr).detach().clone()
    return out
