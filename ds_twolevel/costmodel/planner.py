"""Layout planner: every dp x n x m layout of P devices for a model, ranked by the cost model.

:func:`plan` lists each layout (head-wise TP: m = 1, two-level, KV replication where n > g, times
dp) with its predicted step time, memory and traffic, best first, and says why the others are
infeasible. Also models the source paper's 16-GPU experiment (``paper_experiment``). Pure: the
command line that reads Hugging Face configs (``ds-twolevel plan``) is :mod:`ds_twolevel.tools.plan`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ds_twolevel.costmodel import ModelConfig, Phase, Prediction, predict
from ds_twolevel.costmodel.hardware import H100_SXM, HardwareProfile
from ds_twolevel.parallel.layout import factorizations
from ds_twolevel.sharding.partition import head_problem, segment_problem

PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig("llama-3-8b", hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                              layers=32, vocab=128256),
    "llama-3-70b": ModelConfig("llama-3-70b", hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672,
                               layers=80, vocab=128256),
    # the source paper's model: 2-layer dense (MHA) transformer, 32 heads x 128; MLP assumed 4H, GELU
    "paper": ModelConfig("paper", hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=16384,
                         layers=2, gated=False),
}


@dataclass(frozen=True)
class PlanRow:
    """One candidate layout: its prediction, or why it cannot run."""

    dp: int
    n: int
    m: int
    kind: str
    """"head-wise TP" (m = 1), "two-level" or "... + KV replication" (n > g), "single device"."""
    prediction: Prediction | None
    reason: str = ""
    """why it is infeasible (empty when feasible)."""

    @property
    def feasible(self) -> bool:
        return self.prediction is not None


def layout_kind(model: ModelConfig, n: int, m: int) -> str:
    """Human name of an (n, m) layout for ``model``."""
    kind = "single device" if n * m == 1 else "head-wise TP" if m == 1 else "two-level"
    return kind + (" + KV replication" if n > model.kv_heads else "")


def infeasibility(model: ModelConfig, dp: int, n: int, m: int, phase: Phase) -> str:
    """Why (dp, n, m) cannot run ``model`` / ``phase`` ('' when it can), from the partition rules."""
    spec = model.spec()
    problem = head_problem(spec, n, kv_replication=True) or segment_problem(spec, m)
    if problem:
        return problem
    if model.intermediate % (n * m):
        return f"intermediate_size ({model.intermediate}) is not divisible by n*m={n * m}"
    if phase.batch % dp:
        return f"batch ({phase.batch}) is not divisible by dp={dp}"
    return ""


def plan(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile = H100_SXM, *,
         strategy: str = "cost_model") -> list[PlanRow]:
    """Every dp x n x m factorisation of ``devices``: feasible ones sorted by predicted time, then the rest.

    Example:
        >>> rows = plan(PRESETS["llama-3-8b"], 16, Phase("decode", 16, 8192))
        >>> best = rows[0]; best.dp, best.n, best.m
    """
    rows = []
    for dp, n, m in factorizations(devices):
        reason = infeasibility(model, dp, n, m, phase)
        pred = None if reason else predict(model, n, m, phase, hw, dp=dp, strategy=strategy)
        if pred is not None and pred.memory_bytes > hw.memory_bytes:
            reason = (f"needs {pred.memory_bytes / 1e9:.1f} GB per device (params {pred.param_bytes / 1e9:.1f}, "
                      f"KV {pred.kv_cache_bytes / 1e9:.1f}, activations {pred.activation_bytes / 1e9:.1f}) "
                      f"> {hw.memory_bytes / 1e9:.0f} GB")
            pred = None
        rows.append(PlanRow(dp, n, m, layout_kind(model, n, m), pred, reason))
    feasible = sorted((r for r in rows if r.feasible), key=lambda r: (r.prediction.time, r.prediction.comm_bytes))
    return feasible + [r for r in rows if not r.feasible]


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def format_plan(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile, rows: list[PlanRow]) -> str:
    """Markdown table of a plan: feasible layouts (best first, marked), then infeasible with reasons."""
    head = (f"**{model.name}** on {devices} x {hw.name}, {phase.kind} batch {phase.batch}, "
            f"{'seq' if phase.kind == 'prefill' else 'KV cache'} {phase.seq}\n\n"
            "| | dp x n x m | kind | strategy | step ms | tokens/s | sent MB/rank | params GB | KV GB | mem GB |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for k, r in enumerate(x for x in rows if x.feasible):
        p = r.prediction
        lines.append(f"| {'**best**' if k == 0 else ''} | {r.dp} x {r.n} x {r.m} | {r.kind} | {p.strategy} | "
                     f"{p.time * 1e3:.3f} | {p.tokens_per_s:,.0f} | {p.comm_bytes / 1e6:,.1f} | "
                     f"{_gb(p.param_bytes)} | {_gb(p.kv_cache_bytes)} | {_gb(p.memory_bytes)} |")
    bad = [r for r in rows if not r.feasible]
    if bad:
        lines.append("\nInfeasible:\n")
        lines += [f"- {r.dp} x {r.n} x {r.m} ({r.kind}): {r.reason}" for r in bad]
    return "\n".join(lines)


# -- the source paper's experiment ---------------------------------------------------------------------
PAPER_CLAIMS = {"baseline_tokens_per_s": 1.2e6, "twolevel_tokens_per_s": 1.58e6,
                "baseline_tpot_ms": 0.35, "twolevel_tpot_ms": 0.22}


@dataclass(frozen=True)
class PaperRow:
    """Predicted prefill throughput and decode time per output token for one 16-GPU setup."""

    label: str
    prefill_tokens_per_s: float
    tpot_ms: float
    prefill_comm_s: float
    decode_comm_ms: float
    strategy: str


def pipeline_baseline(model: ModelConfig, tp: int, pp: int, prefill: Phase, decode: Phase,
                      hw: HardwareProfile, microbatches: int) -> PaperRow:
    """TP x PP: each stage holds layers/pp layers on tp GPUs of one node; GPipe schedule.

    Prefill time = (microbatches + pp - 1) x (stage time of one microbatch + activation send);
    TPOT = pp x stage time of the whole decode batch + (pp - 1) sends (one token crosses every stage).
    """
    stage = replace(model, layers=model.layers // pp)
    mb = Phase("prefill", prefill.batch // microbatches, prefill.seq)
    send = lambda tokens: hw.collective_latency + tokens * model.hidden * hw.dtype_bytes / hw.inter_node_busbw
    p_stage = predict(stage, tp, 1, mb, hw)
    t_prefill = (microbatches + pp - 1) * (p_stage.time + send(mb.tokens))
    d_stage = predict(stage, tp, 1, decode, hw)
    tpot = pp * d_stage.time + (pp - 1) * send(decode.tokens)
    return PaperRow(f"TP={tp} x PP={pp} (baseline)", prefill.tokens / t_prefill, tpot * 1e3,
                    (microbatches + pp - 1) * p_stage.comm_time, pp * d_stage.comm_time * 1e3, p_stage.strategy)


def paper_experiment(hw: HardwareProfile = H100_SXM, *, devices: int = 16, microbatches: int = 8,
                     batch: int = 128, seq: int = 10000) -> list[PaperRow]:
    """The paper's setting (16 H100, FP16, 2-layer MHA, 32 x 128, seq 10000, batch 128), modelled.

    Rows: the TP=8 x PP=2 baseline, then every feasible dp x n x m layout of ``devices``.
    """
    model = PRESETS["paper"]
    prefill, decode = Phase("prefill", batch, seq), Phase("decode", batch, seq)
    rows = [pipeline_baseline(model, 8, 2, prefill, decode, hw, microbatches)]
    for dp, n, m in factorizations(devices):
        if infeasibility(model, dp, n, m, prefill):
            continue
        p, d = predict(model, n, m, prefill, hw, dp=dp), predict(model, n, m, decode, hw, dp=dp)
        label = f"dp={dp} x n={n} x m={m} ({layout_kind(model, n, m)})"
        strategy = p.strategy if p.strategy == d.strategy else f"{p.strategy} / {d.strategy}"
        rows.append(PaperRow(label, p.tokens_per_s, d.time * 1e3, p.comm_time, d.comm_time * 1e3, strategy))
    return rows


def format_paper(rows: list[PaperRow]) -> str:
    """Markdown table of :func:`paper_experiment` beside the paper's claims."""
    base = rows[0]
    lines = ["| setup | strategy (prefill / decode) | prefill tokens/s | vs baseline | TPOT ms | vs baseline | "
             "prefill comm s | decode comm ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.strategy} | {r.prefill_tokens_per_s / 1e6:.2f}M | "
                     f"{r.prefill_tokens_per_s / base.prefill_tokens_per_s - 1:+.1%} | {r.tpot_ms:.3f} | "
                     f"{r.tpot_ms / base.tpot_ms:.2f}x | {r.prefill_comm_s:.3f} | {r.decode_comm_ms:.3f} |")
    c = PAPER_CLAIMS
    lines.append(f"| *paper's claim, baseline* | | {c['baseline_tokens_per_s'] / 1e6:.2f}M | | "
                 f"{c['baseline_tpot_ms']:.2f} | | | |")
    lines.append(f"| *paper's claim, two-level* | | {c['twolevel_tokens_per_s'] / 1e6:.2f}M | "
                 f"{c['twolevel_tokens_per_s'] / c['baseline_tokens_per_s'] - 1:+.1%} | {c['twolevel_tpot_ms']:.2f} | "
                 f"{c['twolevel_tpot_ms'] / c['baseline_tpot_ms']:.2f}x | | |")
    return "\n".join(lines)


# -- when no layout fits ------------------------------------------------------------------------------
def _best_layout(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile, strategy: str) -> str | None:
    rows = [r for r in plan(model, devices, phase, hw, strategy=strategy) if r.feasible]
    return f"{rows[0].dp} x {rows[0].n} x {rows[0].m}" if rows else None


def nearest_feasible(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile, *,
                     strategy: str = "cost_model") -> list[tuple[int, str]]:
    """The nearest device counts below and above ``devices`` with a feasible layout: [(P, best dp x n x m)].

    Example:
        >>> nearest_feasible(PRESETS["llama-3-8b"], 3, Phase("prefill", 8, 4096), H100_SXM)
        [(2, '1 x 2 x 1'), (4, '1 x 4 x 1')]
    """
    found = []
    for counts in (range(devices - 1, 0, -1), range(devices + 1, 4 * devices + 9)):
        for p in counts:
            best = _best_layout(model, p, phase, hw, strategy)
            if best:
                found.append((p, best))
                break
    return found


def no_layout_message(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile, rows: list[PlanRow], *,
                      strategy: str = "cost_model", shown: int = 4) -> str:
    """One line: no layout of ``devices`` fits, why (the first ``shown`` reasons), the nearest counts that fit."""
    why = "; ".join(f"{r.dp} x {r.n} x {r.m}: {r.reason}" for r in rows[:shown])
    if len(rows) > shown:
        why += f"; ... ({len(rows) - shown} more)"
    near = nearest_feasible(model, devices, phase, hw, strategy=strategy)
    fits = (" and ".join(f"{p} (best {layout})" for p, layout in near) if near else "none up to "
            f"{4 * devices + 8} devices")
    return (f"no dp x n x m layout of {devices} devices can run {model.name} ({phase.kind}, batch {phase.batch}, "
            f"seq {phase.seq}, {hw.name}): {why}. Nearest device counts with a feasible layout: {fits}")
