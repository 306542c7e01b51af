"""Training planner: every dp x sp x n x m layout of P devices, ranked by predicted step time.

:func:`plan_train` predicts each layout with :func:`~ds_twolevel.costmodel.training.predict_train`, keeps
those whose per-rank memory fits the bound, sorts them by step time, and says why the others cannot run.
Each layout is predicted as the runtime runs it (:func:`runtime_setup`): with sp > 1 the two-level group runs
without its sequence_parallel and vocab_parallel, whatever the switches say; they apply to sp = 1 layouts.
:func:`why_best` is the one line that says why the winner wins against the best of the other families
(Ulysses alone, two-level alone, the composition). :func:`grid_table` is the modelled table of the docs.
Pure: no torch, no process group.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ds_twolevel.costmodel.hardware import H100_SXM, HardwareProfile
from ds_twolevel.costmodel.roofline import ModelConfig
from ds_twolevel.costmodel.training import TrainLayout, TrainPrediction, TrainSetup, layout_problem, layouts, predict_train

GRID_DEVICES = (16, 32, 64)
GRID_SEQS = (8192, 32768, 131072, 1048576)
GRID_BATCHES = (1, 8)


def runtime_setup(layout: TrainLayout, setup: TrainSetup) -> TrainSetup:
    """The setup ``layout`` runs with: ``setup``, except that with Ulysses (sp > 1) two-level's
    sequence_parallel and vocab_parallel are off, as the runtime composes Ulysses with two-level (it refuses
    either switch at sp > 1); for n * m = 1 both are no-ops anyway.

    Example:
        >>> runtime_setup(TrainLayout(1, 8, 2, 1), TrainSetup(1, 32768)).sequence_parallel
        False
    """
    if layout.sp > 1 and (setup.sequence_parallel or setup.vocab_parallel):
        return dataclasses.replace(setup, sequence_parallel=False, vocab_parallel=False)
    return setup


@dataclass(frozen=True)
class TrainRow:
    """One candidate layout: its prediction (None when a rule forbids it) and why it cannot run."""

    layout: TrainLayout
    prediction: TrainPrediction | None
    reason: str = ""
    """why it cannot run, or that it does not fit the memory bound (empty when it fits)."""
    setup: TrainSetup | None = None
    """what it was predicted with (:func:`runtime_setup` of the planner's setup)."""

    @property
    def fits(self) -> bool:
        return not self.reason


def plan_train(model: ModelConfig, devices: int, setup: TrainSetup, hw: HardwareProfile = H100_SXM, *,
               memory_bytes: float | None = None) -> list[TrainRow]:
    """Every dp x sp x n x m layout of ``devices``: those that fit ``memory_bytes`` (default: the
    profile's) by step time, then those over it by memory, then those a rule forbids. Each layout is
    checked and predicted with :func:`runtime_setup` (sp > 1: sequence_parallel and vocab_parallel off).

    Example:
        >>> rows = plan_train(PRESETS["llama-3-8b"], 16, TrainSetup(batch=1, seq=131072))
        >>> rows[0].layout.label, rows[0].prediction.time
    """
    bound = hw.memory_bytes if memory_bytes is None else memory_bytes
    rows = []
    for layout in layouts(devices):
        runs = runtime_setup(layout, setup)
        problem = layout_problem(model, layout, runs)
        pred = None if problem else predict_train(model, layout, runs, hw)
        if pred is not None and pred.memory.total > bound:
            problem = f"needs {pred.memory.total / 1e9:.2f} GB per rank > {bound / 1e9:.0f} GB"
        rows.append(TrainRow(layout, pred, problem, runs))
    fit = sorted((r for r in rows if r.fits), key=lambda r: (r.prediction.time, r.prediction.comm_bytes))
    over = sorted((r for r in rows if not r.fits and r.prediction), key=lambda r: r.prediction.memory.total)
    return fit + over + [r for r in rows if r.prediction is None]


def best_of(rows: list[TrainRow], family: str | None = None) -> TrainRow | None:
    """The fastest fitting row of ``family`` ("Ulysses" counts sp >= 1 with n = m = 1, "two-level"
    sp = 1; None: any)."""
    match = {None: lambda l: True, "Ulysses": lambda l: l.tp == 1, "two-level": lambda l: l.sp == 1,
             "composed": lambda l: l.sp > 1 and l.tp > 1}[family]
    return next((r for r in rows if r.fits and match(r.layout)), None)


def _seq(s: int) -> str:
    return f"{s // 1048576}M" if s % 1048576 == 0 else f"{s // 1024}K" if s % 1024 == 0 else str(s)


def _unavailable(model: ModelConfig, devices: int, setup: TrainSetup, rows: list[TrainRow], family: str) -> str:
    """Why no layout of ``family`` fits: the head limit, or the memory bound."""
    mine = [r for r in rows if (r.layout.tp == 1 if family == "Ulysses" else r.layout.sp == 1)]
    over = [r for r in mine if r.prediction is not None]
    if family == "Ulysses" and not over and all("heads" in r.reason or "batch" in r.reason for r in mine):
        return (f"Ulysses cannot use {devices} ranks on {model.heads} heads (sp <= {model.heads}, "
                f"dp divides batch {setup.batch})")
    if not over:
        return f"{family} alone has no layout of {devices} ranks ({mine[-1].reason})"
    least = min(r.prediction.memory.total for r in over)
    return f"{family} alone needs at least {least / 1e9:.2f} GB per rank"


def _compare(best: TrainRow, other: TrainRow, setup: TrainSetup) -> str:
    """What makes ``best`` faster than ``other``: fewer bytes, faster collectives, or less compute."""
    win, them, name = best.prediction, other.prediction, other.layout.label
    at = f"at s={_seq(setup.seq)}"
    if win.comm_bytes < them.comm_bytes and win.comm_time < them.comm_time:
        return f"fewer bytes {at} ({win.comm_bytes / 1e9:.2f} vs {them.comm_bytes / 1e9:.2f} GB per rank for {name})"
    if win.comm_time < them.comm_time:
        return (f"faster collectives {at} ({win.comm_time * 1e3:.0f} vs {them.comm_time * 1e3:.0f} ms for {name}, "
                f"more of them inside a node)")
    return f"less compute time {at} ({win.compute_time * 1e3:.0f} vs {them.compute_time * 1e3:.0f} ms for {name})"


def why_best(model: ModelConfig, devices: int, setup: TrainSetup, rows: list[TrainRow]) -> str:
    """One line: why the best layout wins against the best of the families it is not in (Ulysses alone,
    two-level alone), or why those families have no layout that fits.

    Example:
        >>> why_best(model, 64, setup, plan_train(model, 64, setup))
        'Ulysses sp=32 x two-level 1x2: Ulysses cannot use 64 ranks on 32 heads (...); fewer bytes ...'
    """
    best = best_of(rows)
    if best is None:
        return "no layout fits"
    rivals = [f for f in ("Ulysses", "two-level") if not (f == "Ulysses" and best.layout.tp == 1
                                                          or f == "two-level" and best.layout.sp == 1)]
    parts = [_unavailable(model, devices, setup, rows, f) for f in rivals if best_of(rows, f) is None]
    available = [best_of(rows, f) for f in rivals if best_of(rows, f) is not None]
    if not rivals:  # pure data parallelism: in both families; against the runner-up
        available = [r for r in rows[1:2] if r.fits]
    if available:
        parts.append(_compare(best, min(available, key=lambda r: r.prediction.time), setup))
    return f"{best.layout.label}: " + ("; ".join(parts) or "the only layout that fits")


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def _group_switches(setup: TrainSetup) -> list[str]:
    """The two-level group's switches as the rows use them: those on apply at sp = 1 only."""
    named = (("sequence_parallel", setup.sequence_parallel), ("vocab_parallel", setup.vocab_parallel))
    on = [name for name, value in named if value]
    off = [f"no {name}" for name, value in named if not value]
    if not on:
        return off
    return [f"{' and '.join(on)} at sp = 1 (off at sp > 1, as the runtime composes Ulysses)"] + off


def setup_line(model: ModelConfig, devices: int, setup: TrainSetup, hw: HardwareProfile, bound: float) -> str:
    """The plan's first line: model, devices, batch x seq, the switches as the rows use them, the bound."""
    switches = [f"ZeRO-{setup.zero}", "checkpointing" if setup.checkpointing else "no checkpointing",
                *_group_switches(setup)]
    return (f"**{model.name}** training on {devices} x {hw.name}, batch {setup.batch} x seq {setup.seq}, "
            f"{', '.join(switches)}; memory bound {bound / 1e9:.0f} GB per rank")


def run_config(layout: TrainLayout) -> dict:
    """The DeepSpeed config keys that run ``layout`` as the planner predicts it (dp = world / (sp * n * m)).

    Example:
        >>> run_config(TrainLayout(1, 32, 1, 2))["two_level"]
        {'n': 1, 'm': 2, 'sequence_parallel': False, 'vocab_parallel': False}
    """
    two_level: dict = {"n": layout.n, "m": layout.m}
    if layout.sp > 1:
        two_level.update(sequence_parallel=False, vocab_parallel=False)
        return {"sequence_parallel_size": layout.sp, "two_level": two_level}
    return {"two_level": two_level}


def assumption_line(layout: TrainLayout) -> str:
    """What a composed (sp > 1, n * m > 1) layout is predicted with, and the config keys that run it.

    Example:
        >>> assumption_line(TrainLayout(2, 32, 1, 2))[:60]
        'Assumes: Ulysses sp=32 x two-level 1x2 (dp=2) runs two-level'
    """
    return (f"Assumes: {layout.label} runs two-level's sequence_parallel and vocab_parallel off, as the runtime "
            f"composes Ulysses: each rank of its {layout.n}x{layout.m} group holds the same s/{layout.sp} tokens and "
            f"their logits over the whole vocabulary. Config: {json.dumps(run_config(layout))}")


def format_train_plan(model: ModelConfig, devices: int, setup: TrainSetup, hw: HardwareProfile,
                      rows: list[TrainRow], *, memory_bytes: float | None = None) -> str:
    """Markdown: the layouts that fit (best first) with memory broken down, the why line (and, when the best
    is composed, what it assumes), then the rest."""
    bound = hw.memory_bytes if memory_bytes is None else memory_bytes
    lines = [setup_line(model, devices, setup, hw, bound), "",
             "| | dp x sp x n x m | layout | step s | tokens/s | GB sent/rank | weights | gathered | grads | "
             "optimizer | activations | logits | total GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(x for x in rows if x.fits):
        p, mem, l = r.prediction, r.prediction.memory, r.layout
        lines.append(f"| {'**best**' if k == 0 else ''} | {l.dp} x {l.sp} x {l.n} x {l.m} | {l.label} | "
                     f"{p.time:.3f} | {p.tokens_per_s:,.0f} | {p.comm_bytes / 1e9:.2f} | {_gb(mem.weights)} | "
                     f"{_gb(mem.gathered)} | {_gb(mem.gradients)} | {_gb(mem.optimizer)} | {_gb(mem.activations)} | "
                     f"{_gb(mem.loss)} | {_gb(mem.total)} |")
    lines += ["", f"Why: {why_best(model, devices, setup, rows)}"]
    best = best_of(rows)
    if best is not None and best.layout.family == "composed":
        lines += ["", assumption_line(best.layout)]
    rest = [r for r in rows if not r.fits]
    if rest:
        lines += ["", "Does not fit or cannot run:", ""]
        lines += [f"- {r.layout.dp} x {r.layout.sp} x {r.layout.n} x {r.layout.m} ({r.layout.label}): {r.reason}"
                  for r in rest]
    return "\n".join(lines)


def _cell(row: TrainRow | None) -> str:
    return "-" if row is None else f"{row.layout.label}: {row.prediction.time:.2f} s, {_gb(row.prediction.memory.total)} GB"


def grid_table(models: dict[str, ModelConfig], hw: HardwareProfile = H100_SXM, *,
               devices: tuple[int, ...] = GRID_DEVICES, seqs: tuple[int, ...] = GRID_SEQS,
               batches: tuple[int, ...] = GRID_BATCHES, setup: TrainSetup | None = None) -> str:
    """Markdown: for each model, device count, sequence length and batch, the best layout that fits and
    the best Ulysses-alone and two-level-alone layouts ("-": none fits), with the why line.

    Example:
        >>> print(grid_table({"llama-3-8b": PRESETS["llama-3-8b"]}, devices=(16,), seqs=(131072,), batches=(1,)))
    """
    base = setup or TrainSetup(batch=1, seq=8192)
    lines = ["| model | GPUs | seq | batch | best (step s, GB/rank) | Ulysses alone | two-level alone | why |",
             "|---|---|---|---|---|---|---|---|"]
    for name, model in models.items():
        for p in devices:
            for s in seqs:
                for b in batches:
                    setup_ = TrainSetup(b, s, base.zero, base.checkpointing, base.sequence_parallel,
                                        base.vocab_parallel, base.element_size, base.reduce_size)
                    rows = plan_train(model, p, setup_, hw)
                    why = why_best(model, p, setup_, rows).split(": ", 1)[-1]
                    lines.append(f"| {name} | {p} | {_seq(s)} | {b} | {_cell(best_of(rows))} | "
                                 f"{_cell(best_of(rows, 'Ulysses'))} | {_cell(best_of(rows, 'two-level'))} | {why} |")
    return "\n".join(lines)
