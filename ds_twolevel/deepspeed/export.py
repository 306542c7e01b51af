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


def dense_state_dict(engine_or_model: Any) -> dict[str, torch.Tensor]:
    """The trained model's dense weights (names of the unpatched model), on every rank.

    Collective over the whole world (ZeRO-3 gathers over dp, shards gather over tp through
    ``hf_integration.dense_state_dict``).

    Example:
        >>> state = ds_twolevel.dense_state_dict(engine)   # every rank calls it
    """
    from hf_integration import dense_state_dict as hf_dense_state_dict

    module = getattr(engine_or_model, "module", engine_or_model)
    with gathered(module):
        state = hf_dense_state_dict(module)
        return {k: v.detach().clone() for k, v in state.items()}  # ZeRO-3 frees the gathered storage on exit


def export_dense(engine_or_model: Any, out_dir: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Write the trained model as a standard dense Hugging Face checkpoint (``from_pretrained``-able).

    Collective (every rank calls it): ZeRO-3 parameters are gathered over dp, shards over tp
    (``hf_integration.save_dense_pretrained``); rank 0 writes into a temporary directory and
    renames it, so a killed export never leaves half a checkpoint at ``out_dir``.

    Example:
        >>> ds_twolevel.export_dense(engine, "out/dense")   # AutoModelForCausalLM.from_pretrained("out/dense")
    """
    from hf_integration import save_dense_pretrained

    module = getattr(engine_or_model, "module", engine_or_model)
    with gathered(module):
        return save_dense_pretrained(module, out_dir, **save_pretrained_kwargs)
