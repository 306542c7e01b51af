"""Render ``performance.md`` from the JSON results: the measured sections are built here, the prose
is the template ``report.md`` next to this module (``str.format`` fields: ``{results[...]}``,
``{cfg[...]}`` and the named sections and numbers :func:`render` passes), shipped as package data."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ds_twolevel.parallel.collectives import ring_bytes
from ds_twolevel.tools.bench.gpu import GPU_JSON, gpu_section
from ds_twolevel.tools.bench.modelled import paper_bounds, paper_section, planner_section, profiles_table
from ds_twolevel.tools.bench.plots import write_plots
from ds_twolevel.tools.bench.tables import md_table

REGENERATE = "python -m ds_twolevel bench --out docs/"
TEMPLATE = "report.md"
"""the report's prose, in this package."""


def _phase_shape(cfg: dict, phase: str) -> tuple[int, int, int]:
    """(batch, new tokens, KV length) of a layout-benchmark phase."""
    if phase == "prefill":
        return cfg["prefill_batch"], cfg["prefill_seq"], cfg["prefill_seq"]
    b, s = (cfg["decode_batch"], cfg["decode_seq"]) if phase == "decode" else tuple(cfg["long_decode"])
    return b, 1, s + 1


def _layout_of(name: str) -> tuple[int, int]:
    """(n, m) of "n=2 x m=2, ..." or (n, kvp) of "Helix-style n=2 x kvp=2"."""
    first, second = name.split(" x ")[:2]
    return int(first.split("n=")[-1]), int(second.split("=")[1].split(",")[0])


def modelled_bytes(cfg: dict, row: dict, phase: str) -> int | None:
    """Bytes per layer the cost model predicts for a benchmark row's phase (None for rows it does not model):
    ours from the strategy that ran, the Helix-style rows from the decode study's Helix collectives."""
    from ds_twolevel.costmodel import ModelConfig, attention_call, block_collectives
    from ds_twolevel.costmodel.study import helix_collectives

    b, q, kv = _phase_shape(cfg, phase)
    name = row["name"]
    if name.startswith("DeepSpeed AutoTP"):  # row-parallel o_proj and down_proj: one all-reduce of T x H each
        return 2 * ring_bytes("all_reduce", b * q * cfg["hidden"] * 4, cfg["ranks"])
    model = ModelConfig("bench", cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["intermediate"],
                        cfg["layers"])
    if name.startswith("Helix-style"):
        return None if phase == "prefill" else sum(c.bytes_sent(4) for c in helix_collectives(model, *_layout_of(name),
                                                                                             b, q, kv, 4))
    if not name.startswith("n="):
        return None
    strategy = row.get(f"{phase}_strategy") or "qk_allgather"
    return sum(c.bytes_sent(4) for c in block_collectives(attention_call(model, *_layout_of(name), b, q, kv), strategy))


def _ms(r: dict, phase: str) -> str:
    times = r.get(f"{phase}_times") or []
    return f"{r[f'{phase}_ms']:.2f} [{1e3 * min(times):.2f}]" if times else "-"


def _ratio(r: dict, base: dict, phase: str) -> str:
    return f"{r[f'{phase}_ms'] / base[f'{phase}_ms']:.2f}x" if r.get(f"{phase}_times") and base.get(f"{phase}_ms") else "-"


def _bytes(cfg: dict, r: dict, phase: str) -> str:
    if not r.get(f"{phase}_times"):
        return "-"
    modelled = modelled_bytes(cfg, r, phase)
    return f"{r[f'{phase}_bytes_per_layer']:,}" + ("" if modelled is None else f" / {modelled:,}")


def _ran(r: dict, phase: str) -> str:
    return r.get(f"{phase}_strategy") or "-"


def _layouts_section(results: dict) -> str:
    rows, cfg = results["layouts"], results["config"]
    base = next((r for r in rows if r["kind"].startswith("AutoTP")), None) or next(r for r in rows if r["kind"].startswith("head-wise"))
    table = [[r["name"], r["kind"], _ran(r, "prefill"), _ms(r, "prefill"), _ratio(r, base, "prefill"), _ran(r, "decode"),
              _ms(r, "decode"), _ratio(r, base, "decode"), _bytes(cfg, r, "prefill"), _bytes(cfg, r, "decode"),
              f"{r['param_bytes'] / 2**20:.2f}", f"{r['kv_cache_bytes'] / 2**20:.2f}", f"{r['max_error']:.1e}"]
             for r in rows]
    head = ["layout", "kind", "prefill ran", "prefill ms median [min]", "vs baseline", "decode ran",
            "decode ms median [min]", "vs baseline", "prefill B/layer sent (counted / model)",
            "decode B/layer sent (counted / model)", "params MiB/rank", "KV MiB/rank", "max abs err vs dense"]
    return (f"Model: HF `LlamaForCausalLM` built from a config: H={cfg['hidden']}, h={cfg['heads']}, g={cfg['kv_heads']}, "
            f"d={cfg['head_dim']}, I={cfg['intermediate']}, {cfg['layers']} layers, fp32, on {cfg['ranks']} gloo ranks "
            f"(1 thread each). Prefill: batch {cfg['prefill_batch']} x {cfg['prefill_seq']} tokens. Decode: one token for "
            f"each of {cfg['decode_batch']} sequences against a KV cache of {cfg['decode_seq']}. Median of "
            f"{cfg['repeats']} steps after {cfg['warmup']} warm-up steps, barrier to barrier, the variants timed "
            f"round-robin (one step of each per round) so that load from other jobs hits all alike; [min] is the "
            f"fastest step. \"ran\": the strategy that computed the phase (the layer's own, or what `cost_model` or "
            f"the cache layout chose). Baseline: **{base['name']}**, same run, same weights and inputs.\n\n"
            + md_table(head, table) + "\n\n" + _long_decode_section(results))


def _long_decode_section(results: dict) -> str:
    """The long-context decode table and its verdict line."""
    rows, cfg = [r for r in results["layouts"] if r.get("long_decode_times")], results["config"]
    if not rows:
        return ""
    b, s = cfg["long_decode"]
    autotp = next((r for r in rows if r["kind"].startswith("AutoTP")), None)
    replicated = next((r for r in rows if r["kind"] == "head-wise TP + KV replication"), None)
    peers = [p for p in (autotp, replicated) if p is not None]
    head = ["layout", "kind", "ran", "KV cache", "decode ms median [min]"] + [f"vs {_peer(p)}" for p in peers] + [
        "B/layer sent (counted / model)", "KV MiB/rank", "params MiB/rank", "max abs err vs dense"]
    table = [[("**" + r["name"] + "** (default)") if r.get("default") else r["name"], r["kind"], _ran(r, "long_decode"),
              r.get("cache_layout") or "DynamicCache", _ms(r, "long_decode")]
             + [_ratio(r, p, "long_decode") for p in peers]
             + [_bytes(cfg, r, "long_decode"), f"{r['long_kv_cache_bytes'] / 2**20:.2f}", f"{r['param_bytes'] / 2**20:.2f}",
                f"{r['max_error']:.1e}"] for r in rows]
    return (f"**Long-context decode**: one token for each of {b} sequences against a KV cache of {s:,} positions, "
            f"where reading the cache dominates the step (same run, same ranks, same timing; every row's output "
            f"checked against the dense model's):\n\n" + md_table(head, table) + "\n\n" + long_decode_verdict(results))


def long_decode_verdict(results: dict) -> str:
    """The verdict line at the long-context decode shape: two-level's default decode step against DeepSpeed
    AutoTP and head-wise TP with KV replication, measured in the same run."""
    rows, cfg = results["layouts"], results["config"]
    b, s = cfg["long_decode"]
    ours = next((r for r in rows if r.get("default") and r.get("long_decode_times")), None)
    peers = [r for r in rows if r.get("long_decode_times")
             and (r["kind"].startswith("AutoTP") or r["kind"] == "head-wise TP + KV replication")]
    if ours is None or not peers:
        return "Verdict at the long-context decode shape: no figure (the default row or the peers did not run)."
    worst = max(ours["long_decode_ms"] / p["long_decode_ms"] for p in peers)
    against = " and ".join(f"{_peer(p)} {p['long_decode_ms']:.2f} ms ({ours['long_decode_ms'] / p['long_decode_ms']:.2f}x)"
                           for p in peers)
    two_level = [r for r in rows if r["kind"].startswith("two-level") and r.get("long_decode_times")]
    best = min(two_level, key=lambda r: r["long_decode_ms"])
    helix = [r for r in rows if r["kind"].startswith("Helix") and r.get("long_decode_times")]
    line = (f"**Verdict (b = {b}, s_kv = {s:,}, {cfg['ranks']} ranks, g = {cfg['kv_heads']}): two-level's default "
            f"decode step ({ours['name']}, running {ours['long_decode_strategy']}: the n x m and KV layout the cost "
            f"model picks for a generate() of {cfg.get('generate_new_tokens', 64)} tokens after this prompt) "
            f"{ours['long_decode_ms']:.2f} ms median against {against}: "
            f"{'at most both, met' if worst <= 1.0 else 'slower, not met'}.** ")
    line += f"Fastest two-level row: {best['name']} {best['long_decode_ms']:.2f} ms"
    if helix:
        fast = min(helix, key=lambda r: r["long_decode_ms"])
        line += (f"; fastest Helix-style row: {fast['name']} {fast['long_decode_ms']:.2f} ms "
                 f"(default / Helix-style = {ours['long_decode_ms'] / fast['long_decode_ms']:.2f}x)")
    if any(p["kind"].startswith("AutoTP") for p in peers):
        line += ("; AutoTP's row decodes on Hugging Face's DynamicCache, whose per-step copy of the cache is part of "
                 "its time, while head-wise TP + KV replication runs on the same preallocated cache as two-level")
    return line + "."


def _peer(row: dict) -> str:
    """A peer's name with its kind: "head-wise TP + KV replication (n=4 x m=1)", "DeepSpeed AutoTP tp=4"."""
    return row["name"] if row["kind"].startswith("AutoTP") else f"{row['kind']} ({row['name']})"


def _shard_label(r: dict) -> str:
    return f"n={r['n']} x m={r['m']}, s={r['seq']}: {r['ratio_to_ideal']:.2f}x"


def _shard_model_ms(cfg: dict, r: dict) -> float:
    """The cost model's compute time for a per-shard row, on the calibrated CPU profile."""
    from ds_twolevel.costmodel import ModelConfig, attention_call, attention_ops
    from ds_twolevel.costmodel.hardware import CPU_GLOO

    H, h, d = cfg["shard_hidden"], cfg["shard_heads"], cfg["shard_head_dim"]
    model = ModelConfig("shard", H, h, h, d, 4 * H, 1)
    q_len, kv_len = (r["seq"], r["seq"]) if r["phase"] == "prefill" else (1, r["seq"])
    call = attention_call(model, r["n"], r["m"], r["batch"], q_len, kv_len)
    return 1e3 * sum(op.time(CPU_GLOO) for op in attention_ops(model, call, r["strategy"], 4))


def _shard_key(r: dict) -> tuple:
    return r["phase"], r["batch"], r["seq"], r["n"], r["m"], r["strategy"]


def _shard_section(results: dict) -> tuple[str, str]:
    rows, cfg = results["shard"], results["config"]
    thp = {_shard_key(r): r for r in results.get("shard_thp", [])}

    def with_thp(r: dict) -> list[str]:
        t = thp.get(_shard_key(r))
        return [f"{t['ms']:.2f}", f"{t['ratio_to_ideal']:.2f}x"] if t else ["-", "-"]

    table = [[r["phase"], r["batch"], r["seq"], f"{r['n']} x {r['m']}",
              r["strategy"] if r["m"] > 1 or r["n"] * r["m"] == 1 else "-", f"{r['ms']:.2f}",
              f"{r['dense_ms'] / (r['n'] * r['m']):.2f}", f"{r['ratio_to_ideal']:.2f}x",
              f"{r.get('ratio_to_same_path', r['ratio_to_ideal']):.2f}x", *with_thp(r), f"{_shard_model_ms(cfg, r):.2f}"]
             for r in rows]
    target = [r for r in rows if r["phase"] == "prefill" and r["seq"] >= 1024 and r["n"] * r["m"] == 4
              and r["m"] > 1 and r["strategy"] == "score_allreduce"]
    if target:
        worst = max(r["ratio_to_ideal"] for r in target)
        same = max(r.get("ratio_to_same_path", 0.0) for r in target)
        target_thp = [thp[_shard_key(r)]["ratio_to_ideal"] for r in target if _shard_key(r) in thp]
        verdict = (f"**Target (score all-reduce, m*n = 4, prefill s >= 1024, within 1.3x of ideal): "
                   f"{'holds' if worst <= 1.3 else 'does NOT hold'}** - worst measured ratio {worst:.2f}x "
                   f"({', '.join(_shard_label(r) for r in target)}), with the allocator as the process found it "
                   f"({results.get('allocator', 'THP_MEM_ALLOC_ENABLE unset')}). "
                   + (f"With 2 MB transparent huge pages (same grid, fresh process): worst {max(target_thp):.2f}x. "
                      if target_thp else "")
                   + f"Against the dense layer on the same explicit score path (materialised scores, no fused "
                   f"kernel), the worst ratio is {same:.2f}x.")
    else:
        verdict = "The target (m*n = 4, prefill s >= 1024) was not in this run's grid."
    rows_target = [r for r in rows if r["phase"] == "prefill" and r["seq"] >= 1024 and r["n"] * r["m"] == 4
                   and r["strategy"] == "seq_rows"]
    if rows_target:
        worst = max(r["ratio_to_ideal"] for r in rows_target)
        verdict += (f"\n\n**Target (seq_rows, m*n = 4, prefill s >= 1024, within 1.15x of ideal): "
                    f"{'holds' if worst <= 1.15 else 'does NOT hold'}** - worst measured ratio {worst:.2f}x "
                    f"({', '.join(_shard_label(r) for r in rows_target)}; rank (0, 0)'s shard: its zigzag blocks "
                    "are the first and the last, `recipes/measure_seqshard.py` times every segment rank).")
    verdict += _decode_verdict(rows)
    fit = {ph: [r["ms"] / _shard_model_ms(cfg, r) for r in rows if r["phase"] == ph] for ph in ("prefill", "decode")}
    verdict_model = ("Measured / modelled time on the calibrated CPU profile: "
                     + "; ".join(f"{ph} {min(v):.2f}-{max(v):.2f}x" for ph, v in fit.items() if v) + ". "
                     "Every decode row (the dense references included) reads a preallocated cache "
                     "(`SeqShardCache`: a step writes its position in place and is cropped back in O(1); the "
                     "`torch.cat` of `KVCache` and Hugging Face's DynamicCache would copy the whole cache every "
                     "step); the model reads the cache once per step at full bandwidth, while one query's "
                     "attention over the cache (batched matrix-vector products, fused SDPA's CPU kernel included) "
                     "runs well below this CPU's copy bandwidth."
                     + (" Where prefill runs faster than modelled, the fused causal kernel and the blocked causal "
                        "score path skip the masked half that the model counts." if fit["prefill"] and min(fit["prefill"]) < 1 else ""))
    verdict = verdict + "\n\n" + verdict_model
    head = ["phase", "batch", "seq (KV)", "n x m", "strategy", "shard ms", "ideal ms (dense/(m n))", "ratio to ideal",
            "ratio to ideal of the same path", "shard ms, THP", "ratio to ideal, THP", "cost model ms (cpu profile)"]
    text = (f"Attention layer H={cfg['shard_hidden']}, h=g={cfg['shard_heads']} (MHA), d={cfg['shard_head_dim']} "
            f"(the paper's head size), fp32, one thread; thread CPU time (one thread: what the step computed, robust to other jobs on a shared machine), fastest of {cfg['shard_repeats']} round-robin rounds "
            f"({cfg.get('shard_decode_repeats', cfg['shard_repeats'])} for decode) "
            "(all shards built first, timed in turn, so that load from other jobs hits them alike). The THP columns "
            "repeat the whole grid in a fresh process with `THP_MEM_ALLOC_ENABLE=1` (PyTorch's switch that backs CPU "
            "tensors of 2 MB and more with transparent huge pages): the score path allocates tensors of tens of MB "
            "per call, and with 4 KB pages each call faults through them again.\n\n" + md_table(head, table))
    return text, verdict


DECODE_TARGET = 1.2
"""the target bound on a decode shard at m*n = 4 with the preallocated cache (x ideal)."""


def _decode_target_strategies() -> tuple[str, ...]:
    """The decode strategies the decode verdict covers: those the cache selects (kv_shard) and score
    all-reduce (the dimension-layout strategy of the 1.3x prefill target)."""
    from ds_twolevel.tools.bench.config import decode_strategies

    return (*decode_strategies(), "score_allreduce")


def _decode_label(r: dict) -> str:
    return f"{r['strategy']} " + _shard_label(r)


def _decode_verdict(rows: list[dict]) -> str:
    """The decode target's line (empty when the run has no m*n = 4 decode rows of its strategies)."""
    decode = [r for r in rows if r["phase"] == "decode" and r["n"] * r["m"] == 4]
    target = [r for r in decode if r["m"] > 1 and r["strategy"] in _decode_target_strategies()]
    if not target:
        return ""
    worst = max(r["ratio_to_ideal"] for r in target)
    rest = [_decode_label(r) if r["m"] > 1 else "head-wise " + _shard_label(r) for r in decode if r not in target]
    repeated = any(r["m"] > 1 and r["strategy"] == "qk_allgather" and r not in target for r in decode)
    return (f"\n\n**Target (decode shard at m*n = 4 with the preallocated cache, "
            f"{' and '.join(_decode_target_strategies())}, within {DECODE_TARGET}x of ideal): "
            f"{'holds' if worst <= DECODE_TARGET else 'does NOT hold'}** - worst measured ratio {worst:.2f}x "
            f"({', '.join(_decode_label(r) for r in target)}; ideal = the dense fused layer on the same "
            "preallocated cache / (m n); kv_shard is rank (0, 0)'s shard, which holds the most cached positions, "
            "ceil((s-1)/m))."
            + (f" Not covered: {', '.join(rest)}"
               + (" (QK all-gather gathers every cached key to full width each step and computes the full "
                  "scores on every segment rank: m-fold by design)"
                  if repeated else "") + "." if rest else ""))


def _overhead_section(results: dict) -> tuple[str, str]:
    rows = results["overhead"]
    table = [[r["heads"], r["kv_heads"], r["head_dim"], r["seq"], f"{r['hf_ms']:.2f}", f"{r['ours_ms']:.2f}",
              f"{r['overhead']:+.1%}", f"{r.get('overhead_median_of_rounds', r['overhead']):+.1%}",
              f"{r['max_rel_diff']:.1e}"] for r in rows]
    worst = max(max(r["overhead"], r.get("overhead_median_of_rounds", r["overhead"])) for r in rows)
    verdict = (f"**Target (m = n = 1 overhead <= 5% against HF SDPA): {'holds' if worst <= 0.05 else 'does NOT hold'}** "
               f"- worst {worst:+.1%} (the larger of the two statistics, over both shapes).")
    head = ["h", "g", "d", "seq", "HF LlamaAttention sdpa ms (fastest)", "ours ms (fastest)", "overhead (fastest)",
            "overhead (median of per-round ratios)", "largest diff / largest output"]
    return md_table(head, table), verdict


def write_report(results: dict, out: Path) -> Path:
    """Render ``performance.md`` (+ PNGs) from measured results and the (pure) planner/paper models."""
    write_plots(results, out)
    shard_text, shard_verdict = _shard_section(results)
    overhead_text, overhead_verdict = _overhead_section(results)
    sections = {"regenerate": REGENERATE, "layouts": _layouts_section(results), "shard": shard_text,
                "shard_verdict": shard_verdict, "overhead": overhead_text, "overhead_verdict": overhead_verdict,
                "planner": planner_section(), "paper": paper_section(), "gpu": gpu_section(out / GPU_JSON),
                "load": _load_text(results)}
    path = out / "performance.md"
    path.write_text(render(results, sections))
    return path


def _load_text(results: dict) -> str:
    """The load average (other jobs on the machine) around the measurements, where recorded."""
    def load(run: dict) -> str:
        avg = run.get("load_average") or []
        return f"load average {avg[0]:.1f} at the start and {avg[-1]:.1f} at the end" if len(avg) == 2 else ""

    text = f", {load(results)}" if load(results) else ""
    part = results.get("layouts_run")
    if part:  # section 3 measured on its own (--only layouts); sections 4 and 5 kept from the whole run
        text += (f"; section 3 by `python -m ds_twolevel bench --only layouts --out docs/` in {part['seconds']:.0f} s, "
                 f"{load(part)}, the other measured sections (4, 5) kept from the whole command's results in "
                 "`bench_results.json`")
    return text


def render(results: dict, sections: dict[str, str]) -> str:
    """The template filled with the results, the rendered ``sections`` and the paper's bounds."""
    from ds_twolevel.costmodel.planner import PAPER_CLAIMS

    b = paper_bounds()
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return template.format(
        results=results, cfg=results["config"], profiles=profiles_table(), **sections,
        paper_pflop=b["flops"] / 1e15, peak_mtokens_per_s=b["peak_tokens_per_s"] / 1e6,
        baseline_share_of_peak=PAPER_CLAIMS["baseline_tokens_per_s"] / b["peak_tokens_per_s"],
        twolevel_share_of_peak=PAPER_CLAIMS["twolevel_tokens_per_s"] / b["peak_tokens_per_s"],
        kv_total_gb=b["kv_total_gb"], kv_bound_ms=b["kv_bound_ms"])
