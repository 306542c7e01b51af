"""Benchmarks on this machine: layouts vs head-wise TP, KV replication and DeepSpeed AutoTP.

``python -m ds_twolevel bench --out docs/`` runs, in one go and on one set of ranks:

1. **layouts** - a small HF Llama (built from a config) on ``ranks`` gloo ranks: every n x m
   layout of the ranks (n > g means KV-head replication; m = 1 is head-wise TP) with every
   registered strategy (seq_rows at prefill, kv_shard on a cache held by position), a Helix-style
   layer, DeepSpeed AutoTP at tp = ranks, and the dense model on one rank. Prefill, decode (one
   token against a KV cache) and a long-context decode. Medians of repeated steps, bytes per layer,
   per-rank parameter and KV-cache bytes, the output error against the dense model, and the verdict
   of the default decode step against AutoTP and head-wise TP with KV replication.
2. **per-shard compute** - one process, one thread: the compute of one rank's shard of an
   n x m attention layer on simulated axes (collectives run as local ops of the same output
   shapes) against the dense layer; ideal = 1/(m*n).
3. **overhead** - our layer at m = n = 1 against Hugging Face's ``LlamaAttention`` (sdpa).
4. the planner and the paper's experiment, modelled (pure, no timing).

It writes ``performance.md``, ``bench_results.json`` and two PNG plots into ``--out``.

Modules, one job each: ``config`` (BenchConfig, the strategies iterated), ``model`` (the bench's
Llama of TwoLevelBlocks, the HF weight mapper), ``variants`` / ``measure`` (the layout benchmark on
ranks), ``kvfill`` (its decode caches, from one dense cache state), ``helix`` (the Helix-style layer),
``autotp`` (DeepSpeed AutoTP rows), ``decode_step`` (one rank's end-to-end decode step on simulated axes,
for ``recipes/bench_gpu_shard.py``), ``shard`` (single-process shard timing on simulated
axes), ``thp`` (the huge-page rerun in a subprocess), ``report`` + ``report.md`` (the page, rendered
from the JSON results), ``modelled`` (planner and paper sections), ``gpu`` (section 8), ``plots``,
``run`` (the sub-command).
"""
from __future__ import annotations

from ds_twolevel.tools.bench.config import BenchConfig, bench_strategies
from ds_twolevel.tools.bench.measure import layout_rank, time_variants
from ds_twolevel.tools.bench.model import TwoLevelLlama
from ds_twolevel.tools.bench.report import write_report
from ds_twolevel.tools.bench.run import add_arguments, main, run_all
from ds_twolevel.tools.bench.shard import (SHARD_LAYOUTS, ShardCase, sdpa_overhead, shard_compute, shard_layer,
                                           simulated_axes, time_shards)
from ds_twolevel.tools.bench.thp import shard_compute_thp
from ds_twolevel.tools.bench.variants import Variant, VariantResult

__all__ = ["BenchConfig", "SHARD_LAYOUTS", "ShardCase", "TwoLevelLlama", "Variant", "VariantResult", "add_arguments",
           "bench_strategies", "layout_rank", "main", "run_all", "sdpa_overhead", "shard_compute", "shard_compute_thp",
           "shard_layer", "simulated_axes", "time_shards", "time_variants", "write_report"]
