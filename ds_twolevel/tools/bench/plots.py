"""The report's two PNG plots, drawn from the JSON results (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layouts(results: dict, out: Path) -> str:
    """Step time of every layout row relative to the baseline (AutoTP, else the second row)."""
    plt = _pyplot()
    rows = results["layouts"]
    base = next((r for r in rows if r["kind"].startswith("AutoTP")), rows[1])
    fig, ax = plt.subplots(figsize=(11, 4))
    labels = [r["name"].replace("DeepSpeed ", "") for r in rows]
    x = range(len(rows))
    phases = [p for p in ("prefill", "decode", "long_decode") if base.get(f"{p}_ms")]
    width = 0.8 / len(phases)
    for k, phase in enumerate(phases):  # a row without a phase (Helix-style: no prefill) draws no bar
        ax.bar([i + (k - (len(phases) - 1) / 2) * width for i in x],
               [r.get(f"{phase}_ms", 0.0) / base[f"{phase}_ms"] for r in rows], width, label=phase.replace("_", " "))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"step time / {base['name']}")
    ax.set_title(f"{results['config']['ranks']} gloo ranks on {results['cpu_count']} CPU cores (oversubscribed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_layouts.png", dpi=110)
    plt.close(fig)
    return "bench_layouts.png"


def plot_shard(results: dict, out: Path) -> str:
    """Per-shard time relative to ideal (dense / (m n)), prefill rows first."""
    plt = _pyplot()
    shard = [r for r in results["shard"] if r["n"] * r["m"] > 1]
    shard = [r for r in shard if r["phase"] == "prefill"] + [r for r in shard if r["phase"] != "prefill"]
    fig, ax = plt.subplots(figsize=(11, 4))
    labels = [f"{r['phase'][:3]} s={r['seq']}\n{r['n']}x{r['m']} {r['strategy'][:5] if r['m'] > 1 else ''}" for r in shard]
    xs = range(len(shard))
    ax.bar([i - 0.2 for i in xs], [r["ratio_to_ideal"] for r in shard], 0.4, label="vs dense (fused SDPA)")
    ax.bar([i + 0.2 for i in xs], [r.get("ratio_to_same_path", r["ratio_to_ideal"]) for r in shard], 0.4,
           label="vs dense on the same path")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.3, color="r", lw=0.8, ls="--", label="1.3x target")
    ax.set_xticks(range(len(shard)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("shard time / (dense time / (m n))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_shard.png", dpi=110)
    plt.close(fig)
    return "bench_shard.png"


def write_plots(results: dict, out: Path) -> list[str]:
    """Both plots into ``out``; their file names."""
    return [plot_layouts(results, out), plot_shard(results, out)]
