"""Dense export: the unpatched model's state dict assembled from the shards, and a standard
``save_pretrained`` checkpoint written from it (atomically), which plain ``from_pretrained`` loads.

Example:
    >>> save_dense_pretrained(model, "out/dense")   # then AutoModelForCausalLM.from_pretrained("out/dense")
"""
from __future__ import annotations

import os
import shutil
import types
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ds_twolevel.sharding.gather import gather_dense_state

from hf_integration.generation import plain_generation_config
from hf_integration.partitioned import owner_path, partitioned_layers
from hf_integration.weights import to_hf_tensors


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unpatched model's state dict, assembled from the shards (collective over each layer's tp
    axis: every rank must call it). Layers are gathered one at a time."""
    layers = partitioned_layers(model)
    inside = tuple(p + "." for p, _ in layers)
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    for path, layer in layers:
        owner = owner_path(path, layer)
        for key, value in to_hf_tensors(layer.tensor_maps, gather_dense_state(layer)).items():
            out[f"{owner}.{key}" if owner else key] = value
    return out


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` (replacing it) with renames only, so readers never see half a checkpoint."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_dense_pretrained(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs: Any) -> Path:
    """Gather the shards and write a standard HF checkpoint (atomically: temp dir, then rename).

    Collective: every rank calls it; global rank 0 writes; all return after the write. Extra
    keyword arguments go to ``PreTrainedModel.save_pretrained`` (e.g. ``max_shard_size``).

    Example:
        >>> save_dense_pretrained(model, "out/dense")   # then AutoModelForCausalLM.from_pretrained("out/dense")
    """
    final = Path(save_directory).resolve()
    state = dense_state_dict(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = [None]
    if rank == 0:
        try:
            _write_dense(model, state, final, save_kwargs)
        except Exception as err:  # tell the other ranks instead of leaving them in a barrier
            error[0] = f"{type(err).__name__}: {err}"
            if not dist.is_initialized():
                raise
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"rank 0 failed to write {final}: {error[0]}")
    return final


def _write_dense(model: nn.Module, state: dict[str, torch.Tensor], final: Path, save_kwargs: dict) -> None:
    """save_pretrained into a temp dir next to ``final``, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # 0o777 minus the umask, like any directory (tempfile.mkdtemp would make it 0o700)
    try:
        kwargs = {k: v for k, v in save_kwargs.items() if k not in ("is_main_process", "state_dict")}
        with plain_generation_config(model):
            type(model).save_pretrained(model, tmp, state_dict=state, is_main_process=True, **kwargs)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def install_dense_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained(path, ...)`` write the gathered dense checkpoint (collective), and
    give the model ``two_level_dense_state_dict()`` (:func:`dense_state_dict`), which the DeepSpeed
    integration calls without importing this package."""
    def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        return save_dense_pretrained(self, save_directory, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.two_level_dense_state_dict = types.MethodType(dense_state_dict, model)
