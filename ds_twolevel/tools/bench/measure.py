"""The layout benchmark on gloo ranks: every n x m layout, each strategy, AutoTP and the dense model,
timed round-robin barrier to barrier (run by :func:`layout_rank` on every rank)."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import torch

from ds_twolevel.parallel.layout import TwoLevelLayout
from ds_twolevel.sharding.partition import AttentionSpec, feasible_layouts
from ds_twolevel.strategies import registry
from ds_twolevel.strategies.base import CACHE_LAYOUTS
from ds_twolevel.tools.bench.config import DECODE_PHASES, BenchConfig, layout_rows
from ds_twolevel.tools.bench.helix import helix_layouts, helix_llama
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
    """Round-robin over the variants, phase by phase: load from other jobs hits all alike."""
    for phase in ("prefill", *DECODE_PHASES):
        timed = [v for v in variants if phase in v.steps]
        for k in range(cfg.warmup + cfg.repeats):
            for v in timed:
                seconds = step_time(v.steps[phase], v.alone)
                if k >= cfg.warmup:
                    getattr(v.result, f"{phase}_times").append(seconds)
        for v in timed:
            setattr(v.result, f"{phase}_ms", median_ms(getattr(v.result, f"{phase}_times")))


def _row_name(n: int, m: int, strategy: str, layout: str) -> str:
    if m == 1:
        return f"n={n} x m={m}"
    return f"n={n} x m={m}, " + (f"{layout} cache" if layout != "segments" else strategy)


def two_level_variants(hf_model, inp: dict, cfg: BenchConfig, ref: dict) -> tuple[list[Variant], dict]:
    """Our rows at every n x m of the ranks, and the models whose layers "cost_model" plans (per n x m)."""
    spec = AttentionSpec(cfg.heads, cfg.kv_heads, cfg.head_dim, rope_style="half")
    variants, planned = [], {}
    for n, m in feasible_layouts(spec, cfg.ranks, kv_replication=True):
        mesh = TwoLevelLayout(n=n, m=m).build()
        kind = ("head-wise TP" if m == 1 else "two-level") + (" + KV replication" if n > cfg.kv_heads else "")
        for strategy, layout in layout_rows(m):
            model = TwoLevelLlama(hf_model, mesh, strategy=strategy).eval()
            res = VariantResult(_row_name(n, m, strategy, layout), kind, param_bytes=layer_param_bytes(model.blocks))
            variants.append(ours_variant(model, inp, cfg, res, ref, layout=layout))
            if strategy == registry.AUTO:
                planned[(n, m)] = model
    for n, kvp in helix_layouts(cfg.kv_heads, cfg.heads, cfg.ranks):
        model = helix_llama(hf_model, TwoLevelLayout(n=n, m=kvp).build())
        res = VariantResult(f"Helix-style n={n} x kvp={kvp}", "Helix-style (KV by sequence, W_q/W_k/W_v replicated)",
                            param_bytes=layer_param_bytes(model.blocks))
        variants.append(ours_variant(model, inp, cfg, res, ref, layout="kv_shard", prefill=False))
    return variants, planned


def mark_default(rows: list[VariantResult], planned: dict, cfg: BenchConfig) -> None:
    """Mark the row whose long-context decode step is two-level's default: the n x m and KV layout with the
    least predicted attention time over a ``generate()`` of ``cfg.generate_new_tokens`` after a prompt of the
    long shape's length (``choose_kv_layout``'s criterion, also ranking n x m), "cost_model" choosing the
    strategy."""
    from hf_integration.generation import predicted_generate_time

    b, s = cfg.long_decode
    options = {}
    for (n, m), model in planned.items():
        layers = [blk.attn for blk in model.blocks]
        for layout in CACHE_LAYOUTS:
            try:
                options[(n, m, layout)] = predicted_generate_time(layers, layout, batch=b, prompt=s,
                                                                  new_tokens=cfg.generate_new_tokens)
            except ValueError:
                continue
    if not options:
        return
    n, m, layout = min(options, key=options.get)
    same = [r for r in rows if r.name.startswith(f"n={n} x m={m},") and r.cache_layout == layout]
    if layout == "segments":  # the row whose own strategy is what "cost_model" runs on this cache
        picked = _decode_choice(planned[(n, m)], b, s)
        same = [r for r in same if r.name.endswith(f", {picked}")]
    for r in same[:1]:
        r.default = True


def _decode_choice(model: TwoLevelLlama, batch: int, cached: int) -> str:
    """What "cost_model" runs for one decode step against a dimension-layout cache of ``cached`` positions."""
    layer = model.blocks[0].attn
    hidden = torch.empty(batch, 1, layer.hidden_size, device="meta")  # shapes only
    call = replace(layer.attention_call(hidden, None, None, kv_len=cached + 1), cached=cached)
    return layer.resolve_strategy(call)


def layout_rank(cfg: BenchConfig) -> list[dict]:
    """Body of each rank of the layout benchmark; rank 0's results are the ones reported."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    hf_model = LlamaForCausalLM(cfg.llama_config()).eval()
    spec = AttentionSpec(cfg.heads, cfg.kv_heads, cfg.head_dim, rope_style="half")
    inp = bench_inputs(cfg, spec)
    with torch.no_grad():
        ref = dense_reference(hf_model, inp)
        dense = VariantResult("dense, 1 rank (HF sdpa)", "single device", param_bytes=layer_param_bytes(hf_model.model.layers))
        variants = [hf_variant(hf_model.model, inp, dense, None, alone=True)]
        ours, planned = two_level_variants(hf_model, inp, cfg, ref)
        variants += ours
        if cfg.autotp:
            from ds_twolevel.tools.bench.autotp import autotp_variant

            variants.append(autotp_variant(hf_model, inp, cfg, ref))
        del inp, ref  # the dense cache states: every row holds its own slice
        time_variants(variants, cfg)
    mark_default([v.result for v in variants], planned, cfg)
    return [asdict(v.result) for v in variants]
