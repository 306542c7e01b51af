"""The dp x sp x n x m layout: one validated object that builds the device mesh and hands out groups.

Ranks are laid out with the segment axis fastest: ``rank = ((dp_rank * sp + u) * n + i) * m + j``, so the m
ranks of one head group, one per segment (the chattiest group: scores, norms, q/k gathers), are
neighbours, i.e. on one node / one NVLink island whenever m divides the GPUs per node; the n*m ranks of
a layer are contiguous too. ``sp`` is DeepSpeed's Ulysses sequence axis (``"sequence_parallel_size"``),
outside the two-level group: the n*m ranks of a layer hold the same s/sp tokens (DESIGN.md section 8);
sp = 1 (the default) is the dp x n x m layout.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
# Private torch API (checked with torch 2.13; listed in ds_twolevel/deepspeed/compat.py, which the core may not
# import): no public name exists for the options type that init_device_mesh(backend_override=) takes (torch's own
# device_mesh.py imports it from here); also Options._timeout, DeviceMesh._flatten / _unflatten below.
# If they change, building a mesh fails with ImportError / AttributeError (loud, before any data moves).
from torch._C._distributed_c10d import Backend as C10dBackend

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
MESH_AXES = ("dp", "n", "m")
ULYSSES_AXES = ("dp", "sp", "n", "m")
"""the mesh's axes when sp > 1 (with sp = 1 the mesh keeps the three of MESH_AXES)."""


@dataclass(frozen=True)
class AxisGroup:
    """One mesh axis as the layers see it: a process group (None when the axis has one rank, or for a
    simulated axis of several ranks in one process: see ``collectives.simulated``)."""

    name: str
    """"m" (segments), "n" (head groups), "tp" (n*m) or "dp"."""
    size: int
    rank: int
    group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    reduce_dtype: torch.dtype | None = field(default=None, compare=False, repr=False)
    """dtype the sums over this axis (all-reduce, reduce-scatter) run in when it is wider than the
    tensor's: a 16-bit tensor is summed in fp32 and cast back once. None: in the tensor's own dtype.
    The layers set it (their ``reduce_dtype`` argument, see :meth:`TwoLevelAxes.reducing_in`)."""

    @staticmethod
    def single(name: str) -> "AxisGroup":
        """A one-rank axis: collectives over it are no-ops."""
        return AxisGroup(name=name, size=1, rank=0, group=None)


@dataclass(frozen=True)
class TwoLevelAxes:
    """The groups one partitioned layer needs, and its coordinate (i, j)."""

    seg: AxisGroup
    """m ranks sharing head group i: score / norm all-reduces, q/k all-gathers."""
    heads: AxisGroup
    """n ranks sharing segment j: gradients of per-dim weights shared by all heads (q/k norm)."""
    tp: AxisGroup
    """the n*m ranks of one layer: output all-reduce, MLP."""
    dp: AxisGroup = AxisGroup.single("dp")
    """data-parallel replicas (ZeRO, gradient averaging)."""
    kv_rep: AxisGroup = AxisGroup.single("kv_rep")
    """head groups holding copies of the same KV head when n > g (see ``TwoLevelMesh.axes_for``)."""
    sp: AxisGroup = AxisGroup.single("sp")
    """Ulysses' sequence axis: the sp layer groups that hold the same shards and different s/sp tokens."""
    sdp: AxisGroup | None = None
    """dp x sp: the ranks holding the same shards (ZeRO shards and sums gradients over them); None: ``dp``."""

    @property
    def i(self) -> int:
        """Head-group coordinate."""
        return self.heads.rank

    @property
    def j(self) -> int:
        """Segment coordinate."""
        return self.seg.rank

    @property
    def n(self) -> int:
        return self.heads.size

    @property
    def m(self) -> int:
        return self.seg.size

    @property
    def zero(self) -> AxisGroup:
        """The ranks holding the same shards: dp, or dp x sp under Ulysses (ZeRO's group)."""
        return self.dp if self.sdp is None else self.sdp

    def reducing_in(self, dtype: torch.dtype | None) -> "TwoLevelAxes":
        """These axes with every sum over them run in ``dtype`` (when wider than the tensor's; None: in
        the tensor's dtype). The process groups are the same objects.

        Example:
            >>> TwoLevelAxes.single().reducing_in(torch.float32).tp.reduce_dtype
            torch.float32
        """
        return TwoLevelAxes(*(replace(getattr(self, f), reduce_dtype=dtype)
                              for f in ("seg", "heads", "tp", "dp", "kv_rep", "sp")), sdp=self.sdp)

    @staticmethod
    def single() -> "TwoLevelAxes":
        """m = n = dp = 1 in one process (no process group needed)."""
        return TwoLevelAxes(AxisGroup.single("m"), AxisGroup.single("n"), AxisGroup.single("tp"))


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def factorizations(world_size: int) -> list[tuple[int, int, int]]:
    """Every (dp, n, m) whose product is world_size."""
    out = []
    for dp in range(1, world_size + 1):
        if world_size % dp:
            continue
        rest = world_size // dp
        out += [(dp, n, rest // n) for n in range(1, rest + 1) if rest % n == 0]
    return out


@dataclass(frozen=True)
class TwoLevelLayout:
    """dp x sp x n x m: data-parallel replicas x Ulysses sequence shards x head groups x head-dim segments.

    Example:
        >>> layout = TwoLevelLayout(n=2, m=2, dp=2)
        >>> layout.world_size, layout.coordinate(5)
        (8, (1, 0, 1))
        >>> TwoLevelLayout(n=1, m=2, sp=2).world_size
        4
    """

    n: int
    """head groups (h/n query heads per rank)."""
    m: int
    """head-dim segments (d/m dims per rank)."""
    dp: int = 1
    """data-parallel replicas."""
    sp: int = 1
    """Ulysses sequence shards (DeepSpeed's ``"sequence_parallel_size"``), outside the n*m ranks of a layer."""

    def __post_init__(self) -> None:
        for name in ("n", "m", "dp", "sp"):
            _positive_int(name, getattr(self, name))

    @property
    def tp_size(self) -> int:
        """Ranks sharing one layer: n*m."""
        return self.n * self.m

    @property
    def world_size(self) -> int:
        return self.dp * self.sp * self.n * self.m

    def describe(self) -> str:
        """"dp=2 x n=1 x m=2", with "sp=2 x" when sp > 1."""
        sp = f"sp={self.sp} x " if self.sp > 1 else ""
        return f"dp={self.dp} x {sp}n={self.n} x m={self.m}"

    @classmethod
    def from_world_size(cls, world_size: int, *, n: int, m: int, sp: int = 1) -> "TwoLevelLayout":
        """Derive dp = world_size / (sp*n*m); ValueError naming the layouts that fit otherwise."""
        _positive_int("n", n), _positive_int("m", m), _positive_int("world_size", world_size), _positive_int("sp", sp)
        if world_size % (sp * n * m):
            fits = ", ".join(f"n={a} x m={b}" for d, a, b in factorizations(world_size) if d == 1)
            where = f"sp*n*m = {sp}*{n}*{m} = {sp * n * m}" if sp > 1 else f"n*m = {n}*{m} = {n * m}"
            raise ValueError(
                f"world size {world_size} is not a multiple of {where}; "
                f"n x m layouts for {world_size} ranks: {fits} (or a divisor of it times dp{' x sp' if sp > 1 else ''})"
            )
        return cls(n=n, m=m, dp=world_size // (sp * n * m), sp=sp)

    def coordinate(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, i, j) of a global rank (its sp coordinate: :meth:`sp_rank`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return rank // (self.sp * self.tp_size), (rank // self.m) % self.n, rank % self.m

    def sp_rank(self, rank: int) -> int:
        """The Ulysses sequence coordinate of a global rank (which s/sp tokens it holds)."""
        return (rank // self.tp_size) % self.sp

    def check_world(self, world_size: int) -> None:
        """ValueError unless world_size == dp*sp*n*m."""
        if world_size != self.world_size:
            fits = ", ".join(f"dp={d} x n={a} x m={b}" for d, a, b in factorizations(world_size))
            raise ValueError(
                f"layout {self.describe()} needs {self.world_size} ranks but "
                f"the world has {world_size}; layouts for {world_size} ranks: {fits}"
            )

    def build(
        self, *, device_type: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
    ) -> "TwoLevelMesh":
        """Build the mesh over the initialised default process group (or none for 1 rank)."""
        if not dist.is_available() or not dist.is_initialized():
            self.check_world(1)
            return TwoLevelMesh(self, None, TwoLevelAxes.single())
        self.check_world(dist.get_world_size())
        return TwoLevelMesh.create(self, device_type=device_type, timeout=timeout)


def _default_device_type() -> str:
    backend = dist.get_backend()
    if backend == "gloo":
        return "cpu"
    return torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"


def _group_options(backend: str, timeout: datetime.timedelta) -> C10dBackend.Options:
    """Options for the mesh's sub-groups, carrying ``timeout`` (DeviceMesh passes ``_timeout`` on
    to ``new_group``; sub-groups otherwise get c10d's default of 10 or 30 minutes). NCCL accepts
    only its own ``ProcessGroupNCCL.Options`` (c10d asserts so), the others the generic class."""
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False  # c10d's own default for NCCL groups
    else:
        options = C10dBackend.Options(backend)
    options._timeout = timeout
    return options


def _override(config: tuple[str, datetime.timedelta]) -> tuple[str, C10dBackend.Options]:
    """A DeviceMesh backend_override entry with options of its own (c10d writes group names and
    ranks into the options object it is given, so no two axes share one)."""
    backend, timeout = config
    return backend, _group_options(backend, timeout)


def _axis(name: str, sub) -> AxisGroup:
    """The AxisGroup of a one-dimensional DeviceMesh."""
    return AxisGroup(name, sub.size(), sub.get_local_rank(), sub.get_group())


def _kv_rep_axes(mesh, axes: TwoLevelAxes, n: int, config: tuple[str, datetime.timedelta]
                 ) -> dict[int, TwoLevelAxes]:
    """g -> axes with the "kv_rep" group of n/g consecutive head groups, for every g < n dividing n
    (the "n" axis unflattened into (kv_head, kv_rep); g ascending, the same order on every rank)."""
    out = {}
    for g in (g for g in range(1, n) if n % g == 0):
        sub = mesh._unflatten("n", (g, n // g), ("kv_head", "kv_rep"),
                              backend_override={a: _override(config) for a in ("kv_head", "kv_rep")})
        out[g] = replace(axes, kv_rep=_axis("kv_rep", sub["kv_rep"]))
    return out


class TwoLevelMesh:
    """A built layout: the DeviceMesh (axes "dp", "n", "m", plus flattened "tp") and its groups.

    It also duck-types DeepSpeed's ``mpu``: model parallel = the n*m ranks of a layer.
    """

    def __init__(self, layout: TwoLevelLayout, mesh, axes: TwoLevelAxes,
                 axes_by_kv: dict[int, TwoLevelAxes] | None = None) -> None:
        self.layout = layout
        self.mesh = mesh
        self.axes = axes
        self._axes_by_kv: dict[int, TwoLevelAxes] = dict(axes_by_kv or {})
        """g -> the axes of a layer with g KV heads (g < n, g | n), kv_rep built with the mesh."""

    def axes_for(self, num_kv_heads: int) -> TwoLevelAxes:
        """The axes for a layer with ``num_kv_heads`` KV heads (a look-up: no collective).

        When n > g each KV head is held by n/g consecutive head groups; their gradients are
        summed over the "kv_rep" axis, whose groups :meth:`create` built for every g that divides n.
        """
        n = self.layout.n
        if n <= num_kv_heads or n % num_kv_heads:
            return self.axes
        if num_kv_heads not in self._axes_by_kv:  # a hand-made mesh without groups (tests)
            raise ValueError(f"this mesh has no kv_rep group for {num_kv_heads} KV heads (n={n}); build the mesh "
                             f"with TwoLevelLayout(n=, m=, dp=).build()")
        return self._axes_by_kv[num_kv_heads]

    @classmethod
    def create(
        cls, layout: TwoLevelLayout, *, device_type: str | None, timeout: datetime.timedelta
    ) -> "TwoLevelMesh":
        """Build every sub-mesh now, on every rank in the same order: dp, n, m, tp and the kv_rep
        groups of each replication factor (so no layer constructor creates a group later)."""
        from torch.distributed.device_mesh import init_device_mesh

        device_type = device_type or _default_device_type()
        config = (dist.get_backend(), timeout)
        if layout.sp > 1:
            return cls._create_ulysses(layout, device_type, config)
        override = {name: _override(config) for name in MESH_AXES}
        mesh = init_device_mesh(
            device_type, (layout.dp, layout.n, layout.m), mesh_dim_names=MESH_AXES,
            backend_override=override,
        )
        tp_mesh = mesh["n", "m"]._flatten("tp", backend_override=_override(config))
        axes = TwoLevelAxes(
            seg=_axis("m", mesh["m"]), heads=_axis("n", mesh["n"]), tp=_axis("tp", tp_mesh),
            dp=_axis("dp", mesh["dp"]),
        )
        return cls(layout, mesh, axes, _kv_rep_axes(mesh, axes, layout.n, config))

    @classmethod
    def _create_ulysses(cls, layout: TwoLevelLayout, device_type: str,
                        config: tuple[str, datetime.timedelta]) -> "TwoLevelMesh":
        """The (dp, sp, n, m) mesh: tp = (n, m) flattened, sdp = (dp, sp) flattened (ZeRO's group)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (layout.dp, layout.sp, layout.n, layout.m), mesh_dim_names=ULYSSES_AXES,
                                backend_override={name: _override(config) for name in ULYSSES_AXES})
        tp_mesh = mesh["n", "m"]._flatten("tp", backend_override=_override(config))
        sdp_mesh = mesh["dp", "sp"]._flatten("sdp", backend_override=_override(config))
        axes = TwoLevelAxes(
            seg=_axis("m", mesh["m"]), heads=_axis("n", mesh["n"]), tp=_axis("tp", tp_mesh),
            dp=_axis("dp", mesh["dp"]), sp=_axis("sp", mesh["sp"]), sdp=_axis("sdp", sdp_mesh),
        )
        return UlyssesMesh(layout, mesh, axes, _kv_rep_axes(mesh, axes, layout.n, config))

    def __repr__(self) -> str:
        a = self.axes
        sp = f", sp={self.layout.sp}" if self.layout.sp > 1 else ""
        sp_rank = f", sp_rank={a.sp.rank}" if self.layout.sp > 1 else ""
        return (f"TwoLevelMesh(dp={self.layout.dp}{sp}, n={self.layout.n}, m={self.layout.m}; "
                f"this rank: dp_rank={a.dp.rank}{sp_rank}, i={a.i}, j={a.j})")

    # -- DeepSpeed mpu duck type ---------------------------------------------------------------
    def get_model_parallel_group(self):
        return self.axes.tp.group

    def get_model_parallel_rank(self) -> int:
        return self.axes.tp.rank

    def get_model_parallel_world_size(self) -> int:
        return self.axes.tp.size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.axes.dp.group

    def get_data_parallel_rank(self) -> int:
        return self.axes.dp.rank

    def get_data_parallel_world_size(self) -> int:
        return self.axes.dp.size


class UlyssesMesh(TwoLevelMesh):
    """A dp x sp x n x m mesh (sp > 1): the mpu also answers DeepSpeed's sequence-parallel questions.

    DeepSpeed's groups (``deepspeed.utils.groups``) ask the mpu for these. The engine and ZeRO then shard
    over, and sum gradients across, the sequence-data-parallel group (dp x sp), dividing by its size / sp
    = dp: summing each rank's share of the loss over sp is exact. ``initialize_sequence_parallel`` is
    deliberately absent (DeepSpeed's own Ulysses mpu has it, and with it DeepSpeed ignores the mpu's
    model-parallel group, which two-level's gradient norm needs).
    """

    def get_sequence_parallel_group(self):
        return self.axes.sp.group

    def get_sequence_parallel_rank(self) -> int:
        return self.axes.sp.rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.axes.sp.size

    def get_sequence_data_parallel_group(self):
        return self.axes.zero.group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.axes.zero.rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.axes.zero.size
