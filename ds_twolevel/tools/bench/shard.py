"""Single-process timing of one rank's shard, on simulated axes, against the dense layer; and our
layer at m = n = 1 against Hugging Face's ``LlamaAttention`` (sdpa).

A shard is built on axes that have their sizes but no process group
(:func:`ds_twolevel.parallel.collectives.simulated`): its collectives run the local ops of the same
output shapes, so exactly one rank's compute is timed, with no module state changed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.layers.seq_cache import SeqShardCache
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelAxes
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.strategies import registry
from ds_twolevel.tools.bench.config import (HEADWISE_STRATEGY, BenchConfig, decode_strategies, prefill_strategies,
                                            strategies_for)


def simulated_axes(n: int, m: int, *, i: int = 0, j: int = 0) -> TwoLevelAxes:
    """Rank (i, j) of an n x m layer on sized axes without process groups (one process).

    Example:
        >>> simulated_axes(2, 2, j=1).seg
        AxisGroup(name='m', size=2, rank=1)
    """
    return TwoLevelAxes(seg=AxisGroup("m", m, j), heads=AxisGroup("n", n, i), tp=AxisGroup("tp", n * m, i * m + j))


def shard_layer(hidden: int, spec: AttentionSpec, n: int, m: int, strategy: str, *,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TwoLevelAttention:
    """Rank (0, 0)'s shard of an n x m layer, on simulated axes (sizes, no process group)."""
    layer = TwoLevelAttention(hidden, spec, simulated_axes(n, m), strategy=strategy, device=device, dtype=dtype)
    return layer.to(device).eval()  # the RoPE index buffers are created on the CPU whatever `device` says


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


SHARD_LAYOUTS = (tuple((n, m, st) for n, m in ((4, 1), (2, 2), (1, 4)) for st in strategies_for(m))
                 + ((2, 1, HEADWISE_STRATEGY), (1, 2, "score_allreduce")))
"""(n, m, strategy) shards timed against the dense (1, 1) layer on CPU (m n = 2: the score path only)."""

PREFILL_SHARD_LAYOUTS = tuple((n, m, st) for n, m in ((2, 2), (1, 4)) for st in prefill_strategies())
"""(n, m, strategy) shards timed at prefill only (seq_rows: decode has no rows to split)."""

DECODE_SHARD_LAYOUTS = tuple((n, m, st) for n, m in ((2, 2), (1, 4)) for st in decode_strategies())
"""(n, m, strategy) shards timed at decode only (kv_shard: its cache is held by position, and a prefill
into an empty kv_shard cache runs seq_rows)."""

DENSE_FUSED = (1, 1, "qk_allgather")
"""the dense layer on fused SDPA: the reference of "ideal"."""
DENSE_EXPLICIT = (1, 1, "score_allreduce")
"""the dense layer on the explicit score path (same kernels as score all-reduce): separates the
method's cost from the loss of the fused kernel."""


@dataclass(frozen=True)
class ShardCase:
    """One per-shard timing setting."""

    hidden: int
    spec: AttentionSpec
    phase: str
    """"prefill" (batch x seq new tokens) or "decode" (one token against a cache of seq - 1)."""
    batch: int
    seq: int
    repeats: int = 5
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    interleave: bool = True
    """build every shard first and time them round-robin (robust to load from other jobs on a shared
    CPU); False builds and times one at a time (less memory: accelerators with paper-sized caches)."""


def cache_layout(strategy: str) -> str:
    """The KV-cache layout a strategy's decode shard reads: its own for a strategy the cache selects
    (kv_shard), else the dimension split ("segments")."""
    return registry.layouts(registry.get(strategy))[0] if strategy in registry.cache_layout_strategies() else "segments"


def crop_shard_cache(cache: SeqShardCache, length: int) -> None:
    """Put a preallocated cache back to ``length`` (global) positions: O(1), the buffers stay."""
    for store in cache.stores.values():
        store.crop(length)


@dataclass
class DecodeShard:
    """Rank (0, 0)'s shard with a preallocated cache of ``seq - 1`` positions (:class:`SeqShardCache`)."""

    layer: TwoLevelAttention
    cache: SeqShardCache
    strategy: str
    """what runs the step: a dimension-layout strategy is the layer's own; kv_shard is asked for per call
    (the layer's strategy cannot name it; the cache's layout selects it)."""
    past: int
    """cached positions before (and after) each step."""

    def step(self, x: torch.Tensor, rope) -> torch.Tensor:
        """One decode step, then the cache cropped back to ``past`` positions."""
        y = self.layer(x, position_embeddings=rope, kv_cache=self.cache, strategy=self.strategy)
        crop_shard_cache(self.cache, self.past)
        return y


def decode_shard(case: ShardCase, n: int, m: int, strategy: str, x: torch.Tensor) -> DecodeShard:
    """Rank (0, 0)'s decode shard of ``strategy`` with its preallocated cache filled with random keys/values:
    (b, g/n, s-1, d/m) in the dimension layout; for kv_shard, full-d keys/values of the positions p % m == 0
    of the s - 1 cached ones. Raises if the layer would not run ``strategy`` on this cache."""
    spec, device = case.spec, torch.device(case.device)
    layout, past = cache_layout(strategy), case.seq - 1
    layer = shard_layer(case.hidden, spec, n, m, strategy if layout == "segments" else registry.AUTO,
                        device=device, dtype=case.dtype)
    # the cache's own chunked capacity, as in use: a kv_shard store sized for s positions would hold its
    # s/m as a strided view of a buffer m times too long, which the fused kernel reads more slowly
    cache = SeqShardCache(layout=layout)
    b, gl, d, dv = case.batch, spec.num_kv_heads // n, spec.head_dim, spec.dv
    rand = lambda *shape: torch.randn(shape, device=device, dtype=case.dtype)  # noqa: E731
    if layout == "segments":
        cache.update(rand(b, gl, past, d // m), rand(b, gl, past, dv // m), layer.layer_idx)
    else:
        j = layer.axes.seg.rank
        store = cache.position_store(layer.layer_idx, m, j)
        own = len(range(j, past, m))
        store.append(rand(b, gl, own, d), rand(b, gl, own, dv))
        store.global_length = past
    runs = layer.resolve_strategy(layer.attention_call(x, None, cache), strategy, device)
    if runs != strategy:
        raise RuntimeError(f"the {n} x {m} decode shard of {strategy!r} would run {runs!r}")
    return DecodeShard(layer, cache, strategy, past)


def _shard_step(case: ShardCase, n: int, m: int, strategy: str, x: torch.Tensor, rope) -> Callable[[], None]:
    """One forward of rank (0, 0)'s shard (decode: with its own preallocated KV cache), as a closure."""
    if case.phase == "decode":
        shard = decode_shard(case, n, m, strategy, x)
        return lambda: shard.step(x, rope)
    layer = shard_layer(case.hidden, case.spec, n, m, strategy, device=torch.device(case.device), dtype=case.dtype)
    return lambda: layer(x, position_embeddings=rope)


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock a step is timed with: on the CPU the calling thread's CPU time (one thread per process:
    what the step computed, whatever else a shared machine runs; ``recipes/measure_seqshard.py`` reports
    wall time beside it), on an accelerator wall time after a synchronize."""
    return time.thread_time if device.type == "cpu" else time.perf_counter


def rounds_ms(steps: list[Callable[[], Any]], repeats: int, device: torch.device) -> list[list[float]]:
    """Milliseconds of each step in each of ``repeats`` round-robin rounds, after one warm-up each
    (:func:`step_clock`)."""
    clock = step_clock(device)
    for step in steps:
        step()
    _sync(device)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for k, step in enumerate(steps):
            start = clock()
            step()
            _sync(device)
            times[k].append(1e3 * (clock() - start))
    return times


def _best_ms(steps: list[Callable[[], Any]], repeats: int, device: torch.device) -> list[float]:
    """Fastest of ``repeats`` round-robin rounds for each step."""
    return [min(t) for t in rounds_ms(steps, repeats, device)]


def time_shards(case: ShardCase, layouts: tuple[tuple[int, int, str], ...]) -> list[dict]:
    """Time the dense layer, then each (n, m, strategy) shard; rows with the ratio to dense/(m n).

    Times are the fastest of ``case.repeats`` runs: a compute property, least disturbed by other load.
    """
    from ds_twolevel.layers.rope import rope_cos_sin

    spec, device = case.spec, torch.device(case.device)
    q_len = case.seq if case.phase == "prefill" else 1
    x = torch.randn(case.batch, q_len, case.hidden, device=device, dtype=case.dtype)
    rope = rope_cos_sin(torch.arange(case.seq - q_len, case.seq, device=device).expand(case.batch, -1), spec,
                        dtype=case.dtype)
    todo = [(n, m, st) for n, m, st in (DENSE_FUSED, DENSE_EXPLICIT) + tuple(layouts)
            if not (spec.num_heads % n or spec.num_kv_heads % n or (spec.head_dim // 2) % m)]
    with torch.no_grad():
        if case.interleave:
            times = _best_ms([_shard_step(case, n, m, st, x, rope) for n, m, st in todo], case.repeats, device)
        else:
            times = [_best_ms([_shard_step(case, n, m, st, x, rope)], case.repeats, device)[0] for n, m, st in todo]
    dense_ms, explicit_ms = times[0], times[1]
    rows = []
    for (n, m, strategy), ms in zip(todo, times):
        same_path = explicit_ms if strategy == DENSE_EXPLICIT[2] else dense_ms
        rows.append({"phase": case.phase, "batch": case.batch, "seq": case.seq, "n": n, "m": m, "strategy": strategy,
                     "ms": ms, "dense_ms": dense_ms, "ratio_to_ideal": ms / (dense_ms / (n * m)),
                     "ratio_to_same_path": ms / (same_path / (n * m))})
    return rows


def shard_compute(cfg: BenchConfig) -> list[dict]:
    """Per-shard compute time against the dense layer (one thread, collectives local)."""
    spec = AttentionSpec(cfg.shard_heads, cfg.shard_heads, cfg.shard_head_dim, rope_style="half")
    cases = [ShardCase(cfg.shard_hidden, spec, "prefill", 1, seq, cfg.shard_repeats) for seq in cfg.shard_seqs]
    cases.append(ShardCase(cfg.shard_hidden, spec, "decode", *cfg.shard_decode, cfg.shard_decode_repeats))
    return [row for case in cases
            for row in time_shards(case, SHARD_LAYOUTS + (PREFILL_SHARD_LAYOUTS if case.phase == "prefill"
                                                          else DECODE_SHARD_LAYOUTS))]


def sdpa_overhead(cfg: BenchConfig, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """Our layer at m = n = 1 against HF LlamaAttention (sdpa), same weights and input, interleaved runs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    rows, dev = [], torch.device(device)
    for kv in (cfg.shard_heads, max(cfg.shard_heads // 4, 1)):
        hf_cfg = LlamaConfig(hidden_size=cfg.shard_hidden, num_attention_heads=cfg.shard_heads, num_key_value_heads=kv,
                             head_dim=cfg.shard_head_dim, attn_implementation="sdpa")
        torch.manual_seed(cfg.seed)
        hf = LlamaAttention(hf_cfg, 0).eval()
        spec = AttentionSpec(cfg.shard_heads, kv, cfg.shard_head_dim, rope_style="half")
        ours = TwoLevelAttention(cfg.shard_hidden, spec, TwoLevelAxes.single()).eval()
        ours.load_dense_state({f"{p}.weight": getattr(hf, p).weight.detach() for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        hf, ours = hf.to(dev, dtype), ours.to(dev, dtype)
        x = torch.randn(1, cfg.overhead_seq, cfg.shard_hidden, device=dev, dtype=dtype)
        rope = LlamaRotaryEmbedding(hf_cfg).to(dev)(x, torch.arange(cfg.overhead_seq, device=dev)[None])
        run_hf, run_ours = (lambda: hf(x, rope, None)[0]), (lambda: ours(x, position_embeddings=rope))
        with torch.no_grad():
            ref = run_hf()
            err = float((ref - run_ours()).abs().max() / ref.abs().max())
            t_hf, t_ours = rounds_ms([run_hf, run_ours], cfg.overhead_repeats, dev)
        hf_ms, ours_ms = min(t_hf), min(t_ours)
        median = statistics.median(o / h for h, o in zip(t_hf, t_ours)) - 1  # per round: same load on both
        rows.append({"heads": cfg.shard_heads, "kv_heads": kv, "head_dim": cfg.shard_head_dim, "seq": cfg.overhead_seq,
                     "hf_ms": hf_ms, "ours_ms": ours_ms, "overhead": ours_ms / hf_ms - 1,
                     "overhead_median_of_rounds": median, "max_rel_diff": err})
    return rows
