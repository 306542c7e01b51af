"""Exact integer fingerprints of tensors, a model's shards and a forward call's inputs (no collective).

The guard (:mod:`ds_twolevel.guard`) all-gathers these fixed-size int64 vectors over the ranks of
one layer and compares them. A fingerprint is an integer hash of the tensor's *bits* (weighted
sum of the raw integers, wrapping modulo 2**64), so it is identical on every rank holding the same
values, whatever the device, and summation order cannot change it.

Example:
    >>> tensor_hash(torch.arange(4)) == tensor_hash(torch.arange(4).clone())
    tensor(True)
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping

import torch
from torch import nn

INPUT_SLOTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", "token_type_ids",
               "cache_position")
"""Forward arguments compared one by one; every other argument is folded into one "other" slot."""
MAX_DIMS = 6
SLOT_WIDTH = 3 + MAX_DIMS + 1
"""present, dtype code, ndim, MAX_DIMS sizes (-1 padded), hash."""
DESCRIPTOR_SIZE = (len(INPUT_SLOTS) + 1) * SLOT_WIDTH
REPLICATED = 0
"""Slice id of a tensor every rank of a layer holds whole."""
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (golden-ratio multiplier)
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]


def _as_ints(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a flat integer tensor (same device, no copy when contiguous)."""
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.int8)
    size = flat.element_size()
    return flat.contiguous().view(_INT_OF_SIZE[size] if size in _INT_OF_SIZE else torch.uint8)


def tensor_hash(tensor: torch.Tensor) -> torch.Tensor:
    """0-d int64 tensor (on the tensor's device): position-weighted sum of the tensor's bits.

    Example:
        >>> bool(tensor_hash(torch.ones(3)) != tensor_hash(torch.ones(3).neg()))
        True
    """
    bits = _as_ints(tensor)
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start:start + _CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=bits.device) * _MIX + 1
        total += (chunk * weights).sum()
    return total + bits.numel()


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 100 + len(str(dtype))


def _slot(tensor: torch.Tensor | None) -> list[Any]:
    """[present, dtype, ndim, sizes..., hash] of one argument; the hash stays a device tensor."""
    if tensor is None:
        return [0] * (SLOT_WIDTH - 1) + [torch.zeros((), dtype=torch.int64)]
    shape = list(tensor.shape)
    sizes = shape[:MAX_DIMS - 1] + [int(torch.tensor(shape[MAX_DIMS - 1:]).prod())] if len(shape) >= MAX_DIMS else shape
    sizes = sizes + [-1] * (MAX_DIMS - len(sizes))
    digest = tensor_hash(tensor) + sum(s * (k + 3) for k, s in enumerate(shape))
    return [1, _dtype_code(tensor.dtype), tensor.dim(), *sizes, digest]


def _scalar_hash(value: Any) -> int:
    """A stable hash of a plain value (bool/int/float/str/None); 0 for anything else."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return sum((k + 1) * b for k, b in enumerate(repr(value).encode())) + 7
    if hasattr(value, "get_seq_length"):  # a KV cache: its length must agree, its contents are per rank
        return 1009 * int(value.get_seq_length()) + 11
    return 0


def _other_slot(others: Mapping[str, Any]) -> list[Any]:
    """Every argument outside :data:`INPUT_SLOTS`, folded into one slot (count, hash)."""
    digest = torch.zeros((), dtype=torch.int64)
    for position, name in enumerate(sorted(others)):
        value, salt = others[name], _scalar_hash(name) * (position + 1)
        part = tensor_hash(value).cpu() + sum(value.shape) if isinstance(value, torch.Tensor) else _scalar_hash(value)
        digest = digest + salt * 31 + part
    return [int(bool(others)), 0, len(others)] + [-1] * MAX_DIMS + [digest]


def input_descriptor(bound: Mapping[str, Any]) -> torch.Tensor:
    """(DESCRIPTOR_SIZE,) int64 CPU tensor describing a forward call's arguments (names -> values).

    Example:
        >>> input_descriptor({"input_ids": ids, "attention_mask": mask, "use_cache": True}).shape
        torch.Size([80])
    """
    row: list[Any] = []
    for name in INPUT_SLOTS:
        value = bound.get(name)
        row += _slot(value if isinstance(value, torch.Tensor) else None)
    row += _other_slot({k: v for k, v in bound.items() if k not in INPUT_SLOTS and v is not None})
    return torch.stack([v.cpu() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.int64) for v in row])


LANES = len(INPUT_SLOTS) + 1
"""int64 lanes of :func:`input_lanes`: one per slot of :data:`INPUT_SLOTS`, one for every other argument."""


def _wrap(value: int) -> int:
    """A Python int folded into the int64 range (two's complement wrap)."""
    return ((value + (1 << 63)) % (1 << 64)) - (1 << 63)


def _meta(tensor: torch.Tensor) -> int:
    """Presence, dtype and shape of a tensor as one int64 (host-side: no device work)."""
    value = 1000003 * _dtype_code(tensor.dtype) + 7 * tensor.dim()
    for k, size in enumerate(tensor.shape):
        value = _wrap(value * 1000033 + (k + 3) * size)
    return value


def input_lanes(bound: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """(LANES,) int64 on ``device``: one exact digest per forward argument of :data:`INPUT_SLOTS`
    (shape, dtype and the bits of its values) and one for all other arguments together.

    The fixed-size, every-forward form of :func:`input_descriptor`: the values are hashed where they
    live and nothing is read back to the host (the guard all-gathers these lanes, then compares).

    Example:
        >>> input_lanes({"input_ids": ids, "attention_mask": mask}, torch.device("cpu")).shape
        torch.Size([8])
    """
    lanes: list[torch.Tensor] = []
    for name in INPUT_SLOTS:
        value = bound.get(name)
        if isinstance(value, torch.Tensor):
            lanes.append(tensor_hash(value).to(device) + _meta(value))
        else:
            lanes.append(torch.zeros((), dtype=torch.int64, device=device))
    other = torch.zeros((), dtype=torch.int64, device=device)
    names = sorted(k for k, v in bound.items() if k not in INPUT_SLOTS and v is not None)
    for position, name in enumerate(names):
        value, salt = bound[name], _wrap(_scalar_hash(name) * (position + 1) * 31)
        part = tensor_hash(value).to(device) + _meta(value) if isinstance(value, torch.Tensor) else _scalar_hash(value)
        other = other + salt + part
    return torch.stack(lanes + [other + len(names)])


def describe_slot(values: list[int]) -> str:
    """'(2, 16) int64' for a slot of :func:`input_descriptor` (or 'absent')."""
    present, dtype, ndim, *sizes = values[:SLOT_WIDTH - 1]
    if not present:
        return "absent"
    if dtype == 0:
        return f"{ndim} other argument(s)"
    name = str(_DTYPES[dtype - 1]).replace("torch.", "") if 0 < dtype <= len(_DTYPES) else "dtype"
    return f"{tuple(sizes[:ndim]) if ndim <= MAX_DIMS else tuple(sizes)} {name}"


def bind_arguments(names: list[str], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Positional arguments named after ``names`` (the forward's parameters), then the keywords."""
    bound = {name: value for name, value in zip(names, args)}
    bound.update({f"arg{k}": v for k, v in enumerate(args[len(names):])})
    bound.update(kwargs)
    return bound


def forward_parameter_names(model: nn.Module) -> list[str]:
    """Names of ``model.forward``'s positional parameters (``self`` excluded)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# -- shards ----------------------------------------------------------------------------------------
def _local_data(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: ZeRO-3's dp partition (``ds_tensor``) or the tensor."""
    return getattr(param, "ds_tensor", None) if hasattr(param, "ds_tensor") else param


def slice_ids(model: nn.Module, layers: Iterable[nn.Module]) -> dict[int, int]:
    """id(parameter) -> id of the dense slice this rank holds (:data:`REPLICATED` for whole tensors).

    Two ranks of a layer with equal ids must hold equal values; with different ids, different
    ones. ``layers`` are the partitioned layers (anything with ``shard_index()``).

    Example:
        >>> ids = slice_ids(model, [m for m in model.modules() if hasattr(m, "shard_index")])
    """
    out = {id(p): REPLICATED for p in model.parameters()}
    for layer in layers:
        for name, (index, dim) in layer.shard_index().items():
            try:
                param = layer.get_parameter(name)
            except AttributeError:
                continue
            digest = int(tensor_hash(torch.as_tensor(index).cpu())) & ((1 << 60) - 1)
            out[id(param)] = digest * 4 + dim + 1  # > 0: never REPLICATED
    return out


def shard_fingerprint(model: nn.Module, ids: Mapping[int, int]) -> tuple[list[str], torch.Tensor]:
    """(parameter names, (P, 3) int64 CPU tensor of [slice id, value hash, constant?]) of this rank.

    Example:
        >>> names, table = shard_fingerprint(model, slice_ids(model, layers))   # table: (P, 3)
    """
    names, rows = [], []
    for name, param in model.named_parameters():
        data = _local_data(param)
        names.append(name)
        if data is None or data.numel() == 0:
            rows.append(torch.tensor([ids.get(id(param), -1), 0, 1], dtype=torch.int64))
            continue
        const = (data.detach().min() == data.detach().max()).to(torch.int64)
        rows.append(torch.stack([torch.tensor(ids.get(id(param), -1), dtype=torch.int64),
                                 tensor_hash(data).cpu(), const.cpu()]))
    return names, torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)
