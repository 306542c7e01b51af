"""Hardware profiles for the cost model, as data, plus the routine that calibrates the CPU one.

A profile gives the numbers the roofline + bandwidth model needs: peak matmul FLOP/s, memory
bandwidth, collective bus bandwidth inside and across nodes, a fixed latency per collective,
and memory capacity. Bus bandwidth follows nccl-tests' definition, so the time of a ring
collective is ``ring_bytes / bus_bandwidth`` (``ring_bytes`` = bytes one rank sends).

Sources of the H100 numbers (see docs/performance.md):
    * dense FP16/BF16 tensor-core peak 989 TFLOP/s, HBM3 3.35 TB/s, 80 GB: NVIDIA H100 datasheet
      (SXM5 column; the 1979 TFLOP/s figure is with 2:4 sparsity).
    * ~450 GB/s all-reduce bus bandwidth on 8 GPUs over NVLink 4 / NVSwitch (900 GB/s
      bidirectional per GPU): NVIDIA's nccl-tests results for DGX H100 reach 450-480 GB/s busbw
      at large messages.
    * ~45 GB/s across nodes: one 400 Gb/s ConnectX-7 NIC per GPU = 50 GB/s line rate, ~45 GB/s
      achieved busbw.
    * 10 us per collective: NCCL small-message all-reduce latency on one NVLink node is of that
      order (assumed, not measured here).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator type and its interconnect.

    Example:
        >>> H100_SXM.peak_flops / 1e12
        989.0
    """

    name: str
    """short name used on the command line ("h100", "cpu")."""
    peak_flops: float
    """dense matmul FLOP/s per device at the profile's dtype."""
    mem_bandwidth: float
    """device-memory bandwidth, bytes/s."""
    intra_node_busbw: float
    """collective bus bandwidth, bytes/s, for a group inside one node."""
    inter_node_busbw: float
    """collective bus bandwidth, bytes/s, for a group spanning nodes (per-GPU NIC)."""
    devices_per_node: int
    """devices sharing the fast intra-node interconnect."""
    collective_latency: float
    """fixed seconds per collective call (start-up, synchronisation)."""
    memory_bytes: float
    """device memory capacity, bytes."""
    dtype_bytes: int = 2
    """element size the peak refers to (2 = FP16/BF16, 4 = FP32)."""
    source: str = ""
    """where the numbers come from."""

    def busbw(self, group_span: int) -> float:
        """Bus bandwidth of a group of ``group_span`` consecutive ranks (rank layout: m fastest)."""
        return self.intra_node_busbw if group_span <= self.devices_per_node else self.inter_node_busbw


H100_SXM = HardwareProfile(
    name="h100",
    peak_flops=989e12,
    mem_bandwidth=3.35e12,
    intra_node_busbw=450e9,
    inter_node_busbw=45e9,
    devices_per_node=8,
    collective_latency=10e-6,
    memory_bytes=80e9,
    dtype_bytes=2,
    source="NVIDIA H100 SXM5 datasheet; nccl-tests DGX H100; 400 Gb/s NIC per GPU",
)

# Measured on the project's 2-core CPU machine with `python -m ds_twolevel.costmodel.hardware` (torch 2.13
# CPU, gloo, 1 thread per rank, 2 ranks, 16 MiB all-reduce; FP32; 2026-11-26). The machine is shared:
# five runs gave 45-113 GFLOP/s, 20-36 GB/s copy bandwidth, 1.1-1.5 GB/s all-reduce busbw and 66-103 us
# small all-reduce latency; the best of each is stored. Re-run calibrate() on another machine.
CPU_GLOO = HardwareProfile(
    name="cpu",
    peak_flops=113e9,
    mem_bandwidth=36e9,
    intra_node_busbw=1.46e9,
    inter_node_busbw=1.46e9,
    devices_per_node=2,
    collective_latency=66e-6,
    memory_bytes=23e9,
    dtype_bytes=4,
    source="calibrate() on the 2-core dev machine (best of 5 runs), fp32, gloo over loopback",
)

PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (H100_SXM, CPU_GLOO)}


def get_profile(name: str) -> HardwareProfile:
    """Profile by name; ValueError listing the known ones otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


def default_profile(device: torch.device | str | None = None) -> HardwareProfile:
    """The profile "cost_model" plans with for tensors on ``device``: the accelerator profile (H100 SXM, the
    one GPU profile here) for an accelerator, the CPU profile for ``"cpu"``, ``"meta"`` or None."""
    kind = torch.device(device).type if device is not None else "cpu"
    return CPU_GLOO if kind in ("cpu", "meta") else H100_SXM


def profile(spec: "HardwareProfile | str | None", device: torch.device | str | None = None) -> HardwareProfile:
    """A profile given as itself, by name (:func:`get_profile`), or None (:func:`default_profile` of ``device``)."""
    if spec is None:
        return default_profile(device)
    return spec if isinstance(spec, HardwareProfile) else get_profile(spec)


# -- calibration -----------------------------------------------------------------------------------
def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_flops(size: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``repeats`` FLOP/s of one (size x size) @ (size x size) matmul in this process."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _best_time(lambda: a @ b, repeats)


def measure_mem_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(mbytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), repeats)


def _allreduce_rank(numel: int, repeats: int) -> tuple[float, float]:
    """(busbw bytes/s, small-message latency s) of gloo all-reduce on this rank's world."""
    import torch.distributed as dist

    from ds_twolevel.parallel.collectives import ring_bytes

    p = dist.get_world_size()
    big, small = torch.ones(numel), torch.ones(1)
    t_big = _best_time(lambda: dist.all_reduce(big), repeats)
    t_small = _best_time(lambda: dist.all_reduce(small), repeats * 4)
    return ring_bytes("all_reduce", numel * 4, p) / t_big, t_small


def calibrate(ranks: int = 2, numel: int = 4 * 2**20, repeats: int = 5) -> HardwareProfile:
    """Measure this machine (one thread per rank) and return a profile named "cpu-measured"."""
    from ds_twolevel.testing.ranks import run_distributed

    torch.set_num_threads(1)
    flops = measure_matmul_flops()
    bandwidth = measure_mem_bandwidth()
    busbw, latency = run_distributed(_allreduce_rank, ranks, numel, repeats)[0]
    return replace(CPU_GLOO, name="cpu-measured", peak_flops=flops, mem_bandwidth=bandwidth,
                   intra_node_busbw=busbw, inter_node_busbw=busbw, collective_latency=latency,
                   source=f"calibrate(ranks={ranks}, numel={numel}) at {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    for key, value in asdict(calibrate()).items():
        print(f"{key:>20}: {value:.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
