"""Decode-vs-context study: the grid, auto against the fixed strategies, Helix's memory
and traffic, AutoTP's model against head-wise TP, the crossovers (pure, no ranks)."""
from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import pytest

from ds_twolevel.costmodel import Phase, predict
from ds_twolevel.costmodel import study
from ds_twolevel.costmodel.hardware import H100_SXM
from ds_twolevel.strategies import registry
from ds_twolevel.costmodel.study import (FAMILIES, MODELS, autotp_point, crossover, grid, headwise_point,
                                         helix_point, two_level_strategies)

LLAMA8, LLAMA70 = MODELS["llama-3-8b"], MODELS["llama-3-70b"]


@pytest.fixture(scope="module")
def cases():
    notes: list[str] = []
    return grid(H100_SXM, notes=notes), notes


def test_grid_runs_every_family(cases):
    cases, notes = cases
    assert len(cases) == len(MODELS) * len(study.DEVICES) * len(study.BATCHES) * len(study.CONTEXTS)
    for case in cases:
        for family in FAMILIES:
            best = case.best(family)
            assert best is not None, (case.model, case.devices, family)
            assert best.time > 0 and best.traffic_bytes > 0 and best.kv_bytes > 0 and best.weight_bytes > 0
        layouts = {p.layout for p in case.points if p.family == "two-level"}
        assert len(layouts) >= 3  # 8 x 2, 4 x 4, 2 x 8, ... (m > 1)
        per_layout = len(two_level_strategies()) + 1  # + auto
        count = sum(p.family == "two-level" for p in case.points)
        assert count <= per_layout * len(layouts)
        if not notes:  # nothing skipped: every layout with every strategy and auto
            assert count == per_layout * len(layouts)


def test_auto_never_above_best_fixed_strategy(cases):
    """Over the grid, auto's modelled time is never above the best fixed strategy's."""
    worse = []
    for case in cases[0]:
        by_layout = defaultdict(dict)
        for p in case.points:
            if p.family == "two-level":
                by_layout[p.layout][p.strategy] = p
        for layout, strategies in by_layout.items():
            auto = strategies.pop("cost_model")
            best = min(strategies.values(), key=lambda p: p.time)
            if auto.time > best.time * (1 + 1e-12):
                worse.append(f"{case.model} P={case.devices} b={case.batch} s={case.s_kv} {layout}: auto "
                             f"({auto.chosen}) {auto.time * 1e3:.3f} ms > {best.strategy} {best.time * 1e3:.3f} ms")
    assert not worse, f"{len(worse)} points:\n" + "\n".join(worse[:20])


def _within_memory_bound(model, key, phase, hw, predictions):
    """The predictions whose strategy "auto" may pick at that row: activations within
    ``registry.MEMORY_FACTOR`` of the leanest able strategy's (the registry's own accounting)."""
    from ds_twolevel.costmodel.roofline import attention_call, strategy_call

    dp, n, m = key
    call = attention_call(model, n, m, phase.batch // dp, phase.q_len, phase.kv_len)
    act = lambda p: registry.predicted_activation(strategy_call(call, p.strategy, hw.dtype_bytes), p.strategy)
    lean = min(act(p) for p in predictions)
    return [p for p in predictions if act(p) <= registry.MEMORY_FACTOR * lean]


def test_memory_bound_costs_little_time():
    """Where the memory bound leaves the fastest strategy out (the H100 prefill rows of the planner grid),
    auto's time stays within 3% of it; without the bound, auto would be the fastest."""
    from ds_twolevel.costmodel.planner import PRESETS

    model, phase = PRESETS["llama-3-8b"], Phase("prefill", 8, 4096)
    auto = predict(model, 2, 2, phase, H100_SXM, dp=8)
    fastest = min((predict(model, 2, 2, phase, H100_SXM, dp=8, strategy=s) for s in two_level_strategies()),
                  key=lambda p: p.time)
    assert (auto.strategy, fastest.strategy) == ("seq_rows", "qk_allgather")
    assert fastest.time < auto.time < 1.03 * fastest.time
    assert fastest.activation_bytes > 2 * auto.activation_bytes


def test_helix_holds_more_weights_and_a_1_over_p_kv_share(cases):
    for case in cases[0]:
        helix = [p for p in case.points if p.family == "Helix"]
        two = [p for p in case.points if p.family == "two-level"]
        assert helix and two
        assert min(p.weight_bytes for p in helix) > max(p.weight_bytes for p in two)
        model = MODELS[case.model]
        total = model.layers * case.batch * model.kv_heads * (case.s_kv + 1) * 2 * model.head_dim * 2
        for p in helix:  # 1/P of the cache (the most loaded shard rounds its positions up)
            kvp = int(p.layout.split(" x ")[1])
            assert total / case.devices <= p.kv_bytes <= total / case.devices * (1 + kvp / case.s_kv)


@pytest.mark.parametrize("model", [LLAMA8, LLAMA70])
def test_partial_attention_combines_do_not_grow_with_context(model):
    """Helix's (o, lse) exchange, and kv_shard's where predict knows it: same bytes at every s_kv."""
    sent = {s: helix_point(model, 8, 2, Phase("decode", 16, s), H100_SXM).traffic_bytes for s in (256, 1024, 4096)}
    assert len(set(sent.values())) == 1, sent
    if "kv_shard" in two_level_strategies():
        sent = {s: predict(model, 4, 4, Phase("decode", 16, s), H100_SXM, strategy="kv_shard").comm_bytes
                for s in (256, 1024, 4096)}
        assert len(set(sent.values())) == 1, sent
    # the score all-reduce does grow with s_kv (so the check above can fail)
    grow = {s: predict(model, 4, 4, Phase("decode", 16, s), H100_SXM, strategy="score_allreduce").comm_bytes
            for s in (256, 1024)}
    assert grow[1024] > grow[256]


@pytest.mark.parametrize("batch,s_kv", [(1, 4096), (64, 131072)])
def test_autotp_is_headwise_tp_up_to_g_ranks(batch, s_kv):
    """At P <= g AutoTP splits like head-wise TP: the two models must agree to the byte and second."""
    phase = Phase("decode", batch, s_kv)
    a, h = autotp_point(LLAMA8, 8, phase, H100_SXM), headwise_point(LLAMA8, 8, phase, H100_SXM)
    assert (a.traffic_bytes, a.kv_bytes, a.weight_bytes) == (h.traffic_bytes, h.kv_bytes, h.weight_bytes)
    assert a.time == pytest.approx(h.time, rel=1e-12)
    # past g its busy ranks keep one KV head and h/g query heads (head-wise + KV replication: one KV head,
    # h/P query heads): the same KV, more weights and compute, the same all-reduces
    a16, h16 = autotp_point(LLAMA8, 16, phase, H100_SXM), headwise_point(LLAMA8, 16, phase, H100_SXM)
    assert a16.kv_bytes == h16.kv_bytes and a16.traffic_bytes == h16.traffic_bytes
    assert a16.weight_bytes > h16.weight_bytes and a16.compute_time > h16.compute_time


def test_refused_strategy_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(study, "two_level_strategies", lambda: ("score_allreduce", "no_such_strategy"))
    notes: list[str] = []
    pts = study.points(LLAMA8, 16, 16, 4096, H100_SXM, notes)
    assert notes and all("no_such_strategy" in line and "skipped" in line for line in notes)
    assert {p.strategy for p in pts if p.family == "two-level"} == {"score_allreduce", "cost_model"}


def test_crossover_is_where_the_margin_changes_sign():
    x = crossover(LLAMA8, 16, 16, H100_SXM)
    assert x.s_kv is not None and not x.at_start and study.CONTEXTS[0] < x.s_kv < study.CONTEXTS[-1]
    margin = lambda s: study._margin(LLAMA8, 16, 16, s, H100_SXM, FAMILIES[0], FAMILIES[1])
    assert margin(x.s_kv) > 0 >= margin(x.s_kv - 1)
    assert x.describe() == f"at s_kv = {x.s_kv:,}"


def test_study_core_imports_no_integration_package():
    code = ("import sys, ds_twolevel.costmodel.study; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'transformers', 'hf_integration', "
            "'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_front_end_writes_section_plot_and_grid(tmp_path):
    import json

    from ds_twolevel.tools import study as front

    assert front.main(["--out", str(tmp_path)]) == 0
    md = (tmp_path / front.MD).read_text()
    assert md.startswith("## Decode against context length") and f"]({front.PNG})" in md
    for family in FAMILIES:
        assert f"| {family} |" in md
    crossovers, helix = md.split("### Two-level against Helix")
    rows = len(MODELS) * len(study.DEVICES) * len(study.BATCHES)
    assert crossovers.count("| llama-3-") == rows and helix.split("### ")[0].count("| llama-3-") == rows
    assert (tmp_path / front.PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / front.JSON).read_text())
    assert len(data["cases"]) == len(MODELS) * len(study.DEVICES) * len(study.BATCHES) * len(study.CONTEXTS)
    assert data["meta"]["strategies"] == list(two_level_strategies())


@pytest.mark.parametrize("profile", ["h100", "cpu"])
def test_auto_never_above_best_fixed_strategy_over_the_planners_grid(profile):
    """The memory-bound acceptance line on the planner itself: every feasible two-level row of ``plan`` (the
    report's cases, 8..64 devices, both hardware profiles), auto's time <= the best fixed strategy's among
    those "auto" may pick: the registry also bounds auto's activations by 2x the leanest strategy's, and on the
    H100 profile that bound is what keeps qk_allgather (its s^2 math-path scores) out of 7 prefill rows
    where it would be 0.1-2% faster than seq_rows (``test_memory_bound_costs_little_time`` below)."""
    from ds_twolevel.costmodel.hardware import get_profile
    from ds_twolevel.costmodel.planner import PRESETS, plan

    hw, worse = get_profile(profile), []
    cases = {"llama-3-8b": (("prefill", 8, 4096), ("decode", 64, 8192)),
             "paper": (("prefill", 128, 10000), ("decode", 128, 10000))}
    for name, phases in cases.items():
        for kind, batch, seq in phases:
            for devices in (8, 16, 32, 64):
                rows = {s: {(r.dp, r.n, r.m): r.prediction for r in plan(PRESETS[name], devices,
                                                                       Phase(kind, batch, seq), hw, strategy=s)
                            if r.feasible and r.m > 1} for s in two_level_strategies() + ("auto",)}
                for key, auto in rows.pop("auto").items():
                    fixed = [r[key] for r in rows.values() if key in r]
                    best = min(_within_memory_bound(PRESETS[name], key, Phase(kind, batch, seq), hw, fixed),
                               key=lambda p: p.time)
                    if auto.time > best.time * (1 + 1e-12):
                        worse.append(f"{name} {kind} b={batch} s={seq} {devices} dev {key}: auto ({auto.strategy}) "
                                     f"{auto.time * 1e3:.3f} ms > {best.strategy} {best.time * 1e3:.3f} ms")
    assert not worse, f"{len(worse)} rows:\n" + "\n".join(worse[:10])


def test_two_level_within_one_collective_latency_per_layer_of_helix(cases):
    """Where two-level's best is slower than Helix's, the gap is less than one collective latency per layer (the
    q/k/v segment all-gather kv_shard adds), and two-level holds fewer weight bytes per device everywhere."""
    cases, _ = cases
    gaps = study.helix_gaps(cases, H100_SXM)
    assert len(gaps) == len(cases)
    for g in gaps:
        assert g.latencies < 1.0, (g.model, g.devices, g.batch, g.s_kv, g.ratio, g.latencies)
        assert g.two_level.weight_bytes < g.helix.weight_bytes, (g.model, g.devices, g.batch, g.s_kv)
    assert any(g.ratio > 1.01 for g in gaps) and any(g.ratio <= 1.01 for g in gaps)  # both occur: the page says where
