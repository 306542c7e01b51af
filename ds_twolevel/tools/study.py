"""Front end of the decode-vs-context study (:mod:`ds_twolevel.costmodel.study`): a markdown section,
one plot and the full grid as JSON.

``python -m ds_twolevel.tools.study --out docs/`` writes ``decode_study.md``, ``decode_study.png`` and
``decode_study.json`` (deterministic: the same code gives the same bytes).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ds_twolevel.costmodel import study
from ds_twolevel.costmodel.hardware import HardwareProfile, get_profile
from ds_twolevel.costmodel.study import FAMILIES, Crossover, GridCase

MD, PNG, JSON = "decode_study.md", "decode_study.png", "decode_study.json"
PLOT_DEVICES, PLOT_BATCH = 16, 64
HELIX_TARGET = 1.01
""""within this factor of Helix's modelled time" (the section's headline count)."""
HELP = """\
Model one decode step of Llama-3-8B-like and Llama-3-70B-like models at 16 and 32 ranks per layer, batch
1/16/64, KV cache 4K..128K, for every two-level layout and strategy, head-wise TP with KV replication,
DeepSpeed AutoTP and a Helix-style layout; write a markdown section, a plot and the grid as JSON.
"""


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _label(p: study.StudyPoint) -> str:
    if p.family == "two-level":
        return f"{p.layout}, {p.strategy}" + (f" ({p.chosen})" if p.strategy == "cost_model" else "")
    return p.layout


def _case_rows(case: GridCase, hw: HardwareProfile) -> list[str]:
    rows = []
    for family in FAMILIES:
        p = case.best(family)
        fits = "yes" if p.kv_bytes + p.weight_bytes <= hw.memory_bytes else "**no**"
        rows.append(f"| {case.batch} | {case.s_kv:,} | {family} | {_label(p)} | {p.time * 1e3:.3f} | "
                    f"{p.traffic_bytes / 1e6:,.1f} | {_gb(p.kv_bytes)} | {_gb(p.weight_bytes)} | {fits} |")
    return rows


def cases_table(cases: list[GridCase], model: str, devices: int, hw: HardwareProfile) -> str:
    """One model at one rank count: the best layout of each family per (batch, s_kv)."""
    head = ["| b | s_kv | family | best layout | step ms | sent MB/step | KV GB/device | weights GB/device | "
            f"fits {hw.memory_bytes / 1e9:.0f} GB |", "|---|---|---|---|---|---|---|---|---|"]
    body = [r for c in cases if c.model == model and c.devices == devices for r in _case_rows(c, hw)]
    return "\n".join(head + body)


def _at(cases: list[GridCase], x: Crossover, s_kv: int, family: str) -> study.StudyPoint:
    case = next(c for c in cases if (c.model, c.devices, c.batch, c.s_kv) == (x.model, x.devices, x.batch, s_kv))
    return case.best(family)


def crossover_table(cases: list[GridCase], found: list[Crossover], helix: list[Crossover]) -> str:
    """Per model / ranks / batch: where the best two-level layout overtakes head-wise TP + KV replication,
    and the three families' best at the grid's longest context."""
    last = study.CONTEXTS[-1]
    lines = ["| model | ranks | b | best two-level overtakes head-wise TP + KV replication | "
             f"Helix overtakes best two-level | at s_kv = {last // 1024}K: best two-level ms | head-wise + KV rep. ms | "
             "AutoTP ms | Helix ms |", "|---|---|---|---|---|---|---|---|---|"]
    for x, hx in zip(found, helix):
        two, head, auto_tp, hel = (_at(cases, x, last, f) for f in FAMILIES)
        lines.append(f"| {x.model} | {x.devices} | {x.batch} | {x.describe()} | {hx.describe()} | "
                     f"{two.time * 1e3:.3f} ({_label(two)}) | {head.time * 1e3:.3f} | {auto_tp.time * 1e3:.3f} | "
                     f"{hel.time * 1e3:.3f} ({hel.layout}) |")
    return "\n".join(lines)


def helix_table(gaps: list[study.HelixGap]) -> str:
    """Per model / ranks / batch: the point where the best two-level layout is furthest behind Helix."""
    lines = ["| model | ranks | b | worst s_kv | best two-level | step ms | Helix | step ms | two-level / Helix | "
             "gap in collective latencies per layer | weights GB/device two-level / Helix |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[study.HelixGap]] = {}
    for g in gaps:
        groups.setdefault((g.model, g.devices, g.batch), []).append(g)
    for (model, devices, batch), rows in groups.items():
        g = max(rows, key=lambda r: r.ratio)
        lines.append(f"| {model} | {devices} | {batch} | {g.s_kv:,} | {_label(g.two_level)} | "
                     f"{g.two_level.time * 1e3:.3f} | {g.helix.layout} | {g.helix.time * 1e3:.3f} | {g.ratio:.3f} | "
                     f"{g.latencies:.2f} | {_gb(g.two_level.weight_bytes)} / {_gb(g.helix.weight_bytes)} |")
    return "\n".join(lines)


def helix_section(gaps: list[study.HelixGap], hw: HardwareProfile) -> str:
    """Where two-level's best reaches Helix's modelled time, and why it does not elsewhere."""
    close = sum(g.ratio <= HELIX_TARGET for g in gaps)
    worst = max(g.latencies for g in gaps)
    return (
        "### Two-level against Helix\n\n"
        f"The best two-level layout is within {HELIX_TARGET:.2f}x of the best Helix layout at {close} of the "
        f"{len(gaps)} points of the grid. Everywhere, the gap is less than one collective latency per layer "
        f"(at most {worst:.2f} x layers x {hw.collective_latency * 1e6:.0f} us). That is the price of the split "
        "projections: at decode, `kv_shard` all-gathers the new token's q/k/v dimension segments inside the "
        "segment group before each rank attends to its positions, one collective per layer more than Helix, "
        "which skips it by replicating W_q, W_k and W_v over its KV shards. Fusing that all-gather with the "
        "log-sum-exp exchange is not possible (the exchange needs the attention the gathered q feeds), and "
        "overlapping it with the KV read is not either (the scores need the gathered q). Closing the gap means "
        "replicating those weights, which is Helix's layout; two-level keeps them split and holds fewer "
        "weight bytes per device at every point. Below, each row is the point of the grid where two-level is "
        "furthest behind.\n\n" + helix_table(gaps))


def intro(hw: HardwareProfile, notes: list[str]) -> str:
    """What the section models and how to regenerate it."""
    strategies = ", ".join(f"`{s}`" for s in study.two_level_strategies())
    skipped = ("\n\nSkipped points (the cost model refused the strategy there):\n\n"
               + "\n".join(f"- {line}" for line in sorted(set(notes)))) if notes else ""
    return (
        "## Decode against context length\n\n"
        "Regenerate with `python -m ds_twolevel.tools.study --out docs/` (this section, its plot and "
        f"`{JSON}`, the whole grid). One decode step (one new token for each of b sequences against a KV cache "
        f"of s_kv positions) on {hw.name} ({hw.peak_flops / 1e12:.0f} TFLOP/s, {hw.mem_bandwidth / 1e12:.2f} TB/s, "
        f"{hw.intra_node_busbw / 1e9:.0f} GB/s busbw inside a node of {hw.devices_per_node}, "
        f"{hw.inter_node_busbw / 1e9:.0f} GB/s across nodes, {hw.collective_latency * 1e6:.0f} us per collective, "
        f"{hw.dtype_bytes}-byte elements), modelled with the cost model of the sections above (roofline per op, "
        "collectives not overlapped) for the busiest rank; times are the whole step, bytes are what one rank "
        "sends in it, memory is one device's KV cache and parameters (replicated embeddings included). "
        "Models: Llama-3-8B-like (H=4096, h=32, g=8, d=128, I=14336, 32 layers) and Llama-3-70B-like "
        "(H=8192, h=64, g=8, d=128, I=28672, 80 layers), vocabulary 128256. Ranks per layer P = "
        f"{' and '.join(map(str, study.DEVICES))} (no data parallelism).\n\n"
        "Families (each row below is the family's fastest layout at that point):\n\n"
        f"- **two-level**: every n x m layout of P with m > 1, with each two-level strategy the cost model "
        f"predicts today ({strategies}) and `cost_model`.\n"
        "- **head-wise TP + KV replication**: n = P, m = 1; each KV head copied on P/g ranks (the planner's model).\n"
        "- **DeepSpeed AutoTP** at tp = P: it splits q/k/v/o in whole KV-head groups, so past g ranks the first g "
        "ranks hold h/g query heads and one KV head each and the rest only their MLP share; the busiest rank "
        "sets the time (section 3 measured this on gloo).\n"
        "- **Helix** (arXiv 2507.07120): n head groups (n | g) times kvp = P/n ranks that shard the KV cache by "
        "sequence; W_q, W_k, W_v are replicated over the kvp ranks (each projects the new token itself, no "
        "all-gather), the partial outputs and log-sum-exps are combined by one all-to-all over the kvp ranks "
        "(`kv_shard`'s exchange), W_o is split over all P ranks as in the paper, then the o_proj and MLP "
        "all-reduces over P. KV per device is 1/P of the cache; the replicated W_q/W_k/W_v make its weights "
        "the largest of the four families." + skipped)


def plot(cases: list[GridCase], found: list[Crossover], out: Path) -> str:
    """Step time against s_kv, best of each family, per model at PLOT_DEVICES ranks and batch PLOT_BATCH."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(study.MODELS)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4))
    for ax, model in zip(axes, models):
        sel = [c for c in cases if (c.model, c.devices, c.batch) == (model, PLOT_DEVICES, PLOT_BATCH)]
        xs = [c.s_kv for c in sel]
        for family, style in zip(FAMILIES, ("o-", "s--", "^:", "d-.")):
            ax.plot(xs, [c.best(family).time * 1e3 for c in sel], style, label=family)
        x = next(x for x in found if (x.model, x.devices, x.batch) == (model, PLOT_DEVICES, PLOT_BATCH))
        if x.s_kv is not None and not x.at_start:
            ax.axvline(x.s_kv, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{s // 1024}K" for s in xs])
        ax.set_xlabel("KV cache length s_kv")
        ax.set_ylabel("modelled decode step, ms")
        ax.set_title(f"{model}, {PLOT_DEVICES} ranks, b={PLOT_BATCH}")
        ax.grid(True, which="both", lw=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PNG, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return PNG


def _case_json(case: GridCase) -> dict:
    """A case with its points as rows (``point_columns`` order; floats to 6 significant digits)."""
    row = lambda p: [float(f"{v:.6g}") if isinstance(v, float) else v for v in asdict(p).values()]
    return {"model": case.model, "devices": case.devices, "batch": case.batch, "s_kv": case.s_kv,
            "points": [row(p) for p in case.points]}


def write(out: Path, hw: HardwareProfile) -> list[Path]:
    """Run the grid and write the markdown section, the plot and the JSON into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    cases = study.grid(hw, notes=notes)
    found = study.crossovers(hw)
    helix = study.crossovers(hw, family=FAMILIES[3], other=FAMILIES[0])
    png = plot(cases, found, out)
    parts = [intro(hw, notes), "### Crossovers\n\n" + crossover_table(cases, found, helix),
             f"![decode step time against context length, best of each family]({png})\n\n"
             f"Best layout of each family, {PLOT_DEVICES} ranks per layer, batch {PLOT_BATCH}; the grey line is "
             "where the best two-level layout overtakes head-wise TP + KV replication (none when it already leads "
             "at 4K).", helix_section(study.helix_gaps(cases, hw), hw)]
    for model in study.MODELS:
        for devices in study.DEVICES:
            parts.append(f"### {model}, {devices} ranks per layer\n\n" + cases_table(cases, model, devices, hw))
    (out / MD).write_text("\n\n".join(parts) + "\n")
    meta = {"hardware": asdict(hw), "strategies": list(study.two_level_strategies()), "notes": sorted(set(notes)),
            "crossovers": [asdict(x) for x in found + helix]}
    meta["point_columns"] = list(study.StudyPoint.__dataclass_fields__)
    lines = ",\n".join(json.dumps(_case_json(c)) for c in cases)  # one case per line
    (out / JSON).write_text('{"meta": ' + json.dumps(meta, sort_keys=True) + ',\n"cases": [\n' + lines + "\n]}\n")
    return [out / MD, out / PNG, out / JSON]


def main(argv: list[str] | None = None) -> int:
    from ds_twolevel.costmodel.hardware import PROFILES

    parser = argparse.ArgumentParser(prog="python -m ds_twolevel.tools.study", description=HELP)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder to write into (default: %(default)s)")
    parser.add_argument("--hardware", choices=sorted(PROFILES), default="h100",
                        help="hardware profile (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in write(args.out, get_profile(args.hardware)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
