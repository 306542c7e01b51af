"""Where every rank's tensors sit in the dense model: the layout record of a checkpoint.

A two-level checkpoint holds, per tensor-parallel rank, *local* tensors (``q_proj.weight`` of
shape (h/n * d/m, H) on rank (i, j), ...) under the names of the patched module. The
:class:`ShardManifest` says, for every local tensor, which dense (unpatched, Hugging Face) tensor
it comes from, along which dim, and at which positions on each tp rank: runs of indices that do
not depend on the attention strategy, only on the model and on dp x n x m. With it, shards can be
assembled into the dense model (:func:`assemble`), cut out of it for another layout
(:func:`extract`), and a resume at another layout is either resharded exactly or refused
(:func:`plan_resume`). Everything here is pure: no process group, no DeepSpeed.

Example:
    >>> manifest = manifest_for(model, layout=(2, 2, 2))      # on any rank of a patched model
    >>> dense = assemble(manifest, [rank_tensors[r] for r in range(4)])
    >>> local = extract(other_manifest, dense, tp_rank=1)      # rank 1's shards at another layout
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

FORMAT = "ds_twolevel.checkpoint/1"
MANIFEST_NAME = "two_level.json"
"""File written into every checkpoint tag directory, last (it marks the directory complete)."""

Runs = tuple[tuple[int, int], ...]
"""[start, stop) runs of positions along a dim, in shard order."""


@dataclass(frozen=True)
class ShardEntry:
    """One local tensor: the dense tensor it belongs to and, per tp rank, where its elements are."""

    key: str
    """name of the dense (unpatched model) tensor."""
    dim: int | None
    """dim of the dense tensor the shard selects along; None: the local tensor is the whole dense one."""
    transpose: bool = False
    """the local tensor is the transpose of its dense slice (GPT-2 Conv1D stores (in, out))."""
    runs: tuple[Runs, ...] = ()
    """per tp rank, the positions along ``dim`` (empty when ``dim`` is None)."""

    def index(self, tp_rank: int) -> torch.Tensor:
        """Positions along ``dim`` held by ``tp_rank``, in shard order."""
        return torch.cat([torch.arange(a, b) for a, b in self.runs[tp_rank]])


@dataclass(frozen=True)
class ShardManifest:
    """Layout and shard coordinates of a two-level model; saved as ``two_level.json``.

    Example:
        >>> ShardManifest.read(Path("ckpt/global_step10")).layout
        (2, 2, 2)
    """

    layout: tuple[int, int, int]
    """(dp, n, m) the checkpoint was written at."""
    dense: dict[str, tuple[tuple[int, ...], str]]
    """dense tensor name -> (shape, dtype name) of the unpatched model."""
    entries: dict[str, ShardEntry]
    """local tensor name (state-dict name of the patched model) -> where it sits in ``dense``."""
    info: dict[str, Any] = field(default_factory=dict)
    """everything else (ZeRO stage, optimizer parameter order, global steps, model class and config,
    save time): see ``ds_twolevel.deepspeed.checkpoint.write_manifest``."""
    sp: int = 1
    """Ulysses sequence shards (``"sequence_parallel_size"``) the checkpoint was written at: ZeRO partitions
    the state over dp x sp ranks, whose files DeepSpeed names by their rank in that group."""

    @property
    def tp_size(self) -> int:
        return self.layout[1] * self.layout[2]

    @property
    def zero_size(self) -> int:
        """dp x sp: the ranks over which ZeRO partitions each tp rank's state (one file each)."""
        return self.layout[0] * self.sp

    def describe(self) -> str:
        dp, n, m = self.layout
        sp = f"sp={self.sp} x " if self.sp > 1 else ""
        return f"dp={dp} x {sp}n={n} x m={m}"

    def to_json(self) -> str:
        """The manifest as JSON, with ``info["digest"]``: a hash of everything else (see :func:`digest_matches`)."""
        entries = {k: {"key": e.key, "dim": e.dim, "transpose": e.transpose, "runs": [list(map(list, r)) for r in e.runs]}
                   for k, e in self.entries.items()}
        info = {k: v for k, v in self.info.items() if k != DIGEST}
        layout = {**dict(zip(("dp", "n", "m"), self.layout)), **({"sp": self.sp} if self.sp > 1 else {})}
        raw = {"format": FORMAT, "layout": layout,
               "dense": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.dense.items()},
               "entries": entries, "info": info}
        raw = json.loads(json.dumps(raw))  # the digest is taken over what a reader will see (int keys -> str)
        raw["info"][DIGEST] = _digest(raw)
        return json.dumps(raw, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest", check_digest: bool = True) -> "ShardManifest":
        """Parse a manifest; ValueError naming ``source`` when it is not valid JSON, lacks a field, or
        (``check_digest``) its content does not match its digest."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is damaged (not valid JSON: {err}); resume from another tag") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{source}: format {found!r} is not {FORMAT!r}; it was written by another "
                             f"ds_twolevel version")
        if check_digest and digest_matches(raw) is False:
            raise ValueError(f"{source}: its content does not match its digest (edited or damaged after the save); "
                             f"resume from another tag")
        try:
            layout = tuple(int(raw["layout"][k]) for k in ("dp", "n", "m"))
            sp = int(raw["layout"].get("sp", 1))
            dense = {k: (tuple(v["shape"]), v["dtype"]) for k, v in raw["dense"].items()}
            entries = {k: ShardEntry(e["key"], e["dim"], e["transpose"], tuple(tuple(map(tuple, r)) for r in e["runs"]))
                       for k, e in raw["entries"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{source} is damaged (missing or malformed field: {type(err).__name__}: {err}); "
                             f"resume from another tag") from None
        info = {k: v for k, v in raw.get("info", {}).items() if k != DIGEST}
        return cls(layout, dense, entries, info, sp)  # type: ignore[arg-type]

    @classmethod
    def read(cls, tag_dir: str | Path, *, check_digest: bool = True) -> "ShardManifest":
        """The manifest of a tag directory; ValueError naming the file when it cannot be read or parsed."""
        path = Path(tag_dir) / MANIFEST_NAME
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); resume from another tag") from None
        return cls.from_json(text, source=str(path), check_digest=check_digest)


DIGEST = "digest"
"""``info`` key of the manifest's own hash (blake2b of its canonical JSON without this key)."""


def _digest(raw: dict) -> str:
    body = {**raw, "info": {k: v for k, v in raw.get("info", {}).items() if k != DIGEST}}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def digest_matches(raw: dict | str) -> bool | None:
    """True when a manifest (its JSON text or parsed dict) matches its digest, False when it was
    edited after the save, None when it has none (written before manifests carried one)."""
    raw = json.loads(raw) if isinstance(raw, str) else raw
    stored = raw.get("info", {}).get(DIGEST)
    return None if stored is None else stored == _digest(raw)


# -- building one from a live (patched) model --------------------------------------------------------
def runs_of(index: torch.Tensor) -> Runs:
    """[start, stop) runs of consecutive values of ``index``, in order."""
    values = [int(v) for v in index.tolist()]
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return tuple(runs)


def is_partitioned(module: nn.Module) -> bool:
    """A two-level layer: it says where its shards sit (``shard_index``). Attention, MLP, and layers
    defined outside the core that keep the same protocol (``hf_integration.moe.HFTwoLevelExperts``)."""
    return callable(getattr(module, "shard_index", None))


def partitioned_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every two-level layer (attention, MLP, MoE experts), outermost first."""
    return [(p, mod) for p, mod in model.named_modules() if is_partitioned(mod)]


def _tp_size(layer: nn.Module) -> int:
    return layer.tp.size if hasattr(layer, "tp") else layer.axes.tp.size


def _owner_prefix(path: str, layer: nn.Module) -> str:
    """Prefix of the dense names of ``layer``'s tensors: the replaced Hugging Face module's path."""
    target = getattr(layer, "target", "")
    owner = path[: -len(target) - 1] if target else path
    return owner + "." if owner else ""


def _sharded_entry(layer: nn.Module, name: str, dim: int, per_rank: list[dict], prefix: str,
                   local: str) -> tuple[ShardEntry, tuple[int, ...]]:
    """The entry of one sharded tensor of ``layer`` and its dense shape."""
    maps = getattr(layer, "tensor_maps", None)
    if maps is None:  # a core layer: the dense tensor keeps the layer's own name
        shape = list(shape_of(layer.get_parameter(name)))
        shape[dim] = int(max(int(r[name][0].max()) for r in per_rank)) + 1
        runs = tuple(runs_of(r[name][0]) for r in per_rank)
        return ShardEntry(local + name, dim, False, runs), tuple(shape)
    tmap = maps[name]
    runs = tuple(runs_of(tmap.hf_index(r[name][0])) for r in per_rank)
    return ShardEntry(prefix + tmap.key, tmap.hf_dim, tmap.transpose, runs), tuple(tmap.hf_shape)


def _layer_entries(path: str, layer: nn.Module) -> tuple[dict[str, ShardEntry], dict[str, tuple[int, ...]]]:
    """Entries and dense shapes of one layer. Hugging Face layers map through their ``tensor_maps``
    (fused QKV, Conv1D); plain core layers use their own parameter names as the dense names."""
    maps = getattr(layer, "tensor_maps", None)
    prefix, local = _owner_prefix(path, layer), path + "."
    per_rank = [layer.shard_index(r) for r in range(_tp_size(layer))]
    entries, shapes = {}, {}
    for name, (_, dim) in per_rank[0].items():
        entry, shape = _sharded_entry(layer, name, dim, per_rank, prefix, local)
        entries[local + name], shapes[entry.key] = entry, shape
    replicated = {attr: core for core, attr in layer.replicated_tensors().items()} if maps is not None else {}
    for attr, param in layer.named_parameters():
        if attr in per_rank[0]:
            continue
        if maps is not None and attr not in replicated:
            raise ValueError(f"{local + attr}: neither sharded (shard_index) nor replicated (replicated_tensors) "
                             f"in {type(layer).__name__}; its place in the dense model is unknown")
        key = prefix + maps[replicated[attr]].key if maps is not None else local + attr
        entries[local + attr] = ShardEntry(key, None)
        shapes[key] = shape_of(param)
    return entries, shapes


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """The tensor's shape; for a ZeRO-3 partitioned parameter (empty until gathered) its ``ds_shape``."""
    return tuple(getattr(t, "ds_shape", t.shape))


def manifest_for(model: nn.Module, layout: tuple[int, int, int], *,
                 info: Mapping[str, Any] | None = None, sp: int = 1) -> ShardManifest:
    """The manifest of a patched model on this rank at (dp, n, m) x ``sp`` (pure: every rank computes the same one)."""
    layers = partitioned_modules(model)
    inside = tuple(p + "." for p, _ in layers)
    state = model.state_dict(keep_vars=True)
    entries: dict[str, ShardEntry] = {}
    dense: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, tensor in state.items():
        if not name.startswith(inside):  # replicated: the local tensor is the dense one
            entries[name] = ShardEntry(name, None)
            dense[name] = (shape_of(tensor), _dtype_name(tensor))
    for path, layer in layers:
        layer_entries, layer_shapes = _layer_entries(path, layer)
        entries.update(layer_entries)
        dtype = _dtype_name(next(layer.parameters()))
        dense.update({k: (s, dtype) for k, s in layer_shapes.items()})
    return ShardManifest(tuple(layout), dense, entries, dict(info or {}), sp)  # type: ignore[arg-type]


# -- resharding math ---------------------------------------------------------------------------------
def local_shape(manifest: ShardManifest, name: str, tp_rank: int = 0) -> tuple[int, ...]:
    """Shape of local tensor ``name`` on ``tp_rank``."""
    entry = manifest.entries[name]
    shape = list(manifest.dense[entry.key][0])
    if entry.dim is not None:
        shape[entry.dim] = sum(b - a for a, b in entry.runs[tp_rank])
    return tuple(reversed(shape)) if entry.transpose else tuple(shape)


def assemble(manifest: ShardManifest, local_by_rank: list[Mapping[str, torch.Tensor]], *,
             names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Dense tensors from every tp rank's local tensors (``local_by_rank[r]``: name -> tensor).

    A local tensor absent from ``local_by_rank[0]`` is skipped (e.g. optimizer moments of buffers).
    ValueError when a dense tensor is not covered completely by the shards given.
    """
    if len(local_by_rank) != manifest.tp_size:
        raise ValueError(f"{manifest.describe()} has {manifest.tp_size} tp ranks, got tensors of {len(local_by_rank)}")
    wanted = set(names) if names is not None else None
    out: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for name, entry in manifest.entries.items():
        if name not in local_by_rank[0] or (wanted is not None and entry.key not in wanted):
            continue
        if entry.dim is None:
            out[entry.key] = local_by_rank[0][name].detach().clone()
            continue
        first = local_by_rank[0][name]
        dense = out.setdefault(entry.key, first.new_empty(manifest.dense[entry.key][0]))
        mask = covered.setdefault(entry.key, torch.zeros(dense.shape[entry.dim], dtype=torch.bool))
        for r in range(manifest.tp_size):
            index = entry.index(r)
            shard = local_by_rank[r][name].detach()
            dense.index_copy_(entry.dim, index.to(dense.device), shard.t() if entry.transpose else shard)
            mask[index] = True
    _check_covered(out, covered)
    return out


def _check_covered(out: dict[str, torch.Tensor], covered: dict[str, torch.Tensor]) -> None:
    """Every position of a sharded dense tensor was written by some rank (fused tensors by q, k and v)."""
    for key, mask in covered.items():
        if not bool(mask.all()):
            missing = int((~mask).sum())
            raise ValueError(f"{key}: {missing} of {mask.numel()} positions are held by no shard; the checkpoint's "
                             f"shards do not cover the dense tensor (a missing rank or layer?)")


def extract(manifest: ShardManifest, dense: Mapping[str, torch.Tensor], tp_rank: int, *,
            names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The local tensors of ``tp_rank`` cut out of dense tensors (inverse of :func:`assemble`).

    Only local tensors whose dense tensor is in ``dense`` are returned (and of those, ``names``).
    """
    out: dict[str, torch.Tensor] = {}
    for name, entry in manifest.entries.items():
        if entry.key not in dense or (names is not None and name not in names):
            continue
        full = dense[entry.key]
        if entry.dim is None:
            out[name] = full.detach().clone()
            continue
        part = full.detach().index_select(entry.dim, entry.index(tp_rank).to(full.device))
        out[name] = (part.t() if entry.transpose else part).contiguous()
    return out


# -- resume decisions --------------------------------------------------------------------------------
def model_differences(saved: ShardManifest, current: ShardManifest, *, limit: int = 4) -> list[str]:
    """Dense tensors whose presence or shape differs between two manifests (the model changed)."""
    out = []
    for key in sorted(set(saved.dense) | set(current.dense)):
        a, b = saved.dense.get(key), current.dense.get(key)
        if a is None or b is None:
            out.append(f"{key} {'only in the checkpoint' if b is None else 'not in the checkpoint'}")
        elif tuple(a[0]) != tuple(b[0]):
            out.append(f"{key}: checkpoint {tuple(a[0])} vs model {tuple(b[0])}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def same_shards(saved: ShardManifest, current: ShardManifest) -> bool:
    """True when every rank would load its own shards: same layout and identical coordinates."""
    return saved.layout == current.layout and saved.sp == current.sp and saved.entries == current.entries


__all__ = ["DIGEST", "FORMAT", "MANIFEST_NAME", "ShardEntry", "ShardManifest", "assemble", "digest_matches", "extract",
           "local_shape", "is_partitioned", "manifest_for", "model_differences", "partitioned_modules", "runs_of", "same_shards"]
