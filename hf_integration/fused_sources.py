"""Model tensors that transformers assembles at load time from several checkpoint tensors (MoE experts).

transformers 5.x holds a Mixtral block's experts fused, ``experts.gate_up_proj`` (E, 2I, H) and
``experts.down_proj`` (E, H, I), but reads and writes checkpoints per expert
(``block_sparse_moe.experts.{e}.w1/w3/w2.weight``) through a ``WeightConverter`` whose operations are
``MergeModulelist(dim=0)`` (stack the experts) and, for gate/up, ``Concatenate(dim=1)`` (gate rows,
then up rows). :class:`FusedTensor` reads any slice of such a fused tensor straight from the
per-expert tensors, so ``load_partitioned`` still reads only this rank's rows and columns.
Converters with other operations are not read (their tensors are reported missing, as before).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class FusedTensor:
    """One fused model tensor: ``parts[p][e]`` is the checkpoint key of expert e's tensor of source
    pattern p; the parts are concatenated along ``concat_dim`` (a model-tensor dim) after stacking."""

    parts: tuple[tuple[str, ...], ...]
    part_shapes: tuple[tuple[int, ...], ...]
    concat_dim: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        """(E, ...) with the concatenated dim summed over the parts."""
        shape = [len(self.parts[0]), *self.part_shapes[0]]
        if self.concat_dim is not None:
            shape[self.concat_dim] = sum(s[self.concat_dim - 1] for s in self.part_shapes)
        return tuple(shape)

    def read(self, reader: Any, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Positions ``index`` along ``dim`` (all when None) of the fused tensor, from ``reader``."""
        experts = range(len(self.parts[0])) if dim != 0 or index is None else index.tolist()
        inner = None if dim in (None, 0) or index is None else (dim - 1, index)
        return torch.stack([self._expert(reader, e, inner) for e in experts], dim=0)

    def _expert(self, reader: Any, e: int, inner: tuple[int, torch.Tensor] | None) -> torch.Tensor:
        """Expert e's slice (positions along a part dim, or whole), parts concatenated."""
        if self.concat_dim is None:
            return reader.read(self.parts[0][e], *(inner or (None, None)))
        cat = self.concat_dim - 1
        if inner is None or inner[0] != cat:  # every part contributes the same positions
            return torch.cat([reader.read(p[e], *(inner or (None, None))) for p in self.parts], dim=cat)
        return torch.cat([reader.read(self.parts[p][e], cat, local) for p, local in self._runs(inner[1])], dim=cat)

    def _runs(self, index: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Consecutive positions of ``index`` that fall in one part: (part, positions inside it)."""
        bounds = torch.tensor([0] + [s[self.concat_dim - 1] for s in self.part_shapes]).cumsum(0)
        part_of = torch.bucketize(index, bounds[1:], right=True)
        runs: list[tuple[int, torch.Tensor]] = []
        start = 0
        for k in range(1, len(index) + 1):
            if k == len(index) or part_of[k] != part_of[start]:
                p = int(part_of[start])
                runs.append((p, index[start:k] - bounds[p]))
                start = k
        return runs


def _supported(converter: Any) -> int | None | bool:
    """The concat dim of a [MergeModulelist(0)] / [MergeModulelist(0), Concatenate(d)] converter
    (None without Concatenate), False for any other chain of operations."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(converter, "operations", [])]
    if ops == [("MergeModulelist", 0)]:
        return None
    if len(ops) == 2 and ops[0] == ("MergeModulelist", 0) and ops[1][0] == "Concatenate" and ops[1][1] >= 1:
        return ops[1][1]
    return False


def fused_tensors(model: nn.Module, reader: Any) -> dict[str, FusedTensor]:
    """Model tensor name -> FusedTensor for every supported converter target of ``reader``'s checkpoint."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    found: dict[str, tuple[Any, dict[str, dict[int, str]]]] = {}
    for key in reader.keys():
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        converter = next((c for c in converters if pattern in c.source_patterns), None)
        if pattern is None or converter is None or _supported(converter) is False:
            continue
        number = re.search(re.escape(pattern).replace(r"\*", r"(\d+)") + "$", key)
        if number is None:
            continue
        found.setdefault(name, (converter, {}))[1].setdefault(pattern, {})[int(number.group(1))] = key
    out = {}
    for name, (converter, by_pattern) in found.items():
        fused = _assemble(converter, by_pattern, reader)
        if fused is not None:
            out[name] = fused
    return out


def _assemble(converter: Any, by_pattern: dict[str, dict[int, str]], reader: Any) -> FusedTensor | None:
    """The FusedTensor of one target, None unless every pattern has experts 0..E-1 of one shape."""
    if set(by_pattern) != set(converter.source_patterns):
        return None
    parts, shapes = [], []
    for pattern in converter.source_patterns:  # converter order: the concatenation order
        experts = by_pattern[pattern]
        if sorted(experts) != list(range(len(experts))):
            return None
        keys = tuple(experts[e] for e in range(len(experts)))
        if len({tuple(reader.shape(k)) for k in keys}) != 1:
            return None
        parts.append(keys)
        shapes.append(tuple(reader.shape(keys[0])))
    if len({len(p) for p in parts}) != 1:
        return None
    return FusedTensor(tuple(parts), tuple(shapes), _supported(converter))


class FusedReader:
    """A model-name reader (``checkpoint.RenamedReader``) that also serves fused tensors.

    Example:
        >>> reader = FusedReader(RenamedReader(files, keys), fused_tensors(model, files))
        >>> reader.read("model.layers.0.mlp.experts.gate_up_proj", 1, rows)
    """

    def __init__(self, renamed: Any, fused: dict[str, FusedTensor]) -> None:
        self.renamed, self.fused = renamed, fused
        self.reader = renamed.reader
        self.keys = {**renamed.keys, **{n: f"{t.parts[0][0]} (+{len(t.parts) * len(t.parts[0]) - 1} per-expert tensors)"
                                        for n, t in fused.items()}}

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.fused[key].shape if key in self.fused else self.renamed.shape(key)

    def read(self, key: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        if key in self.fused:
            return self.fused[key].read(self.reader, dim, index)
        return self.renamed.read(key, dim, index)
