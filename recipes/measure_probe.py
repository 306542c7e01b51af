"""What the parity probe costs: patch_model and load_partitioned with and without it.

    python recipes/measure_probe.py            # 4 ranks, n=2 x m=2, the ~90M-parameter Llama of measure_lazy_load

Each rank times ``patch_model`` of a dense model and ``load_partitioned`` of its checkpoint, each with
``probe=True`` and ``probe=False`` (the best of ``--repeat`` runs), and records how much its peak RSS
(VmHWM) grows during a probed and an unprobed ``load_partitioned`` (separate launches: a peak only rises).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_lazy_load import peak_rss_mib, warm_up, write_checkpoint  # noqa: E402

from ds_twolevel.testing import run_distributed  # noqa: E402
from hf_integration import load_partitioned, patch_model  # noqa: E402


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def rank_times(directory: str, n: int, m: int, repeat: int) -> dict:
    """Seconds of patch_model / load_partitioned with and without the probe."""
    mesh = warm_up(directory, n, m)
    dense = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    out = {}
    for probe in (False, True):
        out[f"patch probe={probe}"] = _best(lambda: patch_model(copy.deepcopy(dense), mesh, probe=probe), repeat)
        out[f"load probe={probe}"] = _best(lambda: load_partitioned(directory, mesh, probe=probe), repeat)
    return out


def rank_memory(directory: str, n: int, m: int, probe: bool) -> float:
    """Peak RSS growth (MiB) of one load_partitioned."""
    mesh = warm_up(directory, n, m)
    before = peak_rss_mib()
    model, _ = load_partitioned(directory, mesh, probe=probe)
    return peak_rss_mib() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=2)
    args = parser.parse_args()
    world = args.n * args.m
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = write_checkpoint(Path(tmp), args)
        print(f"checkpoint: {nbytes / 2**20:.0f} MiB fp32, {args.layers} layers, {world} ranks (n={args.n} x m={args.m})")
        times = run_distributed(rank_times, world, tmp, args.n, args.m, args.repeat, timeout=1800)
        for key in times[0]:
            print(f"{key:<22} {max(t[key] for t in times):6.2f} s (slowest rank)")
        for probe in (False, True):
            grown = run_distributed(rank_memory, world, tmp, args.n, args.m, probe, timeout=1800)
            print(f"load probe={probe!s:<5}  peak RSS growth per rank {min(grown):.0f}-{max(grown):.0f} MiB")


if __name__ == "__main__":
    main()
