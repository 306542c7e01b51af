"""Figures of the sequence-sharded strategies (seq_rows, kv_shard) and the preallocated KV cache.

    python recipes/measure_seqshard.py                 # everything (about 10 min on a quiet 2-core CPU)
    python recipes/measure_seqshard.py --only prefill  # prefill | decode | memory | bf16; --json out.json

* prefill / decode: one rank's shard on simulated axes (sizes, no process group: collectives run local
  ops of the same output shapes; ``ds_twolevel.tools.bench.simulated_axes`` / ``shard_layer``) against
  the dense fused layer; ideal = dense / (m n). One thread, fp32, fastest of
  ``--repeats`` interleaved rounds (the machine is shared: the fastest is the least disturbed). Every
  segment rank's shard is timed (the zigzag blocks of rank 0 and rank m-1 differ) and the slowest is
  reported. The layer is the bench's (H = 1024, 8 heads x 128, MHA). Times are the thread's CPU time
  (one thread: what the step computed, robust to other jobs on a shared machine), wall time beside.
* memory: peak resident memory per rank (Linux VmHWM, reset through /proc/self/clear_refs) of a
  tiny Llama's forward at s = 8192 on 4 gloo ranks (2 x 2), with and without a padding mask, against
  the unpatched model in one process; second call of each (the first one warms allocator caches).
* bf16: logits of the tiny Llama in bf16 against the fp32 unpatched model, patched with each prefill
  strategy (score_allreduce, qk_allgather, seq_rows) against HF's own bf16, same inputs; and one
  LlamaAttention layer's output the same way; each with ``reduce_dtype`` "fp32" (the default: sums over
  ranks in fp32) and "input" (in bf16).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ds_twolevel.tools.bench import shard_layer, simulated_axes  # noqa: E402
from ds_twolevel.layers.cache import KVCache  # noqa: E402
from ds_twolevel.sharding.partition import AttentionSpec  # noqa: E402
from ds_twolevel.layers.rope import rope_cos_sin  # noqa: E402
from ds_twolevel.layers.attention import SeqShardAttention  # noqa: E402
from ds_twolevel.layers.seq_cache import SeqShardCache  # noqa: E402

HIDDEN, SPEC = 1024, AttentionSpec(8, 8, 128, rope_style="half")
LAYOUTS = ((2, 2), (1, 4))


def round_ms(steps: list[Callable[[], Any]], repeats: int) -> tuple[list[list[float]], list[list[float]]]:
    """(CPU ms, wall ms) of every step in each of ``repeats`` interleaved rounds (after one warm-up each).

    One thread: the thread's CPU time is what the step computed, whatever else the shared machine runs
    (memory-bandwidth contention still shows); wall time is reported beside it.
    """
    for step in steps:
        step()
    cpu: list[list[float]] = [[] for _ in steps]
    wall: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for k, step in enumerate(steps):
            start, start_cpu = time.perf_counter(), time.thread_time()
            step()
            cpu[k].append(1e3 * (time.thread_time() - start_cpu))
            wall[k].append(1e3 * (time.perf_counter() - start))
    return cpu, wall


def _seq_shard(n: int, m: int, j: int) -> SeqShardAttention:
    return SeqShardAttention(HIDDEN, SPEC, simulated_axes(n, m, j=j)).eval()


def prefill_rows(seq: int, repeats: int) -> list[dict]:
    """seq_rows prefill shards (every segment rank) and the existing strategies vs the dense layer."""
    x = torch.randn(1, seq, HIDDEN)
    rope = rope_cos_sin(torch.arange(seq)[None], SPEC)
    named: list[tuple[str, int, int, Callable[[], Any]]] = []
    dense = shard_layer(HIDDEN, SPEC, 1, 1, "qk_allgather")
    named.append(("dense (fused SDPA)", 1, 1, lambda: dense(x, position_embeddings=rope)))
    for n, m in LAYOUTS:
        for j in range(m):
            layer = _seq_shard(n, m, j)
            named.append((f"seq_rows j={j}", n, m, lambda layer=layer: layer(x, position_embeddings=rope)))
        for strategy in ("qk_allgather", "score_allreduce"):
            old = shard_layer(HIDDEN, SPEC, n, m, strategy)
            named.append((strategy, n, m, lambda old=old: old(x, position_embeddings=rope)))
    with torch.no_grad():
        times = round_ms([step for *_, step in named], repeats)
    return _ratios(named, times, "prefill", seq)


def _ratios(named, times: tuple[list[list[float]], list[list[float]]], phase: str, seq: int) -> list[dict]:
    """Per step: fastest CPU ms and its ratio to ideal (fastest dense / (m n)), the median over rounds of
    the per-round CPU ratio, and the same ratio of the fastest wall times."""
    cpu, wall = times
    rows = []
    for (what, n, m, _), t, w in zip(named, cpu, wall):
        per_round = sorted(x / (d / (n * m)) for x, d in zip(t, cpu[0]))
        rows.append({"phase": phase, "seq": seq, "what": what, "n": n, "m": m, "cpu_ms": min(t),
                     "ratio_to_ideal": min(t) / (min(cpu[0]) / (n * m)), "median_round_ratio": per_round[len(t) // 2],
                     "wall_ms": min(w), "wall_ratio": min(w) / (min(wall[0]) / (n * m))})
    for n, m in LAYOUTS:  # the slowest segment rank is the shard's time
        ranks = [r for r in rows if (r["n"], r["m"]) == (n, m) and r["what"].startswith(("seq_rows", "kv_shard"))]
        if ranks:
            worst = max(ranks, key=lambda r: r["cpu_ms"])
            rows.append({**worst, "what": worst["what"].split()[0] + " (slowest rank)"})
            rows.append({"phase": phase, "seq": seq, "what": worst["what"].split()[0] + " (mean of ranks)", "n": n,
                         "m": m, "ratio_to_ideal": sum(r["ratio_to_ideal"] for r in ranks) / len(ranks)})
    return rows


def _filled_store(store, batch: int, positions: int, heads: int, dk: int, dv: int) -> None:
    store.append(torch.randn(batch, heads, positions, dk), torch.randn(batch, heads, positions, dv))


def decode_rows(batch: int, kv_len: int, repeats: int) -> list[dict]:
    """One decode step (batch x 1 token against kv_len - 1 cached positions) per shard, the cache put back
    to its length after every step (O(1) for the preallocated stores)."""
    x = torch.randn(batch, 1, HIDDEN)
    rope = rope_cos_sin(torch.full((batch, 1), kv_len - 1), SPEC)
    named: list[tuple[str, int, int, Callable[[], Any]]] = []
    for label, n, m, strategy, cache in _decode_layers(batch, kv_len):
        if strategy is None:
            layer = _seq_shard(n, m, int(label.split("=")[-1]))
        else:
            layer = shard_layer(HIDDEN, SPEC, n, m, strategy)
        named.append((label, n, m, _decode_step(layer, x, rope, cache, kv_len - 1)))
    with torch.no_grad():
        times = round_ms([step for *_, step in named], repeats)
    return _ratios(named, times, "decode", kv_len)


def _decode_layers(batch: int, kv_len: int):
    """(label, n, m, existing strategy or None for kv_shard, filled cache) of every decode shard."""
    d, g = SPEC.head_dim, SPEC.num_kv_heads
    dense_prealloc = SeqShardCache(layout="segments")
    dense_prealloc.update(torch.randn(batch, g, kv_len - 1, d), torch.randn(batch, g, kv_len - 1, d), 0)
    dense_cat = KVCache()
    dense_cat.update(torch.randn(batch, g, kv_len - 1, d), torch.randn(batch, g, kv_len - 1, d), 0)
    out = [("dense, preallocated cache", 1, 1, "qk_allgather", dense_prealloc),
           ("dense, torch.cat cache", 1, 1, "qk_allgather", dense_cat)]
    for n, m in LAYOUTS:
        for j in range(m):
            cache = SeqShardCache(layout="kv_shard")
            store = cache.position_store(0, m, j)
            own = len(range(j, kv_len - 1, m))
            _filled_store(store, batch, own, g // n, d, d)
            store.global_length = kv_len - 1
            out.append((f"kv_shard j={j}", n, m, None, cache))
        seg = SeqShardCache(layout="segments")
        seg.update(torch.randn(batch, g // n, kv_len - 1, d // m), torch.randn(batch, g // n, kv_len - 1, d // m), 0)
        out.append(("score_allreduce, preallocated", n, m, "score_allreduce", seg))
    return out


def _decode_step(layer, x, rope, cache, length: int) -> Callable[[], None]:
    def step() -> None:
        layer(x, position_embeddings=rope, kv_cache=cache)
        if isinstance(cache, KVCache):  # slicing back: the next step's torch.cat copies the whole cache
            cache.keys[0], cache.values[0] = cache.keys[0][:, :, :length], cache.values[0][:, :, :length]
        else:
            for store in cache.stores.values():
                store.crop(length)
    return step


# -- memory (4 gloo ranks) ----------------------------------------------------------------------------
def _rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak resident memory above the level before ``fn`` (MiB): VmHWM after, VmRSS before, the high-water
    mark reset first (Linux /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss()["VmRSS"]
    fn()
    return (_rss()["VmHWM"] - before) / 1024


def _memory_inputs(seq: int):
    ids = torch.randint(1, 96, (1, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def _forward_peaks(model, seq: int) -> dict[str, float]:
    ids, mask = _memory_inputs(seq)
    out = {}
    with torch.no_grad():
        for label, m in (("no mask", None), ("padding mask", mask)):
            run = lambda: model(input_ids=ids, attention_mask=m, use_cache=False)  # noqa: E731
            peak_mib(run)
            out[label] = peak_mib(run)
    return out


def memory_rank(seq: int, strategies: tuple[str, ...]) -> dict:
    """Body of each of 4 ranks (2 x 2): peaks of the patched tiny Llama per strategy."""
    import torch.distributed as dist

    from ds_twolevel import TwoLevelLayout
    from hf_integration import patch_model
    from hf_integration.seqshard import use_seqshard
    from hf_integration.testing import tiny_model

    mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=2, m=2).build()
    out = {}
    for strategy in strategies:
        model = tiny_model("llama", max_position_embeddings=seq)
        patch_model(model, mesh, strategy="cost_model" if strategy == "seq_rows" else strategy)
        if strategy == "seq_rows":
            use_seqshard(model)
        out[strategy] = _forward_peaks(model, seq)
        del model
    return out


def memory_rows(seq: int, baseline: bool) -> list[dict]:
    from ds_twolevel.testing import run_distributed
    from hf_integration.testing import tiny_model

    dense = _forward_peaks(tiny_model("llama", max_position_embeddings=seq), seq)
    strategies = ("seq_rows", "auto") if baseline else ("seq_rows",)
    ranks = run_distributed(memory_rank, 4, seq, strategies, timeout=1800)
    rows = []
    for label, dense_mib in dense.items():
        rows.append({"what": "unpatched, one process", "mask": label, "peak_mib": dense_mib, "ratio": 1.0})
        for strategy in strategies:
            worst = max(r[strategy][label] for r in ranks)
            rows.append({"what": f"2x2 {strategy}, worst rank", "mask": label, "peak_mib": worst,
                         "ratio": worst / dense_mib})
    return rows


# -- bf16 ---------------------------------------------------------------------------------------------
def bf16_rank(seq: int, n: int, m: int) -> dict:
    import torch.distributed as dist

    from ds_twolevel import TwoLevelLayout
    from ds_twolevel.testing import rel_err
    from hf_integration import patch_model
    from hf_integration.testing import sample_batch, tiny_model

    mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=n, m=m).build()
    ref = tiny_model("llama", max_position_embeddings=seq)
    hf16 = copy.deepcopy(ref).to(torch.bfloat16)
    patched = {}
    for strategy in BF16_STRATEGIES:
        for reduce in REDUCE_DTYPES:
            patched[strategy, reduce] = copy.deepcopy(ref).to(torch.bfloat16)
            patch_model(patched[strategy, reduce], mesh, strategy=strategy, reduce_dtype=reduce)
    ids, mask = sample_batch(3, batch=2, seq=seq, pad=5)
    out = {"layer": bf16_layer(mesh, seq)}
    with torch.no_grad():
        for label, msk in (("no mask", None), ("padding mask", mask)):
            keep = (torch.ones_like(mask) if msk is None else msk).bool()
            want = ref(input_ids=ids, attention_mask=msk).logits[keep]
            out[label] = {"hf_bf16": rel_err(hf16(input_ids=ids, attention_mask=msk).logits[keep], want)}
            for (strategy, reduce), model in patched.items():
                out[label][_variant(strategy, reduce)] = rel_err(model(input_ids=ids, attention_mask=msk).logits[keep],
                                                                 want)
    return out


BF16_STRATEGIES = ("score_allreduce", "qk_allgather", "seq_rows")
"""every strategy a layer runs at a prefill (kv_shard decodes: its error is the decode's, not measured here)."""
REDUCE_DTYPES = ("fp32", "input")
"""the layers' ``reduce_dtype``: sums over ranks in fp32 (the default) or in bf16 (the activations')."""


def _variant(strategy: str, reduce: str) -> str:
    return f"{strategy}_bf16, reduce_dtype={reduce}" + (" (default)" if reduce == "fp32" else "")


def bf16_layer(mesh, seq: int) -> dict:
    """One HF LlamaAttention (H = 256, 8 heads x 32, 2 KV heads): its bf16 output and ours (seq_rows,
    bf16, each reduce_dtype) against its fp32 output, same weights and input (plain causal)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from ds_twolevel.testing import rel_err

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = LlamaAttention(cfg, 0).eval()
    spec = AttentionSpec(8, 2, 32, rope_style="half")
    x = torch.randn(2, seq, 256, generator=torch.Generator().manual_seed(1))
    rope = LlamaRotaryEmbedding(cfg)(x, torch.arange(seq)[None])
    with torch.no_grad():
        want = hf(x, rope, None)[0]
        out = {"hf_bf16": rel_err(copy.deepcopy(hf).to(torch.bfloat16)(x.bfloat16(), tuple(t.bfloat16() for t in rope),
                                                                        None)[0], want)}
        for strategy in BF16_STRATEGIES:
            for reduce in REDUCE_DTYPES:
                ours = SeqShardAttention(256, spec, mesh, dtype=torch.bfloat16, strategy=strategy,
                                         reduce_dtype=reduce).eval()
                ours.load_dense_state({f"{p}.weight": getattr(hf, p).weight.detach()
                                       for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
                out[_variant(strategy, reduce)] = rel_err(ours(x.bfloat16(), position_embeddings=rope), want)
    return out


def bf16_rows(seq: int) -> list[dict]:
    from ds_twolevel.testing import run_distributed

    rows = []
    for n, m in LAYOUTS:
        ranks = run_distributed(bf16_rank, 4, seq, n, m, timeout=900)
        for label in ranks[0]:
            hf = max(r[label]["hf_bf16"] for r in ranks)
            for key in [k for k in ranks[0][label] if k != "hf_bf16"]:
                ours = max(r[label][key] for r in ranks)
                rows.append({"layout": f"{n}x{m}", "what": "LlamaAttention output" if label == "layer" else
                             "tiny Llama logits", "mask": "no mask" if label == "layer" else label, "variant": key,
                             "hf_bf16_err": hf, "ours_err": ours, "ratio": ours / hf})
    return rows


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for r in rows:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("prefill", "decode", "memory", "bf16"), action="append")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq", type=int, default=2048, help="prefill rows of the shard timing")
    parser.add_argument("--decode", type=int, nargs=2, default=(8, 4096), metavar=("BATCH", "KV"))
    parser.add_argument("--memory-seq", type=int, default=8192)
    parser.add_argument("--baseline", action="store_true", help="memory: also today's auto (qk_allgather, ~1.4 GB/rank)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    todo, results = args.only or ["prefill", "decode", "memory", "bf16"], {}
    if "prefill" in todo:
        results["prefill"] = prefill_rows(args.seq, args.repeats)
        _print(f"prefill shard, s={args.seq}, ratio to ideal = ms / (dense ms / (m n))", results["prefill"])
    if "decode" in todo:
        results["decode"] = decode_rows(*args.decode, args.repeats)
        _print(f"decode shard, batch={args.decode[0]}, s_kv={args.decode[1]}", results["decode"])
    if "memory" in todo:
        results["memory"] = memory_rows(args.memory_seq, args.baseline)
        _print(f"peak memory per rank, tiny Llama prefill s={args.memory_seq}", results["memory"])
    if "bf16" in todo:
        results["bf16"] = bf16_rows(256)
        _print("bf16 logits error vs fp32 unpatched", results["bf16"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
