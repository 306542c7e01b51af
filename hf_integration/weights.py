"""Where each dense tensor of a partitioned layer lives in a Hugging Face checkpoint, and readers.

A :class:`TensorMap` ties one *core* tensor name (``q_proj.weight``, ``down_proj.bias``, ... as
used by ``TwoLevelAttention.shard_index`` / ``TwoLevelMLP.shard_index``) to the HF tensor that
stores it: key (relative to the replaced module), whether HF stores it transposed (Conv1D), and,
for fused QKV, the HF row of every core feature. The same maps drive the three directions:
slicing a live module, slicing a checkpoint on disk, and assembling a dense checkpoint.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ds_twolevel.sharding.partition import AttentionSpec

from hf_integration.safetensors_files import SAFE_DTYPES, Entry, read_header, weight_files  # noqa: F401 (re-export)
from hf_integration.specs import AttentionLayout, MLPLayout, MoELayout

ROW_BLOCK_BYTES = 4 << 20  # column slices read rows in blocks of this size: bounded scratch memory


@dataclass(frozen=True)
class TensorMap:
    """How one core tensor is stored in the HF module/checkpoint."""

    key: str
    """HF tensor name relative to the replaced (owner) module, e.g. "c_attn.weight"."""
    hf_shape: tuple[int, ...]
    """full shape of the HF tensor (a fused tensor is larger than the core one)."""
    core_dim: int | None
    """dim sharded in the core layout (0 rows / 1 columns of nn.Linear); None = replicated."""
    transpose: bool = False
    """HF stores the 2-D weight as (in, out) (GPT-2 Conv1D)."""
    feature_map: torch.Tensor | None = None
    """HF index (along hf_dim) of each core feature, for fused projections."""
    field: str = ""
    """the spec field this tensor comes from (named when the module's tensor does not match)."""

    @property
    def hf_dim(self) -> int | None:
        """The HF dim matching core_dim."""
        if self.core_dim is None:
            return None
        return 1 - self.core_dim if self.transpose else self.core_dim

    def hf_index(self, core_index: torch.Tensor) -> torch.Tensor:
        """HF positions of core positions ``core_index`` along hf_dim."""
        return core_index if self.feature_map is None else self.feature_map[core_index]


def fused_feature_map(layout: str, kind: str, spec: AttentionSpec) -> torch.Tensor:
    """HF row of every q/k/v feature (head*d + t) inside a fused QKV projection."""
    h, g, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dv
    width = {"q": h * d, "k": g * d, "v": g * dv}[kind]
    feat = torch.arange(width)
    if layout == "concat":  # [q | k | v]
        return feat + {"q": 0, "k": h * d, "v": h * d + g * d}[kind]
    if layout == "grouped":  # [q_{c*h/g} .. q_{(c+1)*h/g - 1} k_c v_c] per KV group c (Falcon)
        per = h // g  # query heads per KV group
        group_rows = (per + 2) * d  # assumes dv == d (Falcon)
        if kind == "q":
            head, t = feat // d, feat % d
            return (head // per) * group_rows + (head % per) * d + t
        group, t = feat // d, feat % d
        return group * group_rows + (per if kind == "k" else per + 1) * d + t
    assert layout == "per_head" and g == h, "per_head packing needs g == h (checked in validation)"
    size = d if kind != "v" else dv
    head, t = feat // size, feat % size
    return head * (2 * d + dv) + {"q": 0, "k": d, "v": 2 * d}[kind] + t  # [q_h k_h v_h] per head


def _weight_shape(out_features: int, in_features: int, conv1d: bool) -> tuple[int, int]:
    return (in_features, out_features) if conv1d else (out_features, in_features)


def attention_tensor_maps(layout: AttentionLayout, spec: AttentionSpec, hidden: int, *, qkv_bias: bool,
                          o_bias: bool, qk_norm: bool, sinks: bool = False) -> dict[str, TensorMap]:
    """Core name -> TensorMap for one attention layer."""
    h, g, d, dv, c = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dv, layout.conv1d
    widths = {"q": h * d, "k": g * d, "v": g * dv}
    maps: dict[str, TensorMap] = {}
    for kind, path in (("q", layout.q), ("k", layout.k), ("v", layout.v)):
        if layout.fused:
            total, fmap, path = sum(widths.values()), fused_feature_map(layout.fused_layout, kind, spec), layout.fused
            where = f"AttentionLayout.fused ({layout.fused_layout!r})"
        else:
            total, fmap, where = widths[kind], None, f"AttentionLayout.{kind}"
        maps[f"{kind}_proj.weight"] = TensorMap(f"{path}.weight", _weight_shape(total, hidden, c), 0, c, fmap, where)
        if qkv_bias:
            maps[f"{kind}_proj.bias"] = TensorMap(f"{path}.bias", (total,), 0, False, fmap, f"{where}, qkv_bias")
    maps["o_proj.weight"] = TensorMap(f"{layout.o}.weight", _weight_shape(hidden, h * dv, c), 1, c,
                                      field="AttentionLayout.o")
    if o_bias:
        maps["o_bias"] = TensorMap(f"{layout.o}.bias", (hidden,), None, field="AttentionLayout.o, o_bias")
    if sinks:  # one logit per query head, sliced with the head groups
        maps["sinks"] = TensorMap(layout.sinks, (h,), 0, field="AttentionLayout.sinks")
    if qk_norm:
        whole = layout.norm_style.scope == "projection"  # one weight per feature of the projection
        scope = f"norm_style.scope={layout.norm_style.scope!r}"
        maps["q_norm_weight"] = TensorMap(f"{layout.q_norm}.weight", (h * d if whole else d,), 0,
                                          field=f"AttentionLayout.q_norm, {scope}")
        maps["k_norm_weight"] = TensorMap(f"{layout.k_norm}.weight", (g * d if whole else d,), 0,
                                          field=f"AttentionLayout.k_norm, {scope}")
    return maps


def mlp_tensor_maps(layout: MLPLayout, hidden: int, intermediate: int, *, bias: bool) -> dict[str, TensorMap]:
    """Core name -> TensorMap for one MLP (a fused ``gate_up`` gives gate and up as its two halves)."""
    c = layout.conv1d
    maps: dict[str, TensorMap] = {}
    if layout.gate_up is not None:
        shape, key = _weight_shape(2 * intermediate, hidden, c), f"{layout.gate_up}.weight"
        for half, core in enumerate(("gate_proj", "up_proj")):  # rows [gate: I | up: I]
            fmap = torch.arange(intermediate) + half * intermediate
            maps[f"{core}.weight"] = TensorMap(key, shape, 0, c, fmap, "MLPLayout.gate_up")
            if bias:
                maps[f"{core}.bias"] = TensorMap(f"{layout.gate_up}.bias", (2 * intermediate,), 0, False, fmap,
                                                 "MLPLayout.gate_up, mlp_bias")
    for core, path in (("gate_proj", layout.gate), ("up_proj", layout.up)):
        if path is None:
            continue
        field = f"MLPLayout.{core[:-5]}"
        maps[f"{core}.weight"] = TensorMap(f"{path}.weight", _weight_shape(intermediate, hidden, c), 0, c,
                                           field=field)
        if bias:
            maps[f"{core}.bias"] = TensorMap(f"{path}.bias", (intermediate,), 0, field=f"{field}, mlp_bias")
    maps["down_proj.weight"] = TensorMap(f"{layout.down}.weight", _weight_shape(hidden, intermediate, c), 1, c,
                                         field="MLPLayout.down")
    if bias:
        maps["down_proj.bias"] = TensorMap(f"{layout.down}.bias", (hidden,), None, field="MLPLayout.down, mlp_bias")
    return maps


def moe_tensor_maps(layout: MoELayout, hidden: int, intermediate: int, experts: int) -> dict[str, TensorMap]:
    """Core name -> TensorMap for a fused-experts block: (E, 2I, H) gate_up, (E, H, I) down (or, transposed,
    (E, H, 2I) and (E, I, H)), sliced along the intermediate dim of every expert; with biases, (E, 2I)
    gate_up bias sliced likewise and (E, H) down bias replicated (the core names are the HF attribute names)."""
    if layout.transposed:
        gate_up, up_dim, down, down_dim = (experts, hidden, 2 * intermediate), 2, (experts, intermediate, hidden), 1
    else:
        gate_up, up_dim, down, down_dim = (experts, 2 * intermediate, hidden), 1, (experts, hidden, intermediate), 2
    maps = {"gate_up_proj": TensorMap(layout.gate_up, gate_up, up_dim, field="MoELayout.gate_up"),
            "down_proj": TensorMap(layout.down, down, down_dim, field="MoELayout.down")}
    if layout.bias:
        maps["gate_up_proj_bias"] = TensorMap(f"{layout.gate_up}_bias", (experts, 2 * intermediate), 1,
                                              field="MoELayout.bias")
        maps["down_proj_bias"] = TensorMap(f"{layout.down}_bias", (experts, hidden), None, field="MoELayout.bias")
    return maps


def dense_numel(maps: dict[str, TensorMap]) -> int:
    """Elements of the dense HF tensors behind ``maps`` (a fused tensor counted once)."""
    shapes = {t.key: t.hf_shape for t in maps.values()}
    return sum(math.prod(shape) for shape in shapes.values())


def check_tensor_shapes(maps: dict[str, TensorMap], reader: "TensorReader", *, where: str) -> None:
    """ValueError naming the module path, the spec field and both shapes where a tensor the spec
    implies is absent or shaped differently (``where``: the module path, for the message)."""
    for tmap in maps.values():
        actual = reader.shape(tmap.key)
        if actual is None:
            raise ValueError(f"{where}.{tmap.key}: the spec ({tmap.field}) names a tensor this module does not "
                             f"have; fix the ArchSpec")
        if tuple(actual) != tuple(tmap.hf_shape):
            raise ValueError(f"{where}.{tmap.key}: the spec ({tmap.field}) implies shape {tuple(tmap.hf_shape)}, the "
                             f"module's tensor has shape {tuple(actual)}; fix the ArchSpec (nothing was partitioned)")


def unplaced_parameters(owner: nn.Module, maps: dict[str, TensorMap], target: str,
                        identity: tuple[str, ...]) -> list[str]:
    """Parameters of the modules a partitioned layer replaces that no TensorMap places: a layer
    built from the spec would drop them (e.g. a q_norm the spec does not mention)."""
    placed = {t.key for t in maps.values()}
    replaced = (target, *identity) if target else ("",)

    def inside(name: str) -> bool:
        return any(not p or name == p or name.startswith(p + ".") for p in replaced)

    return [name for name, _ in owner.named_parameters() if inside(name) and name not in placed]


# -- readers -------------------------------------------------------------------------------------
class TensorReader(Protocol):
    """Reads a whole tensor, or the positions ``index`` along ``dim``, by name."""

    def shape(self, key: str) -> tuple[int, ...] | None: ...

    def read(self, key: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor: ...


class StateDictReader:
    """Reader over in-memory tensors (a live module's parameters)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def shape(self, key: str) -> tuple[int, ...] | None:
        t = self.tensors.get(key)
        return None if t is None else tuple(t.shape)

    def read(self, key: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors[key].detach()
        return t.clone() if index is None else t.index_select(dim, index.to(t.device))


_Entry = Entry  # where one tensor lives (file, dtype, shape, offset): see safetensors_files


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive values in ``index`` (in order)."""
    values = index.tolist()
    runs, start = [], 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] != values[k - 1] + 1:
            runs.append((values[start], values[k - 1] + 1))
            start = k
    return runs


class SafetensorsReader:
    """Reads slices of a ``save_pretrained`` directory (single file or sharded with an index).

    Data are read with positioned reads, never memory-mapped, so that a rank's resident memory
    holds only its slices (a column slice streams row blocks of ``ROW_BLOCK_BYTES``).

    Example:
        >>> with SafetensorsReader(path) as ckpt:
        ...     rows = ckpt.read("model.layers.0.self_attn.q_proj.weight", 0, torch.tensor([0, 1, 8, 9]))
    """

    def __init__(self, directory: str | os.PathLike, *, weights_name: str | None = None) -> None:
        self.directory = Path(directory)
        self.entries: dict[str, _Entry] = {}
        # headers are parsed with bounds (safetensors_files.read_header): a damaged or hostile file
        # is a ValueError naming it, never an allocation; files resolve as from_pretrained does
        for file in weight_files(self.directory, weights_name):
            self.entries.update(read_header(file))
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.shape

    def _read_bytes(self, entry: _Entry, start: int, nbytes: int) -> bytearray:
        handle = self._handles.get(entry.file) or self._handles.setdefault(entry.file, open(entry.file, "rb"))
        buf = bytearray(nbytes)
        handle.seek(entry.offset + start)
        if handle.readinto(buf) != nbytes:
            raise ValueError(f"{entry.file}: truncated tensor data")
        return buf

    def _rows(self, entry: _Entry, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0."""
        row_numel = math.prod(entry.shape[1:])
        esize = torch.empty((), dtype=entry.dtype).element_size()
        buf = self._read_bytes(entry, start * row_numel * esize, (stop - start) * row_numel * esize)
        return torch.frombuffer(buf, dtype=entry.dtype).view(stop - start, *entry.shape[1:])

    def read(self, key: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        entry = self.entries[key]
        if not entry.shape:  # scalar
            return self._rows_scalar(entry)
        if index is None:
            return self._rows(entry, 0, entry.shape[0])
        if dim == 0:
            return torch.cat([self._rows(entry, a, b) for a, b in _runs(index)], dim=0)
        row_bytes = math.prod(entry.shape[1:]) * torch.empty((), dtype=entry.dtype).element_size()
        block = max(1, ROW_BLOCK_BYTES // max(row_bytes, 1))
        parts = [self._rows(entry, r, min(r + block, entry.shape[0])).index_select(dim, index)
                 for r in range(0, entry.shape[0], block)]
        return torch.cat(parts, dim=0)

    def _rows_scalar(self, entry: _Entry) -> torch.Tensor:
        esize = torch.empty((), dtype=entry.dtype).element_size()
        return torch.frombuffer(self._read_bytes(entry, 0, esize), dtype=entry.dtype).reshape(())


# -- loading into modules --------------------------------------------------------------------------
def assign_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter ``name`` of ``module`` to ``value``: copy in place, or replace a meta parameter
    (keeping its tensor-parallel tags). ValueError on a shape mismatch."""
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    param = owner._parameters[attr]
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{type(module).__name__}.{name}: expected shape {tuple(param.shape)}, "
                         f"the checkpoint gives {tuple(value.shape)}")
    if param.is_meta:
        new = nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)  # tensor_model_parallel / partition_dim tags
        owner._parameters[attr] = new
    else:
        with torch.no_grad():
            param.copy_(value)


def load_shards(layer: nn.Module, maps: dict[str, TensorMap], reader: TensorReader, prefix: str = "") -> None:
    """Load this rank's slices of every tensor of ``layer`` (a TwoLevelAttention/TwoLevelMLP) from
    ``reader``, whose keys are ``prefix + TensorMap.key``."""
    for name, (index, dim) in layer.shard_index().items():
        tmap = maps[name]
        assert tmap.core_dim == dim, f"{name}: TensorMap core dim {tmap.core_dim} != shard dim {dim}"
        value = reader.read(prefix + tmap.key, tmap.hf_dim, tmap.hf_index(index))
        assign_tensor(layer, name, value.t() if tmap.transpose else value)
    for name, attr in layer.replicated_tensors().items():
        assign_tensor(layer, attr, reader.read(prefix + maps[name].key))


def to_hf_tensors(maps: dict[str, TensorMap], dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of slicing: core dense tensors (from ``gather_dense_state``) -> HF tensors by key."""
    out: dict[str, torch.Tensor] = {}
    for name, tmap in maps.items():
        value = dense[name].t() if tmap.transpose else dense[name]
        if tmap.feature_map is None:
            out[tmap.key] = value.contiguous()
            continue
        fused = out.setdefault(tmap.key, value.new_zeros(tmap.hf_shape))
        fused.index_copy_(tmap.hf_dim, tmap.feature_map.to(value.device), value)
    return out
