"""Checkpoints: load a ``save_pretrained`` directory slice by slice (the dense export back is
:mod:`hf_integration.dense_save`; its names are re-exported here).

``load_partitioned`` builds the model on the meta device (parameters only; buffers such as RoPE
tables stay real), patches it, and reads every rank's slices straight from the safetensors files:
no rank ever holds a full copy of a partitioned weight. ``save_dense_pretrained`` gathers the
shards layer by layer (``ds_twolevel.gather_dense_state``) into a standard checkpoint that plain
``AutoModel*.from_pretrained`` loads.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import transformers
from accelerate import init_empty_weights
from torch import nn

from ds_twolevel.deepspeed import compat
from ds_twolevel.parallel.agreement import agreement
from ds_twolevel.parallel.layout import TwoLevelMesh

from hf_integration.dense_save import dense_state_dict, install_dense_save, save_dense_pretrained  # noqa: F401 (re-export)
from hf_integration.fused_sources import FusedReader, fused_tensors
from hf_integration.partitioned import owner_path, partitioned_layers
from hf_integration.policy import PatchReport, dense_copies, model_name, patch_model
from hf_integration.probe import probe_loaded
from hf_integration.sequence_parallel import whole_sequence
from hf_integration.vocab_parallel import retie
from hf_integration.weights import ROW_BLOCK_BYTES, SafetensorsReader, assign_tensor, load_shards


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
        present = [n for n in names if n in reader.keys]
        expected = tuple(group[0][0]._parameters[group[0][1]].shape)
        if not present:
            problems.append(f"{names[0]} missing")
        for name in present:  # tied names: each tensor the checkpoint holds must fit
            if tuple(reader.shape(name)) != expected:
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


def _world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _agreed(what: str) -> Iterator[None]:
    """A per-rank step whose failure on any rank raises the same AgreementError on every rank
    (``ds_twolevel.parallel.agreement``: one 4-byte all-reduce); without a process group, the error as is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    with agreement(None, what=what):
        yield


def _report_unused(model: nn.Module, reader: RenamedReader, directory: Path) -> None:
    """Warn about checkpoint tensors the model does not use (biases with ``attention_bias=false``,
    extra layers, ...) with transformers' own LOAD REPORT, as ``from_pretrained`` does (rank 0 only)."""
    expected = set(model.state_dict())
    unexpected = {name for name in reader.keys if name not in expected}
    if not unexpected or _world_rank() != 0:
        return
    compat.hf_report_unexpected_keys(model, unexpected, str(directory))


def _same_values(reader: RenamedReader, a: str, b: str, dtype: torch.dtype) -> bool:
    """``torch.equal`` of two checkpoint tensors in the model's dtype, streamed in row blocks."""
    shape = reader.shape(a)
    if shape != reader.shape(b):
        return False
    if not shape:
        return torch.equal(reader.read(a).to(dtype), reader.read(b).to(dtype))
    rows = max(1, ROW_BLOCK_BYTES // max(1, math.prod(shape[1:]) * 4))
    for start in range(0, shape[0], rows):
        index = torch.arange(start, min(start + rows, shape[0]))
        if not torch.equal(reader.read(a, 0, index).to(dtype), reader.read(b, 0, index).to(dtype)):
            return False
    return True


def _untie_different(model: nn.Module, reader: RenamedReader) -> None:
    """Tie embeddings exactly when transformers would (``PreTrainedModel.tie_weights(missing_keys=...)``
    in 5.24): the config asks for a tie, but when the checkpoint holds *both* tensors with different
    values, warn as HF does and keep both. (Only one present: tied to it, by ``_materialize_rest``.)"""
    from transformers.modeling_utils import logger as hf_logger

    for target, source in list((getattr(model, "all_tied_weights_keys", None) or {}).items()):
        if target not in reader.keys or source not in reader.keys:
            continue
        parent_path, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_path)
        tied = parent._parameters[attr]
        if _same_values(reader, target, source, tied.dtype):
            continue
        if _world_rank() == 0:
            hf_logger.warning(
                f"The tied weights mapping and config for this model specifies to tie {source} to {target}, but both "
                "are present in the checkpoints with different values, so we will NOT tie them. You should update the "
                "config with `tie_word_embeddings=False` to silence this warning.")
        model.all_tied_weights_keys.pop(target)
        untied = nn.Parameter(torch.empty_like(tied, device="meta"), requires_grad=tied.requires_grad)
        untied.__dict__.update(tied.__dict__)
        parent._parameters[attr] = untied  # its own meta parameter: _materialize_rest reads it from `target`


def _open_checkpoint(directory: Path, model_class: type | None,
                     dtype: torch.dtype | None) -> tuple[nn.Module, SafetensorsReader, RenamedReader]:
    """Config, bounded headers, the model on meta (tied as its config says) and the checked key map.
    Per rank and without collectives."""
    config = transformers.AutoConfig.from_pretrained(directory)
    files = SafetensorsReader(directory, weights_name=getattr(config, "transformers_weights", None))
    try:
        cls = _model_class(config, model_class)
        with init_empty_weights():  # parameters on meta, buffers (RoPE tables, position ids) real
            model = compat.hf_from_config(cls, config, dtype)
        model.tie_weights()  # meta construction leaves tied weights (GPT-2's lm_head) untied
        reader = FusedReader(RenamedReader(files, checkpoint_keys(model, files)), fused_tensors(model, files))
        check_checkpoint(model, reader, directory)
        _report_unused(model, reader, directory)
    except BaseException:
        files.close()
        raise
    return model, files, reader


def load_partitioned(directory: str | os.PathLike, mesh: TwoLevelMesh, *, model_class: type | None = None,
                     strict: bool = True, strategy: str = "cost_model", kv_replication: bool = False,
                     dtype: torch.dtype | None = None, probe: bool = True, hardware: Any = None,
                     reduce_dtype: Any = torch.float32, sequence_parallel: bool = False,
                     vocab_parallel: bool = False) -> tuple[nn.Module, PatchReport]:
    """Build ``model_class`` (default: ``config.architectures[0]``) from a ``save_pretrained``
    directory with each rank reading only its slices; return (patched model in eval mode, report).

    Loads as ``from_pretrained`` would: the same file precedence (a single ``model.safetensors``
    wins over an index), tied embeddings only when transformers would tie them, and its LOAD
    REPORT for checkpoint tensors the model does not use. A rank that fails (a file only it reads is
    truncated, ...) makes every rank raise the same ``AgreementError`` naming that rank and file.

    ``strategy``, ``kv_replication``, ``hardware``, ``reduce_dtype``, ``sequence_parallel`` and ``vocab_parallel``
    are :func:`patch_model`'s (with ``vocab_parallel`` each rank reads only its vocab rows of the embedding and the
    LM head; with ``sequence_parallel`` the model's forward takes this rank's shard of each batch).
    ``probe``: the parity probe (:func:`hf_integration.probe.probe_loaded`): every attention and MLP
    layer, one at a time, is gathered into a dense HF module and compared with the partitioned one on
    8 tokens; a mismatch raises ``ProbeError`` on every rank (collective).

    Example:
        >>> model, report = load_partitioned("ckpt/", TwoLevelLayout(n=2, m=2).build())
    """
    directory = Path(directory)
    with _agreed("loading a checkpoint (load_partitioned)"):  # each rank's error names its own files
        model, files, reader = _open_checkpoint(directory, model_class, dtype)
    try:
        copies = dense_copies(model) if probe else {}  # meta: no memory until the probe fills them
        report = patch_model(model, mesh, strict=strict, strategy=strategy, kv_replication=kv_replication,
                             probe=False, hardware=hardware, reduce_dtype=reduce_dtype,
                             sequence_parallel=sequence_parallel, vocab_parallel=vocab_parallel)
        with _agreed("reading checkpoint slices (load_partitioned)"):
            for path, layer in partitioned_layers(model):
                if getattr(layer, "tied", False):
                    continue  # a tied vocab head: its rows are the embedding's (retie below)
                owner = owner_path(path, layer)
                load_shards(layer, layer.tensor_maps, reader, prefix=(owner + ".") if owner else "")
            retie(model)
            _untie_different(model, reader)
            _materialize_rest(model, reader)
    finally:
        files.close()
    if dtype is not None:
        model.to(dtype)
    model.eval()
    if copies:
        owners = [(owner_path(path, layer), layer) for path, layer in partitioned_layers(model)]
        with whole_sequence(model):  # the probe runs the same ids on every rank
            probe_loaded(model, copies, owners, name=model_name(model))
    return model, report
