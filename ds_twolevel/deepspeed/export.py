"""The trained model's dense weights: as a state dict on every rank, or written as a standard
Hugging Face checkpoint (``from_pretrained``-able).

Example:
    >>> ds_twolevel.export_dense(engine, "out/dense")   # AutoModelForCausalLM.from_pretrained("out/dense")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ds_twolevel.deepspeed.zero import gathered


def _patched(engine_or_model: Any) -> Any:
    """The partitioned model of an engine (or the model itself); ValueError if it was never patched."""
    module = getattr(engine_or_model, "module", engine_or_model)
    if not callable(getattr(module, "two_level_dense_state_dict", None)):
        raise ValueError(f"{type(module).__name__} is not a two-level model (hf_integration.patch_model, "
                         "load_partitioned or ds_twolevel.initialize patch one); nothing to gather")
    return module


def dense_state_dict(engine_or_model: Any) -> dict[str, torch.Tensor]:
    """The trained model's dense weights (names of the unpatched model), on every rank.

    Collective over the whole world (ZeRO-3 gathers over dp, shards gather over tp through the
    model's ``two_level_dense_state_dict``, which ``hf_integration.patch_model`` installs).

    Example:
        >>> state = ds_twolevel.dense_state_dict(engine)   # every rank calls it
    """
    module = _patched(engine_or_model)
    with gathered(module):
        state = module.two_level_dense_state_dict()
        return {k: v.detach().clone() for k, v in state.items()}  # ZeRO-3 frees the gathered storage on exit


def export_dense(engine_or_model: Any, out_dir: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Write the trained model as a standard dense Hugging Face checkpoint (``from_pretrained``-able).

    Collective (every rank calls it): ZeRO-3 parameters are gathered over dp, shards over tp (the
    patched model's ``save_pretrained``: ``hf_integration.save_dense_pretrained``); rank 0 writes into
    a temporary directory and renames it, so a killed export never leaves half a checkpoint at ``out_dir``.

    Example:
        >>> ds_twolevel.export_dense(engine, "out/dense")   # AutoModelForCausalLM.from_pretrained("out/dense")
    """
    module = _patched(engine_or_model)
    with gathered(module):
        return Path(module.save_pretrained(out_dir, **save_pretrained_kwargs))
