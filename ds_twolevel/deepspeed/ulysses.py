"""Ulysses with two-level through ``ds_twolevel.initialize``: the model's heads checked against sp before any collective.

DeepSpeed's ``"sequence_parallel_size"`` = sp puts Ulysses outside the n*m ranks of a layer (a dp x sp x n x m
layout, ``ds_twolevel.parallel.layout.UlyssesMesh``); :func:`~ds_twolevel.deepspeed.config.check_deepspeed_config`
checks the config against the world size, :func:`check_model` the model's heads against sp, both on every rank
before the rendezvous. Checkpoints of such a layout save, resume and reshard like any other
(:mod:`ds_twolevel.deepspeed.checkpoint`): ZeRO partitions the state over dp x sp ranks.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ds_twolevel.deepspeed.config import TwoLevelConfig, sequence_parallel_size
from ds_twolevel.parallel.ulysses import check_ulysses


def check_model(model: nn.Module, tl: TwoLevelConfig, ds: Mapping[str, Any]) -> None:
    """ValueError when a Hugging Face ``model``'s heads cannot run Ulysses at the config's sp over n head
    groups ((h/n) % sp, Ulysses' KV rule); nothing to check at sp = 1 or for a model without
    ``config.num_attention_heads`` (its layers check themselves when built).

    Example:
        >>> check_model(model, tl, ds)   # before ds_twolevel.initialize builds the mesh
    """
    sp = sequence_parallel_size(ds)
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if sp == 1 or not isinstance(heads, int):
        return
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    name = f"{type(model).__name__} ({getattr(config, 'model_type', '?')})"
    # the head counts of the config; the layers check the head sizes (and any architecture's own names) when built
    check_ulysses(name, heads=heads, kv_heads=kv_heads, n=tl.n, sp=sp, head_dim=1, v_head_dim=1,
                  kv_replication=tl.kv_replication)
