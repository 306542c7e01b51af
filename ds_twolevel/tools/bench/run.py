"""The whole run and the ``bench`` sub-command: measure (or read a saved JSON), then render."""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ds_twolevel.tools.bench.config import BenchConfig
from ds_twolevel.tools.bench.measure import layout_rank
from ds_twolevel.tools.bench.report import write_report
from ds_twolevel.tools.bench.shard import sdpa_overhead, shard_compute
from ds_twolevel.tools.bench.thp import shard_compute_thp


def run_all(cfg: BenchConfig) -> dict:
    """Every measurement of the benchmark; a JSON-able dict."""
    from ds_twolevel.testing.ranks import run_distributed

    torch.set_num_threads(1)
    started = time.time()
    out: dict[str, Any] = {"config": asdict(cfg), "torch": torch.__version__, "threads_per_rank": 1,
                           "cpu_count": os.cpu_count(), "load_average": [_load()]}
    out["overhead"] = sdpa_overhead(cfg)
    out["allocator"] = "THP_MEM_ALLOC_ENABLE=" + os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    out["shard"] = shard_compute(cfg)
    out["shard_thp"] = shard_compute_thp(cfg)
    out["layouts"] = run_distributed(layout_rank, cfg.ranks, cfg, timeout=3600, pg_timeout=1200)[0]
    out["seconds"] = time.time() - started
    out["load_average"].append(_load())
    return out


def _load() -> float:
    """The 1-minute load average (other jobs on a shared machine), NaN where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_layouts(cfg: BenchConfig, saved: dict) -> dict:
    """Section 3 only (the layout benchmark on ranks), the other measured sections kept from ``saved`` (a
    ``bench_results.json`` the full command wrote with the same single-process settings)."""
    from ds_twolevel.testing.ranks import run_distributed

    differ = sorted(k for k, v in asdict(cfg).items() if k.startswith(("shard_", "overhead_"))
                    and json.loads(json.dumps(v)) != saved["config"].get(k))
    if differ:
        raise ValueError(f"the saved results were measured with other settings for {differ}: run the whole bench "
                         "(without --only) to measure every section with these")
    started, load = time.time(), _load()
    layouts = run_distributed(layout_rank, cfg.ranks, cfg, timeout=3600, pg_timeout=1200)[0]
    return {**saved, "config": {**saved["config"], **asdict(cfg)}, "layouts": layouts,
            "layouts_run": {"seconds": time.time() - started, "load_average": [load, _load()]}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` sub-command's options."""
    parser.add_argument("--out", default="docs", help="folder for performance.md, bench_results.json and PNGs")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no AutoTP (seconds; for tests)")
    parser.add_argument("--no-autotp", action="store_true", help="skip DeepSpeed AutoTP")
    parser.add_argument("--from-json", default=None, help="re-render the report from a saved bench_results.json")
    parser.add_argument("--only", choices=("layouts",), default=None,
                        help="measure only section 3 (the layout benchmark on ranks); the other measured sections are "
                             "read from bench_results.json in --out")


def main(args: argparse.Namespace) -> int:
    """Run (or re-read) the measurements and write the report, JSON and plots into ``--out``."""
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.no_autotp:
        cfg = BenchConfig(**{**asdict(cfg), "autotp": False})
    out = Path(args.out)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    elif args.only == "layouts":
        results = run_layouts(cfg, json.loads((out / "bench_results.json").read_text()))
    else:
        results = run_all(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_results.json").write_text(json.dumps(results, indent=1))
    path = write_report(results, out)
    print(f"wrote {path} ({results['seconds']:.0f} s of measurements)")
    return 0
