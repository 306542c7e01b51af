"""Partition math for two-level (n head groups x m dim segments) attention.

Pure functions of (shape, layout, coordinate): no process group, no parameters. Every slice has
its inverse beside it so that shards can be gathered back into the dense layout.

Vocabulary:
    h, g    query heads and key/value heads (g divides h; h/g query heads share a KV head)
    d, dv   query/key head dim and value head dim
    n, m    head groups and dim segments; coordinate (i, j) = (head group, segment)
    atom    dims that must stay on one device: a RoPE pair, or one non-rotated dim

Layout of the fused projection outputs follows Hugging Face: feature ``head * d + dim``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

RopeStyle = Literal["none", "half", "interleaved", "interleaved_half"]
ROPE_STYLES: tuple[str, ...] = ("none", "half", "interleaved", "interleaved_half")


@dataclass(frozen=True)
class AttentionSpec:
    """Shape of one multi-head attention layer, independent of any layout.

    Example:
        >>> AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128, rope_style="half")
    """

    num_heads: int
    """h: query heads."""
    num_kv_heads: int
    """g: key/value heads (g == h for MHA, 1 for MQA)."""
    head_dim: int
    """d: query/key dims per head."""
    v_head_dim: int | None = None
    """dv: value dims per head (defaults to d)."""
    rope_style: RopeStyle = "none"
    """"half" (HF rotate_half, pairs (t, t+r/2)), "interleaved" (GPT-J, pairs (2t, 2t+1), interleaved cos/sin
    table), "interleaved_half" (GLM4, Helium: pairs (2t, 2t+1) whose cos/sin come from a half-layout table,
    ``cos[..., :r/2].repeat_interleave(2)``) or "none"."""
    rotary_dim: int | None = None
    """r: number of leading dims that are rotated (partial rotary); defaults to d when RoPE is on."""
    name: str = "model"
    """Used in error messages only."""

    def __post_init__(self) -> None:
        for field_name in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field_name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"{self.name}: rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        if self.v_head_dim is not None and self.v_head_dim < 1:
            raise ValueError(f"{self.name}: v_head_dim must be positive, got {self.v_head_dim}")
        r = self.rot_dim
        if r % 2 or r > self.head_dim or r < 0:
            raise ValueError(
                f"{self.name}: rotary_dim ({r}) must be even and at most head_dim ({self.head_dim})"
            )

    @property
    def dv(self) -> int:
        """Value head dim."""
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @property
    def rot_dim(self) -> int:
        """Number of rotated dims r (0 without RoPE)."""
        if self.rope_style == "none":
            return 0
        return self.head_dim if self.rotary_dim is None else self.rotary_dim


def dim_atoms(spec: AttentionSpec) -> list[tuple[int, ...]]:
    """The head dims grouped into atoms: RoPE pairs first, then single non-rotated dims.

    Example:
        >>> dim_atoms(AttentionSpec(1, 1, 4, rope_style="half"))
        [(0, 2), (1, 3)]
    """
    r, d = spec.rot_dim, spec.head_dim
    if spec.rope_style == "half":
        pairs = [(t, t + r // 2) for t in range(r // 2)]
    elif spec.rope_style in ("interleaved", "interleaved_half"):
        pairs = [(2 * t, 2 * t + 1) for t in range(r // 2)]
    else:
        pairs = []
    return pairs + [(t,) for t in range(r, d)]


def _divisors(x: int) -> list[int]:
    return [k for k in range(1, x + 1) if x % k == 0]


def segment_problem(spec: AttentionSpec, m: int) -> str | None:
    """Why the head dim cannot be cut into m balanced segments (None when it can)."""
    r, d, dv = spec.rot_dim, spec.head_dim, spec.dv
    if (r // 2) % m:
        return f"the {r // 2} RoPE pairs of head_dim {d} do not split into m={m} equal segments"
    if (d - r) % m:
        return f"the {d - r} non-rotated dims of head_dim {d} do not split into m={m} equal segments"
    if dv % m:
        return f"v_head_dim ({dv}) is not divisible by m={m}"
    return None


def head_problem(spec: AttentionSpec, n: int, kv_replication: bool) -> str | None:
    """Why the heads cannot be cut into n groups (None when they can)."""
    h, g = spec.num_heads, spec.num_kv_heads
    if h % n:
        return f"num_heads ({h}) is not divisible by n={n}"
    if g % n == 0:
        return None
    if n % g == 0 and kv_replication:
        return None
    if n % g == 0:
        return (
            f"num_key_value_heads ({g}) is not divisible by n={n}; pass kv_replication=True to "
            f"replicate each KV head on {n // g} head groups (costs KV memory)"
        )
    return f"num_key_value_heads ({g}) and n={n} do not divide one another"


def feasible_layouts(
    spec: AttentionSpec, devices: int, *, kv_replication: bool = False
) -> list[tuple[int, int]]:
    """All (n, m) with n*m == devices that partition ``spec`` (head-wise first: largest n)."""
    fits = []
    for n in sorted(_divisors(devices), reverse=True):
        m = devices // n
        if head_problem(spec, n, kv_replication) is None and segment_problem(spec, m) is None:
            fits.append((n, m))
    return fits


def _fits_text(spec: AttentionSpec, devices: int) -> str:
    def listed(p: int) -> str:
        return ", ".join(f"n={a} x m={b}" for a, b in feasible_layouts(spec, p))

    if feasible_layouts(spec, devices):
        return f"layouts that fit {devices} devices: {listed(devices)}"
    below = next((p for p in range(devices - 1, 0, -1) if feasible_layouts(spec, p)), None)
    above = next((p for p in range(devices + 1, 4 * devices + 2) if feasible_layouts(spec, p)), None)
    near = "; ".join(f"{p} devices: {listed(p)}" for p in (below, above) if p)
    return f"no n x m layout fits {devices} devices (nearest that fit: {near})"


def check_partition(spec: AttentionSpec, n: int, m: int, *, kv_replication: bool = False) -> None:
    """Raise ValueError naming the numbers and the layouts that fit, if (n, m) cannot split spec."""
    for label, value in (("n", n), ("m", m)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    problem = head_problem(spec, n, kv_replication) or segment_problem(spec, m)
    if problem:
        raise ValueError(f"{spec.name}: {problem}; {_fits_text(spec, n * m)}")


@dataclass(frozen=True)
class AttentionPartition:
    """Which heads, dims and weight rows/columns partition (i, j) owns.

    Example:
        >>> part = AttentionPartition(AttentionSpec(8, 2, 16, rope_style="half"), n=2, m=2)
        >>> part.q_rows(0, 1).numel()   # 4 heads x 8 dims
        32
    """

    spec: AttentionSpec
    n: int
    m: int
    kv_replication: bool = False

    def __post_init__(self) -> None:
        check_partition(self.spec, self.n, self.m, kv_replication=self.kv_replication)

    # -- heads ---------------------------------------------------------------------------------
    @property
    def local_heads(self) -> int:
        """h/n query heads per group."""
        return self.spec.num_heads // self.n

    @property
    def local_kv_heads(self) -> int:
        """g/n KV heads per group (1 when KV heads are replicated, n > g)."""
        return max(self.spec.num_kv_heads // self.n, 1)

    @property
    def replicated_kv(self) -> bool:
        """True when each KV head lives on several head groups."""
        return self.n > self.spec.num_kv_heads

    def q_heads(self, i: int) -> list[int]:
        """Query heads of group i (contiguous, so GQA sharing is preserved)."""
        hl = self.local_heads
        return list(range(i * hl, (i + 1) * hl))

    def kv_heads(self, i: int) -> list[int]:
        """KV heads of group i: those used by its query heads."""
        per_kv = self.spec.num_heads // self.spec.num_kv_heads
        first = self.q_heads(i)[0] // per_kv
        return list(range(first, first + self.local_kv_heads))

    # -- dims ----------------------------------------------------------------------------------
    @property
    def local_dim(self) -> int:
        """d/m query/key dims per segment."""
        return self.spec.head_dim // self.m

    @property
    def local_v_dim(self) -> int:
        """dv/m value dims per segment."""
        return self.spec.dv // self.m

    def qk_dims(self, j: int) -> list[int]:
        """Global head dims of segment j in local order: its RoPE atoms, then its plain dims.

        Both halves of each RoPE pair land in the segment, so RoPE is applied locally.
        """
        r, d, m = self.spec.rot_dim, self.spec.head_dim, self.m
        pairs_per_seg, plain_per_seg = (r // 2) // m, (d - r) // m
        pairs = dim_atoms(self.spec)[: r // 2][j * pairs_per_seg : (j + 1) * pairs_per_seg]
        if self.spec.rope_style == "half":  # local layout [t..., t+r/2...] keeps rotate_half shape
            rot = [a for a, _ in pairs] + [b for _, b in pairs]
        else:
            rot = [t for pair in pairs for t in pair]
        plain = list(range(r + j * plain_per_seg, r + (j + 1) * plain_per_seg))
        return rot + plain

    def v_dims(self, j: int) -> list[int]:
        """Global value dims of segment j (contiguous: V needs no atoms)."""
        dvl = self.local_v_dim
        return list(range(j * dvl, (j + 1) * dvl))

    def rope_tables(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos_index, partner, sign) that apply RoPE to segment j's local dims.

        ``rot(x)[u] = sign[u] * x[partner[u]]``; ``cos_index[u]`` indexes the full rotary cos/sin
        table padded with one trailing column (cos 1, sin 0) that non-rotated dims point to.
        """
        dims = self.qk_dims(j)
        pos = {g: u for u, g in enumerate(dims)}
        r, half = self.spec.rot_dim, self.spec.rot_dim // 2
        cos_index, partner, sign = [], [], []
        for u, t in enumerate(dims):
            if t >= r:
                cos_index.append(r), partner.append(u), sign.append(0.0)
            elif self.spec.rope_style == "half":
                mate = t + half if t < half else t - half
                cos_index.append(t), partner.append(pos[mate]), sign.append(-1.0 if t < half else 1.0)
            else:  # pairs (2u, 2u+1): frequency u sits at table column 2u+t%2 (interleaved) or u (half table)
                mate = t + 1 if t % 2 == 0 else t - 1
                column = t // 2 if self.spec.rope_style == "interleaved_half" else t
                cos_index.append(column), partner.append(pos[mate]), sign.append(-1.0 if t % 2 == 0 else 1.0)
        return torch.tensor(cos_index), torch.tensor(partner), torch.tensor(sign)

    # -- weight rows/columns -------------------------------------------------------------------
    @staticmethod
    def _features(heads: Sequence[int], dims: Sequence[int], head_size: int) -> torch.Tensor:
        heads_t = torch.tensor(list(heads)).unsqueeze(1)
        dims_t = torch.tensor(list(dims)).unsqueeze(0)
        return (heads_t * head_size + dims_t).reshape(-1)  # (heads * dims,) head-major

    def q_rows(self, i: int, j: int) -> torch.Tensor:
        """Output features of W_q (rows of an nn.Linear weight) owned by (i, j)."""
        return self._features(self.q_heads(i), self.qk_dims(j), self.spec.head_dim)

    def k_rows(self, i: int, j: int) -> torch.Tensor:
        """Output features of W_k owned by (i, j)."""
        return self._features(self.kv_heads(i), self.qk_dims(j), self.spec.head_dim)

    def v_rows(self, i: int, j: int) -> torch.Tensor:
        """Output features of W_v owned by (i, j)."""
        return self._features(self.kv_heads(i), self.v_dims(j), self.spec.dv)

    def o_cols(self, i: int, j: int) -> torch.Tensor:
        """Input features of W_o (columns of an nn.Linear weight) owned by (i, j)."""
        return self._features(self.q_heads(i), self.v_dims(j), self.spec.dv)

    def coordinates(self) -> list[tuple[int, int]]:
        """All (i, j) in tensor-parallel rank order (tp_rank = i*m + j)."""
        return [(i, j) for i in range(self.n) for j in range(self.m)]


def shard_dim(weight: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """The slice of ``weight`` at positions ``index`` along ``dim`` (a copy)."""
    return weight.index_select(dim, index.to(weight.device)).clone()


def unshard_dim(
    shards: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int, dim: int
) -> torch.Tensor:
    """Inverse of :func:`shard_dim`: place each (index, shard) back into a dense tensor.

    Raises ValueError if the shards do not cover every position exactly once (positions owned
    by several shards, as with replicated KV heads, must agree).
    """
    first = shards[0][1]
    shape = list(first.shape)
    shape[dim] = size
    dense = first.new_zeros(shape)
    owned = torch.zeros(size, dtype=torch.bool)
    for index, shard in shards:
        index = index.to(torch.long)
        again = owned[index]
        if again.any():  # replicated (e.g. KV heads with n > g): the copies must agree
            seen = index[again].to(dense.device)
            mine = again.nonzero().flatten().to(shard.device)
            if not torch.equal(dense.index_select(dim, seen), shard.index_select(dim, mine)):
                raise ValueError(f"replicated shards disagree at positions {seen.tolist()[:8]}")
        dense.index_copy_(dim, index.to(dense.device), shard)
        owned[index] = True
    if not bool(owned.all()):
        missing = (~owned).nonzero().flatten().tolist()[:8]
        raise ValueError(f"shards leave positions {missing} (of {size}) unowned")
    return dense


def even_chunk(size: int, parts: int, index: int, *, what: str = "size") -> tuple[int, int]:
    """[start, stop) of chunk ``index`` when ``size`` is split into ``parts`` equal chunks."""
    if size % parts:
        raise ValueError(f"{what} ({size}) is not divisible by {parts} tensor-parallel ranks")
    step = size // parts
    return index * step, (index + 1) * step
