"""Checkpoints: load a ``save_pretrained`` directory slice by slice, and write a dense one back.

``load_partitioned`` builds the model on the meta device (parameters only; buffers such as RoPE
tables stay real), patches it, and reads every rank's slices straight from the safetensors files:
no rank ever holds a full copy of a partitioned weight. ``save_dense_pretrained`` gathers the
shards layer by layer (``ds_twolevel.gather_dense_state``) into a standard checkpoint that plain
``AutoModel*.from_pretrained`` loads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from accelerate import init_empty_weights
from torch import nn

from ds_twolevel.gather import gather_dense_state
from ds_twolevel.layout import TwoLevelMesh

from .policy import PatchReport, dense_copies, model_name, partitioned_layers, patch_model
from .fused_sources import FusedReader, fused_tensors
from .probe import probe_loaded
from .weights import SafetensorsReader, assign_tensor, load_shards, to_hf_tensors


# -- dense export ---------------------------------------------------------------------------------
def _owner_path(path: str, layer: nn.Module) -> str:
    """Path of the HF module a layer replaced (its TensorMap keys are relative to it)."""
    return path[: -len(layer.target) - 1] if layer.target else path


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unpatched model's state dict, assembled from the shards (collective over each layer's tp
    axis: every rank must call it). Layers are gathered one at a time."""
    layers = partitioned_layers(model)
    inside = tuple(p + "." for p, _ in layers)
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    for path, layer in layers:
        owner = _owner_path(path, layer)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        kwargs = {k: v for k, v in save_kwargs.items() if k not in ("is_main_process", "state_dict")}
        type(model).save_pretrained(model, tmp, state_dict=state, is_main_process=True, **kwargs)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def install_dense_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained(path, ...)`` write the gathered dense checkpoint (collective)."""
    def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        return save_dense_pretrained(self, save_directory, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)


# -- lazy loading ---------------------------------------------------------------------------------
def _model_class(config: Any, model_class: type | None) -> type:
    if model_class is not None:
        return model_class
    archs = getattr(config, "architectures", None) or []
    if not archs or not hasattr(transformers, archs[0]):
        raise ValueError(f"config.architectures = {archs!r} names no transformers class; pass model_class=")
    return getattr(transformers, archs[0])


def checkpoint_keys(model: nn.Module, reader: SafetensorsReader) -> dict[str, str]:
    """Model tensor name -> checkpoint key, through transformers' own renamings (legacy names,
    ``embed_out`` -> ``lm_head``, a base-model prefix). Keys that need a fusing converter are left
    out (reported as missing)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    out: dict[str, str] = {}
    for key in reader.keys():
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converter is None:
            out.setdefault(name, key)
    return out


class RenamedReader:
    """A reader addressed by model tensor names (translated to checkpoint keys)."""

    def __init__(self, reader: SafetensorsReader, keys: dict[str, str]) -> None:
        self.reader, self.keys = reader, keys

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.reader.shape(self.keys.get(key, key))

    def read(self, key: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        if key not in self.keys:
            raise ValueError(f"tensor {key} is not in the checkpoint")
        return self.reader.read(self.keys[key], dim, index)


def _parameter_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(param) -> every (module, attr, full name) holding it (tied weights have several)."""
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, attr, f"{path}.{attr}" if path else attr))
    return holders


def check_checkpoint(model: nn.Module, reader: RenamedReader, directory: Path) -> None:
    """ValueError listing tensors whose checkpoint shape differs from the config's (or that are
    missing), before anything is loaded or any collective issued."""
    problems = []
    for group in _parameter_holders(model).values():
        names = [full for _, _, full in group]
        name = next((n for n in names if n in reader.keys), None)
        expected = tuple(group[0][0]._parameters[group[0][1]].shape)
        if name is None:
            problems.append(f"{names[0]} missing")
        elif tuple(reader.shape(name)) != expected:
            problems.append(f"{reader.keys[name]}: checkpoint {tuple(reader.shape(name))} vs config {expected}")
    if problems:
        raise ValueError(f"{model_name(model)}: checkpoint {directory} does not match its config.json "
                         f"({len(problems)} tensor(s)): {'; '.join(problems[:6])}; re-export the checkpoint "
                         f"or fix config.json")


def _materialize_rest(model: nn.Module, reader: RenamedReader) -> None:
    """Read every parameter still on meta (embeddings, norms, LM head) whole, keeping ties."""
    for group in _parameter_holders(model).values():
        module, attr, _ = group[0]
        param = module._parameters[attr]
        if not param.is_meta:
            continue
        name = next(full for _, _, full in group if full in reader.keys)
        assign_tensor(module, attr, reader.read(name))
        new = module._parameters[attr]
        for other, other_attr, _ in group[1:]:
            other._parameters[other_attr] = new


def load_partitioned(directory: str | os.PathLike, mesh: TwoLevelMesh, *, model_class: type | None = None,
                     strict: bool = True, strategy: str = "auto", kv_replication: bool = False,
                     dtype: torch.dtype | None = None, probe: bool = True) -> tuple[nn.Module, PatchReport]:
    """Build ``model_class`` (default: ``config.architectures[0]``) from a ``save_pretrained``
    directory with each rank reading only its slices; return (patched model in eval mode, report).

    ``probe``: the parity probe (:func:`hf_integration.probe.probe_loaded`): the first attention and MLP
    layer are gathered into dense HF modules and compared with the partitioned ones on 8 tokens;
    a mismatch raises ``ProbeError`` on every rank (collective).

    Example:
        >>> model, report = load_partitioned("ckpt/", TwoLevelLayout(n=2, m=2).build())
    """
    directory = Path(directory)
    with SafetensorsReader(directory) as files:
        config = transformers.AutoConfig.from_pretrained(directory)
        cls = _model_class(config, model_class)
        with init_empty_weights():  # parameters on meta, buffers (RoPE tables, position ids) real
            model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
        model.tie_weights()  # meta construction leaves tied weights (GPT-2's lm_head) untied
        reader = FusedReader(RenamedReader(files, checkpoint_keys(model, files)), fused_tensors(model, files))
        check_checkpoint(model, reader, directory)
        copies = dense_copies(model) if probe else {}  # meta: no memory until the probe fills them
        report = patch_model(model, mesh, strict=strict, strategy=strategy, kv_replication=kv_replication,
                             probe=False)
        for path, layer in partitioned_layers(model):
            owner = _owner_path(path, layer)
            load_shards(layer, layer.tensor_maps, reader, prefix=(owner + ".") if owner else "")
        _materialize_rest(model, reader)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    if copies:
        owners = [(_owner_path(path, layer), layer) for path, layer in partitioned_layers(model)]
        probe_loaded(model, copies, owners, name=model_name(model))
    return model, report
