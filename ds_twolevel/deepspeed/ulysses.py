"""Ulysses with two-level through ``ds_twolevel.initialize``: the model's heads checked against sp before any collective.

DeepSpeed's ``"sequence_parallel_size"`` = sp puts Ulysses outside the n*m ranks of a layer (a dp x sp x n x m
layout, ``ds_twolevel.parallel.layout.UlyssesMesh``); :func:`~ds_twolevel.deepspeed.config.check_deepspeed_config`
checks the config against the world size, :func:`check_model` the model's heads against sp, both on every rank
before the rendezvous.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ds_twolevel.deepspeed.config import TwoLevelConfig, sequence_parallel_size
from ds_twolevel.parallel.ulysses import check_ulysses


def check_model(model: nn.Module, tl: TwoLevelConfig, ds: Mapping[str, Any]) -> None:
    """ValueError when a Hugging Face ``model``'s heads cannot run Ulysses at the config's sp over n head
    groups ((h/n) % sp, Ulysses' KV rule, one head size); nothing to check at sp = 1 or for a model that
    is not a known Hugging Face architecture (its layers check themselves when built).

    Example:
        >>> check_model(model, tl, ds)   # before ds_twolevel.initialize builds the mesh
    """
    sp = sequence_parallel_size(ds)
    config = getattr(model, "config", None)
    if sp == 1 or config is None or not hasattr(config, "model_type"):
        return
    from hf_integration.policy import attention_spec, model_name
    from hf_integration.specs import SPECS

    if config.model_type not in SPECS:
        return
    spec = attention_spec(model, SPECS[config.model_type])
    check_ulysses(model_name(model), heads=spec.num_heads, kv_heads=spec.num_kv_heads, n=tl.n, sp=sp,
                  head_dim=spec.head_dim, v_head_dim=spec.dv, kv_replication=tl.kv_replication)
