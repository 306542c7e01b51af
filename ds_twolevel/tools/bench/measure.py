"""The layout benchmark on gloo ranks: every n x m layout, each strategy, AutoTP and the dense model,
timed round-robin barrier to barrier (run by :func:`layout_rank` on every rank)."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from ds_twolevel.parallel.layout import TwoLevelLayout
from ds_twolevel.sharding.partition import AttentionSpec, feasible_layouts
from ds_twolevel.tools.bench.config import BenchConfig, strategies_for
from ds_twolevel.tools.bench.model import TwoLevelLlama, layer_param_bytes
from ds_twolevel.tools.bench.variants import (Variant, VariantResult, bench_inputs, dense_reference, hf_variant,
                                              ours_variant)


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def step_time(fn: Callable[[], Any], alone: bool) -> float:
    """Seconds of one step on all ranks, barrier to barrier."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    if not alone or dist.get_rank() == 0:
        fn()
    dist.barrier()
    return time.perf_counter() - start


def time_variants(variants: list[Variant], cfg: BenchConfig) -> None:
    """Round-robin over the variants (prefill rounds, then decode rounds): load from other jobs hits all alike."""
    for phase in ("prefill", "decode"):
        for k in range(cfg.warmup + cfg.repeats):
            for v in variants:
                seconds = step_time(getattr(v, phase), v.alone)
                if k >= cfg.warmup:
                    getattr(v.result, f"{phase}_times").append(seconds)
    for v in variants:
        v.result.prefill_ms, v.result.decode_ms = median_ms(v.result.prefill_times), median_ms(v.result.decode_times)


def layout_rank(cfg: BenchConfig) -> list[dict]:
    """Body of each rank of the layout benchmark; rank 0's results are the ones reported."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    hf_model = LlamaForCausalLM(cfg.llama_config()).eval()
    inp = bench_inputs(cfg)
    with torch.no_grad():
        ref = dense_reference(hf_model, inp)
        dense = VariantResult("dense, 1 rank (HF sdpa)", "single device", param_bytes=layer_param_bytes(hf_model.model.layers))
        variants = [hf_variant(hf_model.model, inp, cfg, dense, None, alone=True)]
        spec = AttentionSpec(cfg.heads, cfg.kv_heads, cfg.head_dim, rope_style="half")
        for n, m in feasible_layouts(spec, cfg.ranks, kv_replication=True):
            mesh = TwoLevelLayout(n=n, m=m).build()
            kind = ("head-wise TP" if m == 1 else "two-level") + (" + KV replication" if n > cfg.kv_heads else "")
            for strategy in strategies_for(m):
                model = TwoLevelLlama(hf_model, mesh, strategy=strategy).eval()
                res = VariantResult(f"n={n} x m={m}" + (f", {strategy}" if m > 1 else ""), kind,
                                    param_bytes=layer_param_bytes(model.blocks))
                variants.append(ours_variant(model, inp, cfg, res, ref))
        if cfg.autotp:
            from ds_twolevel.tools.bench.autotp import autotp_variant

            variants.append(autotp_variant(hf_model, inp, cfg, ref))
        time_variants(variants, cfg)
    return [asdict(v.result) for v in variants]
