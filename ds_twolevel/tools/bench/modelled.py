"""The report's modelled sections (pure, no timing): hardware profiles, planner answers, and the
source paper's experiment with the bounds the discussion quotes."""
from __future__ import annotations

from dataclasses import replace

from ds_twolevel.tools.bench.tables import md_table


PLAN_CASES = {"llama-3-8b": (("prefill", 8, 4096), ("decode", 64, 8192)),
              "paper": (("prefill", 128, 10000), ("decode", 128, 10000))}
"""(phase, batch, seq) the planner tables in the report use."""


def profiles_table() -> str:
    from ds_twolevel.costmodel.hardware import PROFILES

    rows = [[p.name, f"{p.peak_flops / 1e12:g} TFLOP/s", f"{p.mem_bandwidth / 1e12:g} TB/s",
             f"{p.intra_node_busbw / 1e9:g} GB/s", f"{p.inter_node_busbw / 1e9:g} GB/s", p.devices_per_node,
             f"{p.collective_latency * 1e6:g} us", f"{p.memory_bytes / 1e9:g} GB", p.dtype_bytes, p.source]
            for p in PROFILES.values()]
    return md_table(["profile", "peak matmul", "memory bw", "busbw in node", "busbw across nodes", "devices/node",
                   "latency/collective", "memory", "bytes/elem", "source"], rows)


def paper_bounds() -> dict[str, float]:
    """Physical bounds of the paper's setting on 16 H100s (used in the discussion)."""
    from ds_twolevel.costmodel import Phase, predict
    from ds_twolevel.costmodel.hardware import H100_SXM
    from ds_twolevel.costmodel.planner import PRESETS

    model, hw = PRESETS["paper"], H100_SXM
    total_flops = predict(model, 1, 1, Phase("prefill", 128, 10000), hw).flops
    kv_total = predict(model, 1, 1, Phase("decode", 128, 10000), hw).kv_cache_bytes
    return {"flops": total_flops, "peak_tokens_per_s": 128 * 10000 / (total_flops / (16 * hw.peak_flops)),
            "kv_total_gb": kv_total / 1e9, "kv_bound_ms": kv_total / 16 / hw.mem_bandwidth * 1e3}


def planner_section() -> str:
    from ds_twolevel.costmodel import Phase
    from ds_twolevel.costmodel.hardware import H100_SXM
    from ds_twolevel.costmodel.planner import PRESETS, format_plan, plan

    parts = []
    for name, phases in PLAN_CASES.items():
        model = PRESETS[name]
        rows = []
        for kind, batch, seq in phases:
            phase = Phase(kind, batch, seq)
            for devices in (8, 16, 32, 64):
                result = plan(model, devices, phase, H100_SXM)
                ok = [r for r in result if r.feasible]
                best = ok[0]
                two = next((r for r in ok if r.m > 1), None)
                head = next((r for r in ok if r.m == 1 and r.n > 1), None)
                fmt = lambda r: "-" if r is None else f"{r.dp}x{r.n}x{r.m} {r.prediction.time * 1e3:.3f} ms"
                rows.append([f"{kind} b={batch} s={seq}", devices, f"**{best.dp} x {best.n} x {best.m}** ({best.kind})",
                             f"{best.prediction.time * 1e3:.3f}", f"{best.prediction.tokens_per_s:,.0f}",
                             fmt(two), fmt(head), f"{len(ok)}/{len(result)}"])
        parts.append(f"**{name}** (h={model.heads}, g={model.kv_heads}, d={model.head_dim}, H={model.hidden}, "
                     f"I={model.intermediate}, {model.layers} layers) on H100 SXM, BF16:\n\n" + md_table(
                         ["phase", "devices", "best dp x n x m", "step ms", "tokens/s", "best two-level (m>1)",
                          "best head-wise (m=1, n>1)", "feasible"], rows))
    example = plan(PRESETS["llama-3-8b"], 64, Phase("decode", 64, 8192), H100_SXM)
    rep = next(r for r in example if r.feasible and "KV replication" in r.kind and r.m == 1)
    two = next(r for r in example if r.feasible and r.m > 1 and r.n * r.m == rep.n and "replication" not in r.kind)
    row = lambda r: (f"{r.dp} x {r.n} x {r.m}: {r.prediction.time * 1e3:.3f} ms, KV cache "
                     f"{r.prediction.kv_cache_bytes / 1e9:.2f} GB/device")
    parts.append("How to read these: the planner ranks by the step time of the whole global batch (dp splits the "
                 "batch), so where a model copy fits on few devices, more data parallelism wins throughput and "
                 "ranks per layer buy memory and latency. At the same ranks per layer, two-level never sends fewer "
                 "bytes than head-wise TP (DESIGN section 6); where head-wise TP needs KV replication (n > g), "
                 "two-level keeps the KV cache partitioned instead, e.g. for Llama-3-8B decode at "
                 f"{rep.n} ranks per layer: head-wise + KV replication {row(rep)}; two-level {row(two)}.")
    parts.append("The full listing for one case (`ds-twolevel plan --model llama-3-8b --devices 64 --phase decode "
                 "--batch 64 --seq 8192`), infeasible layouts with their reasons at the end:\n\n"
                 + format_plan(PRESETS["llama-3-8b"], 64, Phase("decode", 64, 8192), H100_SXM, example))
    return "\n\n".join(parts)


def paper_section() -> str:
    from ds_twolevel.costmodel.hardware import H100_SXM
    from ds_twolevel.costmodel.planner import PAPER_CLAIMS, format_paper, paper_experiment

    rows = paper_experiment(H100_SXM)
    fast_net = replace(H100_SXM, inter_node_busbw=8 * H100_SXM.inter_node_busbw)
    fast_rows = paper_experiment(fast_net)
    base = rows[0]
    flat = [r for r in rows[1:] if r.label.startswith("dp=1 ")]
    best_flat = max(flat, key=lambda r: r.prefill_tokens_per_s)
    best_tpot = min(rows[1:], key=lambda r: r.tpot_ms)
    c = PAPER_CLAIMS
    text = format_paper(rows)
    text += (f"\n\nModelled baseline: {base.prefill_tokens_per_s / 1e6:.2f}M tokens/s prefill and {base.tpot_ms:.3f} ms "
             f"TPOT, against the paper's {c['baseline_tokens_per_s'] / 1e6:.2f}M and {c['baseline_tpot_ms']} ms. "
             f"Best layout using all 16 GPUs for one model copy (dp=1): {best_flat.label}, "
             f"{best_flat.prefill_tokens_per_s / 1e6:.2f}M tokens/s ({best_flat.prefill_tokens_per_s / base.prefill_tokens_per_s - 1:+.0%}). "
             f"Lowest modelled TPOT: {best_tpot.label}, {best_tpot.tpot_ms:.3f} ms.")
    slower = [r.label for r in rows[1:] if r.tpot_ms >= base.tpot_ms]
    text += (f" Layouts whose TPOT is not better than the baseline's: {', '.join(slower) or 'none'}.")
    fast_base = fast_rows[0]
    fast_flat = max((r for r in fast_rows[1:] if r.label.startswith("dp=1 ")), key=lambda r: r.prefill_tokens_per_s)
    text += ("\n\nSensitivity to the one number the brief leaves open - the bus bandwidth of a group spanning the two "
             "nodes. Above it is one NIC, 45 GB/s; if NCCL spread every such collective over all 8 NICs of a node "
             f"(8 x 45 = {fast_net.inter_node_busbw / 1e9:.0f} GB/s), the baseline would reach "
             f"{fast_base.prefill_tokens_per_s / 1e6:.2f}M tokens/s and {fast_base.tpot_ms:.3f} ms TPOT, and the best "
             f"dp=1 layout ({fast_flat.label}) {fast_flat.prefill_tokens_per_s / 1e6:.2f}M tokens/s "
             f"({fast_flat.prefill_tokens_per_s / fast_base.prefill_tokens_per_s - 1:+.0%}) and {fast_flat.tpot_ms:.3f} ms.")
    return text
