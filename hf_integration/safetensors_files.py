"""Which safetensors files a ``save_pretrained`` directory holds, and their headers, parsed with bounds.

A safetensors file is ``<8-byte little-endian header length N><N bytes of JSON header><data>``;
the header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data). Every number in it comes from the file, so a hostile or damaged file could
ask for any allocation. :func:`read_header` refuses, with a ValueError naming the file, before
anything is allocated: a header length over :data:`MAX_HEADER_BYTES` (the limit of the
``safetensors`` format itself) or past the end of the file, a header that is not a JSON object of
well-formed entries, an unknown dtype, offsets outside the data or not matching dtype x shape (a
truncated file is caught here, when it is opened, not when a tensor is read).

:func:`weight_files` resolves the files as ``transformers.PreTrainedModel.from_pretrained`` does
for a local directory (transformers 5.24, ``modeling_utils._get_resolved_checkpoint_files``):
``config.transformers_weights`` if set, else ``model.safetensors``, else
``model.safetensors.index.json`` — so a valid single file wins over a stale index.

Example:
    >>> files = weight_files(Path("ckpt"))
    >>> entries = read_header(files[0])
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
               "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000
"""largest accepted JSON header (the ``safetensors`` library's own ``MAX_HEADER_SIZE``)."""
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """absolute byte offset of the data in the file."""


def _header_json(file: Path, f, size: int) -> tuple[dict, int]:
    """The decoded header object and its length, bounds-checked against the file size."""
    if size < 8:
        raise ValueError(f"{file}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise ValueError(f"{file}: header length field says {n} bytes, but the file has {size - 8} after it "
                         f"(limit {MAX_HEADER_BYTES}); the file is truncated or not safetensors")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        raise ValueError(f"{file}: header is not valid JSON ({type(err).__name__}: {str(err)[:80]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: header must be a JSON object, got {type(header).__name__}")
    return header, n


def _entry(file: Path, key: str, meta: object, data_start: int, data_len: int) -> Entry:
    """One validated header entry."""
    bad = f"{file}: tensor {key!r}"
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
        raise ValueError(f"{bad}: header entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFE_DTYPES:
        raise ValueError(f"{bad} has unsupported dtype {str(dtype)[:20]!r}; supported: {', '.join(SAFE_DTYPES)}")
    ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    if not ints(shape) or len(shape) > 64:
        raise ValueError(f"{bad}: shape must be a list of non-negative integers, got {str(shape)[:60]}")
    if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ValueError(f"{bad}: data_offsets must be [begin, end] with 0 <= begin <= end, got {str(offsets)[:60]}")
    nbytes = math.prod(shape) * torch.empty((), dtype=SAFE_DTYPES[dtype]).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{bad}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but {dtype} x "
                         f"{tuple(shape)} needs {nbytes}")
    if offsets[1] > data_len:
        raise ValueError(f"{bad} needs data up to byte {offsets[1]} but the file holds {data_len} bytes of data: "
                         f"the file is truncated; re-save or re-copy it")
    return Entry(file, SAFE_DTYPES[dtype], tuple(shape), data_start + offsets[0])


def read_header(file: Path) -> dict[str, Entry]:
    """Tensor name -> :class:`Entry` of one safetensors file (ValueError naming the file on any
    inconsistency; never allocates more than the header's bounded size)."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            header, n = _header_json(file, f, size)
    except OSError as err:
        raise ValueError(f"{file}: cannot be read ({type(err).__name__}: {err.strerror or err})") from None
    data_start = 8 + n
    return {key: _entry(file, key, meta, data_start, size - data_start)
            for key, meta in header.items() if key != "__metadata__"}


def _inside(directory: Path, name: object, what: str) -> Path:
    """``directory / name``, refusing names that are not strings or point outside the directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: file names must be non-empty strings, got {str(name)[:60]!r}")
    path = directory / name
    base = directory.resolve()
    if os.path.commonpath([base, path.resolve()]) != str(base):
        raise ValueError(f"{what}: {name!r} points outside {directory}")
    return path


def _index_files(directory: Path, index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names (each must exist)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError, RecursionError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: not a safetensors index (needs a non-empty \"weight_map\" object of "
                         f"tensor name -> shard file)")
    files = sorted({_inside(directory, name, str(index)) for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{index} names shard(s) that do not exist: {', '.join(missing[:4])}; re-save the "
                         f"checkpoint (save_pretrained) or copy the missing shards")
    return files


def weight_files(directory: Path, weights_name: str | None = None) -> list[Path]:
    """The safetensors files of a local ``save_pretrained`` directory, in ``from_pretrained``'s order
    of precedence: ``weights_name`` (``config.transformers_weights``), ``model.safetensors``, the index."""
    if weights_name is not None:
        if not isinstance(weights_name, str) or not weights_name.endswith((".safetensors", ".safetensors.index.json")):
            raise ValueError(f"{directory}: config.transformers_weights = {weights_name!r} is neither a *.safetensors "
                             f"file nor a *.safetensors.index.json index")
        path = _inside(directory, weights_name, f"{directory}: config.transformers_weights")
        if not path.is_file():
            raise ValueError(f"{directory}: config.transformers_weights names {weights_name!r}, which does not exist")
        return _index_files(directory, path) if weights_name.endswith(".json") else [path]
    if (directory / SINGLE).is_file():  # transformers prefers the single file over an index
        return [directory / SINGLE]
    if (directory / INDEX).is_file():
        return _index_files(directory, directory / INDEX)
    raise ValueError(f"{directory}: no {SINGLE} or {INDEX} (save the model with "
                     f"save_pretrained(..., safe_serialization=True))")
