"""The per-shard grid again in a fresh process with transparent huge pages behind the CPU allocator."""
from __future__ import annotations

import os

import torch

from ds_twolevel.tools.bench.config import BenchConfig
from ds_twolevel.tools.bench.shard import shard_compute


def _shard_compute_child(cfg: BenchConfig) -> list[dict]:
    torch.set_num_threads(1)
    return shard_compute(cfg)


def shard_compute_thp(cfg: BenchConfig) -> list[dict]:
    """:func:`shard_compute` again in a fresh process whose CPU allocator backs tensors of 2 MB and
    more with transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE=1``, read once at start).

    The score path allocates tensors of tens of MB each call (the fused dense kernel does not):
    with 4 KB pages every call page-faults through them again; this run shows how much of the
    per-shard ratio is that.
    """
    import concurrent.futures
    import multiprocessing

    saved = os.environ.get("THP_MEM_ALLOC_ENABLE")
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # inherited by the spawned child
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_shard_compute_child, cfg).result()
    finally:
        if saved is None:
            del os.environ["THP_MEM_ALLOC_ENABLE"]
        else:
            os.environ["THP_MEM_ALLOC_ENABLE"] = saved
