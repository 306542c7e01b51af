"""Training cost model and planner: memory by hand, the switches, Ulysses' rules, the grid (pure, no ranks)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_twolevel.costmodel.hardware import H100_SXM
from ds_twolevel.costmodel.planner import PRESETS
from ds_twolevel.costmodel.roofline import ModelConfig
from ds_twolevel.costmodel.train_planner import best_of, plan_train, why_best
from ds_twolevel.costmodel.training import (TrainLayout, TrainSetup, head_collectives, layer_collectives,
                                            layout_problem, layouts, memory, predict_train, shard_parameters,
                                            ulysses_collectives)

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig("tiny", hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, layers=2, vocab=100)
LLAMA_8B, LLAMA_70B = PRESETS["llama-3-8b"], PRESETS["llama-3-70b"]
PAIR_TAGS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def test_layouts_are_every_four_way_factorisation():
    got = layouts(16)
    assert len(got) == len(set(got)) == 35  # ordered 4-factorisations of 2^4: C(4 + 3, 3)
    assert all(l.devices == 16 for l in got)
    assert TrainLayout(1, 16, 1, 1).family == "Ulysses" and TrainLayout(2, 1, 4, 2).family == "two-level"
    assert TrainLayout(1, 4, 2, 2).family == "composed" and TrainLayout(16, 1, 1, 1).family == "data parallel"


def test_memory_breakdown_matches_a_hand_count():
    # n=2, m=1 on TINY: per layer W_q, W_o 64*2*16 each, W_k, W_v 64*1*16 each, MLP 3*64*128/2, 2 norms of 64
    layer = 2 * 64 * 2 * 16 + 2 * 64 * 1 * 16 + 3 * 64 * 128 // 2 + 2 * 64
    embed = 100 * 64 * 2 // 2  # embedding + head, vocab-parallel over n*m = 2
    params = 2 * layer + 64 + embed  # 2 layers + final norm
    assert shard_parameters(TINY, 2, 1, True) == (params, layer, embed)
    setup = TrainSetup(batch=1, seq=32, zero=0, checkpointing=False)
    mem = memory(TINY, TrainLayout(1, 1, 2, 1), setup)
    # per layer, elements: the 2 norms' inputs (H) on 32/2 residual tokens; on 32 tokens the 2 norms' outputs
    # gathered (H each), q and attention output (4*16/2 each), k and v at full width (1 KV head x 16), MLP
    # gate and up (2 * 128/2)
    per_layer = 2 * 64 * 16 + 32 * (2 * 64 + 2 * 32 + 2 * 16 + 2 * 64)
    assert (mem.weights, mem.gradients, mem.optimizer, mem.gathered) == (2 * params, 2 * params, 12 * params, 0)
    assert mem.activations == 2 * per_layer * 2  # 2 layers, bf16
    assert mem.loss == 32 * 64 * 2 + 32 * 100 // 2 * 10  # gathered head input; (s, V/2) logits at 10 bytes
    assert mem.total == pytest.approx(mem.weights + mem.gradients + mem.optimizer + mem.activations + mem.loss)
    kept = memory(TINY, TrainLayout(1, 1, 2, 1), TrainSetup(batch=1, seq=32, zero=0, checkpointing=True))
    assert kept.activations == (2 * 16 * 64 + per_layer) * 2  # layer inputs + one layer recomputed


def test_zero_stages_divide_what_they_shard():
    lay, D = TrainLayout(2, 2, 2, 1), 4
    params, layer, _ = shard_parameters(TINY, 2, 1, True)
    mem = {z: memory(TINY, lay, TrainSetup(batch=2, seq=32, zero=z)) for z in range(4)}
    assert mem[0].optimizer == 12 * params and mem[1].optimizer == 12 * params / D
    assert mem[1].gradients == 2 * params and mem[2].gradients == 2 * params / D
    assert mem[2].weights == 2 * params and mem[3].weights == 2 * params / D
    assert mem[2].gathered == 0 and mem[3].gathered == 2 * max(2 * layer, 100 * 64 / 2)
    with pytest.raises(ValueError, match="zero stage must be one of"):
        TrainSetup(batch=1, seq=8, zero=4)


def test_sequence_parallel_and_vocab_parallel_reduce_what_they_must():
    lay, base = TrainLayout(1, 1, 4, 4), dict(batch=1, seq=131072, zero=3)
    both = memory(LLAMA_8B, lay, TrainSetup(**base))
    no_sp = memory(LLAMA_8B, lay, TrainSetup(**base, sequence_parallel=False))
    no_vp = memory(LLAMA_8B, lay, TrainSetup(**base, vocab_parallel=False))
    none = memory(LLAMA_8B, lay, TrainSetup(**base, sequence_parallel=False, vocab_parallel=False))
    # the L checkpointed layer inputs and the recomputed layer's 2 norm inputs hold s/16 tokens, not s (the
    # norms' outputs enter the projections gathered: s tokens either way)
    s, H, L = 131072, 4096, 32
    assert no_sp.activations - both.activations == (L + 2) * H * (s - s // 16) * 2
    assert both.activations < no_sp.activations / 5
    head_in = 131072 * 4096 * 2  # the head's input, all s tokens (gathered, or never split)
    assert none.loss - head_in == 16 * (both.loss - head_in)  # full (s, V) logits on every rank
    assert no_vp.weights > both.weights and shard_parameters(LLAMA_8B, 4, 4, True)[2] * 16 == 2 * 128256 * 4096
    # sequence parallelism replaces each all-reduce by a reduce-scatter + all-gather: the same bytes when
    # sums are in the model's dtype; with fp32 sums (the layers' default) the gathers move bf16, so fewer
    sent = lambda setup: sum(c.bytes_sent(2, max(2, setup.reduce_size))
                             for c in layer_collectives(LLAMA_8B, lay, setup) if c.tag in PAIR_TAGS)
    same = dict(base, reduce_size=0)
    assert sent(TrainSetup(**same)) == sent(TrainSetup(**same, sequence_parallel=False))
    assert sent(TrainSetup(**base)) == pytest.approx(sent(TrainSetup(**base, sequence_parallel=False)) * 3 / 4)


def test_ulysses_refuses_heads_that_do_not_divide():
    setup = TrainSetup(batch=1, seq=8192)
    assert layout_problem(LLAMA_8B, TrainLayout(1, 64, 1, 1), setup) == \
        "Ulysses needs num_heads (32) divisible by sp=64"
    assert layout_problem(LLAMA_8B, TrainLayout(1, 8, 8, 1), setup) == \
        "Ulysses needs the group's 4 query heads (h/n = 32/8) divisible by sp=8"
    odd = ModelConfig("odd", hidden=768, heads=12, kv_heads=3, head_dim=64, intermediate=3072, layers=2, vocab=96)
    assert layout_problem(odd, TrainLayout(1, 2, 1, 1), setup) == \
        "Ulysses needs the group's 3 KV heads and sp=2 to divide one another"
    assert layout_problem(odd, TrainLayout(1, 4, 3, 1), TrainSetup(batch=1, seq=12288)) == ""  # 12/3 heads on sp=4
    assert "seq (8192) is not divisible by the 12 ranks" in layout_problem(odd, TrainLayout(1, 4, 3, 1), setup)
    with pytest.raises(ValueError, match="divisible by sp=64"):
        predict_train(LLAMA_8B, TrainLayout(1, 64, 1, 1), setup)


def test_ulysses_replicates_kv_heads_past_g_in_its_all_to_alls():
    setup = TrainSetup(batch=1, seq=131072)
    cols = {c.tag: c for c in ulysses_collectives(LLAMA_8B, TrainLayout(1, 16, 1, 1), setup) if not c.backward}
    tokens = 131072 // 16
    assert cols["q"].numel == cols["o"].numel == tokens * 32 * 128
    assert cols["k"].numel == cols["v"].numel == tokens * 16 * 128  # 8 KV heads repeated to 16
    at_g = {c.tag: c for c in ulysses_collectives(LLAMA_8B, TrainLayout(2, 8, 1, 1), TrainSetup(2, 131072))}
    assert at_g["k"].numel == 131072 // 8 * 8 * 128  # s/8 tokens of one sequence, 8 KV heads: no copies


def _as_run(layout, setup):
    """What the runtime runs: with Ulysses (sp > 1) two-level's sequence_parallel and vocab_parallel are off."""
    return dataclasses.replace(setup, sequence_parallel=False, vocab_parallel=False) if layout.sp > 1 else setup


def _family_best(model, devices, setup, keep):
    """The fastest layout that ``keep`` admits and that fits 80 GB, predicted here as the runtime runs it,
    not by the planner."""
    times = [predict_train(model, lay, _as_run(lay, setup), H100_SXM) for lay in layouts(devices)
             if keep(lay) and not layout_problem(model, lay, _as_run(lay, setup))]
    times = [p.time for p in times if p.memory.total <= H100_SXM.memory_bytes]
    return min(times, default=None)


GRID = [(model, p, s, b) for model in ("llama-3-8b", "llama-3-70b") for p in (16, 32, 64)
        for s in (8192, 32768, 131072, 1048576) for b in (1, 8)]


@pytest.mark.parametrize("model,devices,seq,batch", GRID, ids=[f"{m}-{p}-{s}-{b}" for m, p, s, b in GRID])
def test_planner_best_is_never_slower_than_ulysses_or_two_level_alone(model, devices, seq, batch):
    cfg, setup = PRESETS[model], TrainSetup(batch=batch, seq=seq)
    rows = plan_train(cfg, devices, setup, H100_SXM)
    best = best_of(rows)
    ulysses = _family_best(cfg, devices, setup, lambda l: l.n == l.m == 1)
    two_level = _family_best(cfg, devices, setup, lambda l: l.sp == 1)
    assert all(not (r.setup.sequence_parallel or r.setup.vocab_parallel) for r in rows if r.layout.sp > 1)
    if best is None:
        assert ulysses is None and two_level is None and _family_best(cfg, devices, setup, lambda l: True) is None
        return
    assert best.prediction.memory.total <= H100_SXM.memory_bytes
    assert best.prediction.time == _family_best(cfg, devices, setup, lambda l: True)
    for rival in (ulysses, two_level):
        assert rival is None or best.prediction.time <= rival
    fit = [r.prediction.time for r in rows if r.fits]
    assert fit == sorted(fit) and all(not r.fits for r in rows[len(fit):])


def test_why_line_names_the_regime():
    setup = TrainSetup(batch=1, seq=131072)
    rows = plan_train(LLAMA_8B, 64, setup)
    assert best_of(rows).layout.family == "composed" and best_of(rows, "Ulysses") is None
    assert "Ulysses cannot use 64 ranks on 32 heads" in why_best(LLAMA_8B, 64, setup, rows)
    rows = plan_train(LLAMA_8B, 16, setup)
    assert why_best(LLAMA_8B, 16, setup, rows).startswith("Ulysses sp=16: fewer bytes at s=128K")
    rows = plan_train(LLAMA_70B, 16, TrainSetup(batch=1, seq=32768))
    assert "Ulysses alone needs at least" in why_best(LLAMA_70B, 16, TrainSetup(batch=1, seq=32768), rows)


@pytest.mark.parametrize("model,devices,seq,batch", [("llama-3-8b", 64, 131072, 1), ("llama-3-70b", 16, 32768, 1),
                                                      ("llama-3-70b", 64, 8192, 8)])
def test_composed_rows_are_predicted_without_sequence_or_vocab_parallel(model, devices, seq, batch):
    """The runtime refuses two-level's sequence_parallel and vocab_parallel at sp > 1: a row with sp > 1 is the
    same layout predicted with both off, whatever the switches say; at sp = 1 the switches apply."""
    cfg, on = PRESETS[model], TrainSetup(batch=batch, seq=seq)
    off = TrainSetup(batch=batch, seq=seq, sequence_parallel=False, vocab_parallel=False)
    with_on = {r.layout: r for r in plan_train(cfg, devices, on)}
    with_off = {r.layout: r for r in plan_train(cfg, devices, off)}
    composed = [l for l in with_on if l.family == "composed" and with_on[l].prediction is not None]
    assert composed
    for lay in composed:
        row = with_on[lay]
        assert row.setup == off and row == with_off[lay]
        direct = predict_train(cfg, lay, off)
        assert row.prediction.memory == direct.memory and row.prediction.bytes_by_axis == direct.bytes_by_axis
        assert row.prediction.time == direct.time
    two_level = [l for l in with_on if l.family == "two-level" and with_on[l].prediction is not None]
    assert two_level and all(with_on[l].prediction.memory.total < with_off[l].prediction.memory.total
                             for l in two_level)


def test_composed_memory_and_bytes_by_hand():
    """sp=2 x two-level 2x1 on TINY: the group's ranks hold the same s/2 tokens, the full-vocabulary logits,
    the whole embedding and head; the group's reduces are all-reduces and nothing sums the tables' gradients."""
    lay, run = TrainLayout(1, 2, 2, 1), TrainSetup(batch=1, seq=32, zero=0, checkpointing=False,
                                                    sequence_parallel=False, vocab_parallel=False)
    row = next(r for r in plan_train(TINY, 4, TrainSetup(batch=1, seq=32, zero=0, checkpointing=False))
               if r.layout == lay)
    mem = row.prediction.memory
    tokens = 32 // 2
    # per layer: the 2 norms' inputs and outputs (H each), q and the attention output (4*16/2), the output
    # relaid by the all-to-all back (32), k and v at full width (sp=2 copies of the group's 1 KV head x 16),
    # gate and up (2 * 128/2)
    per_layer = tokens * (4 * 64 + 2 * 32 + 32 + 2 * 2 * 16 + 128)
    assert mem.activations == 2 * per_layer * 2
    assert mem.loss == tokens * 64 * 2 + tokens * 100 * 10
    assert shard_parameters(TINY, 2, 1, False)[2] == 2 * 100 * 64  # the whole embedding and head on each rank
    cols = layer_collectives(TINY, lay, row.setup)
    assert {c.op for c in cols if c.tag in PAIR_TAGS} == {"all_reduce"}
    assert all(c.numel == tokens * 64 for c in cols if c.tag in PAIR_TAGS)
    assert not [c for c in cols if c.tag == "norm_weights"] and head_collectives(TINY, lay, row.setup) == []


def test_cli_train_says_what_a_composed_winner_assumes_and_its_config_runs(capsys):
    from ds_twolevel.deepspeed.config import check_deepspeed_config, load_deepspeed_config
    from ds_twolevel.tools.cli import main

    code = main(["plan", "--phase", "train", "--model", "llama-3-8b", "--devices", "64", "--seq", "131072",
                 "--batch", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sequence_parallel and vocab_parallel at sp = 1 (off at sp > 1, as the runtime composes Ulysses)" in out
    best = next(l for l in out.splitlines() if "**best**" in l)
    assert "| 1 x 32 x 1 x 2 | Ulysses sp=32 x two-level 1x2 |" in best
    loss = predict_train(LLAMA_8B, TrainLayout(1, 32, 1, 2), TrainSetup(1, 131072, sequence_parallel=False,
                                                                         vocab_parallel=False)).memory.loss
    assert best.split("|")[-3].strip() == f"{loss / 1e9:.1f}"  # the full-vocabulary logits of s/32 tokens
    line = next(l for l in out.splitlines() if l.startswith("Assumes: "))
    assert line.startswith("Assumes: Ulysses sp=32 x two-level 1x2 runs two-level's sequence_parallel and "
                           "vocab_parallel off")
    keys = json.loads(line.split("Config: ", 1)[1])
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, **keys}
    layout = check_deepspeed_config(*load_deepspeed_config(config), 64)
    assert (layout.dp, layout.sp, layout.n, layout.m) == (1, 32, 1, 2)
    for switch in ("sequence_parallel", "vocab_parallel"):
        config["two_level"] = dict(keys["two_level"], **{switch: True})
        with pytest.raises(ValueError, match=f'"{switch}": false'):
            check_deepspeed_config(*load_deepspeed_config(config), 64)


def test_cli_train_lists_the_layouts_that_fit_with_the_breakdown(capsys):
    from ds_twolevel.tools.cli import main

    code = main(["plan", "--phase", "train", "--model", "llama-3-8b", "--devices", "16", "--seq", "131072",
                 "--batch", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| weights | gathered | grads | optimizer | activations | logits | total GB |" in out
    table = [l for l in out.splitlines() if l.startswith("| ") and l.split("|")[2].strip()[:1].isdigit()]
    fits = [r for r in plan_train(LLAMA_8B, 16, TrainSetup(1, 131072)) if r.fits]
    assert len(table) == len(fits) > 1 and "**best**" in table[0] and "Ulysses sp=16" in table[0]
    assert "Why: Ulysses sp=16: fewer bytes at s=128K" in out and "Does not fit or cannot run:" in out


def test_cli_train_without_a_fitting_layout_is_one_line(capsys):
    from ds_twolevel.tools.cli import main

    code = main(["plan", "--phase", "train", "--model", "llama-3-70b", "--devices", "16", "--seq", "1048576"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no dp x sp x n x m layout of 16 devices can train llama-3-70b" in err[0]


def test_plan_train_imports_neither_deepspeed_nor_transformers():
    code = ("import sys; from ds_twolevel.tools.cli import main; "
            "main(['plan', '--phase', 'train', '--model', 'llama-3-8b', '--devices', '16', '--seq', '131072', "
            "'--batch', '1']); loaded = {m.split('.')[0] for m in sys.modules}; "
            "assert not loaded & {'deepspeed', 'transformers', 'accelerate'}, loaded & {'deepspeed', 'transformers'}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Why: Ulysses sp=16" in proc.stdout


def test_docs_quote_the_generated_table_and_plans(tmp_path):
    from ds_twolevel.costmodel.train_planner import assumption_line
    from ds_twolevel.tools.train_table import excerpt, table, update_page

    page = (ROOT / "docs" / "which_parallelism.md").read_text()
    fix = "regenerate with: python -m ds_twolevel.tools.train_table --update docs/which_parallelism.md"
    assert "python -m ds_twolevel.tools.train_table" in page
    assert table(zero=3) in page, fix
    assert "```text\n" + excerpt() + "\n```" in page, fix
    plan = excerpt().splitlines()
    assert plan[0].startswith("**llama-3-8b** training on 16") and "| **best** |" in plan[4] and plan[-2] == "| ... |"
    copy = tmp_path / "page.md"
    copy.write_text(page)
    assert not update_page(copy) and copy.read_text() == page
    copy.write_text(page.replace(table(zero=3), table(zero=2)).replace(plan[5], "| stale |"))
    assert update_page(copy) and copy.read_text() == page
    assert assumption_line(TrainLayout(1, 32, 1, 2)) in page
    assert "--no-sequence-parallel --no-vocab-parallel" not in page


def test_docs_verdicts_hold_over_the_grid():
    """The claims of which_parallelism.md's verdict sections, checked against the planner over the grid."""
    page = " ".join((ROOT / "docs" / "which_parallelism.md").read_text().split())
    best = {}
    for model, devices, seq, batch in GRID:
        rows = plan_train(PRESETS[model], devices, TrainSetup(batch=batch, seq=seq))
        best[model, devices, seq, batch] = rows
        top = best_of(rows)
        if best_of(rows, "Ulysses") is not None:
            assert top.layout.family != "composed"  # composing never wins where Ulysses alone fits
        if top is not None and batch == 8:
            assert top.layout.family == "Ulysses" and top.layout.dp == 8
        if top is not None and seq == 8192 and batch == 1:
            assert top.layout.family == "two-level"
    for seq in (32768, 131072, 1048576):  # Llama-3-8B, 64 GPUs, batch 1: the composition, sp = 32 x 1x2
        assert best_of(best["llama-3-8b", 64, seq, 1]).layout == TrainLayout(1, 32, 1, 2)
    ulysses_at = {(m, p, s) for m, p, s in [("llama-3-8b", 16, 32768), ("llama-3-8b", 16, 131072),
                                             ("llama-3-70b", 32, 32768), ("llama-3-70b", 32, 131072),
                                             *[("llama-3-70b", 64, s) for s in (32768, 131072, 1048576)],
                                             *[("llama-3-8b", 32, s) for s in (32768, 131072, 1048576)]]}
    for (m, p, s, b), rows in best.items():  # batch 1: Ulysses alone is the best exactly where the page says
        top = best_of(rows)
        assert b == 8 or (top is not None and top.layout.family == "Ulysses") == ((m, p, s) in ulysses_at)
    rows = best["llama-3-8b", 64, 131072, 1]
    assert (f"0.74 s at 128K against {best_of(rows, 'two-level').prediction.time:.2f} s for two-level 32x2" in page
            and f"{best_of(rows).prediction.time:.2f}" == "0.74")
    rows = best["llama-3-70b", 64, 131072, 1]
    assert (f"sp = 32 x two-level 1x2 at {best_of(rows, 'composed').prediction.time:.2f} s against "
            f"{best_of(rows, 'Ulysses').prediction.time:.2f} s for Ulysses sp = 64") in page
    rows = {r.layout: r for r in best["llama-3-70b", 16, 32768, 1]}
    ulysses = rows[TrainLayout(1, 16, 1, 1)].prediction.memory
    least = min(r.prediction.memory.total for l, r in rows.items() if l.family == "composed" and r.prediction)
    assert best_of(list(rows.values()), "composed") is None and int(least / 1e9) == 86
    assert (f"Ulysses sp = 16 needs {ulysses.total / 1e9:.2f} GB per rank ({ulysses.gathered / 1e9:.1f} GB of it "
            f"gathered") in page
    assert f"two-level 16x1 fits at {rows[TrainLayout(1, 1, 16, 1)].prediction.memory.total / 1e9:.1f} GB" in page


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_partitioned_mlp_stores_what_the_model_counts_with_the_gradients_of_the_plain_expression(activation):
    """The gated MLP keeps its input, gate and up for backward (the model's ``2 I`` per token plus the norm
    output it counts separately), not act(gate) or the product; gradients equal the plain expression's."""
    import torch

    from ds_twolevel.layers.activations import ACTIVATIONS
    from ds_twolevel.layers.mlp import TwoLevelMLP
    from ds_twolevel.parallel.layout import AxisGroup

    torch.manual_seed(0)
    b, s, H, inter = 2, 5, 8, 24
    mlp = TwoLevelMLP(H, inter, AxisGroup("tp", 1, 0), activation=activation)
    x = torch.randn(b, s, H, requires_grad=True)
    stored: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            stored[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x)
    assert sum(stored.values()) == b * s * (H + 2 * inter)
    y.square().sum().backward()
    act = ACTIVATIONS[activation]
    xx = x.detach().clone().requires_grad_()
    ref = mlp.down_proj(act(mlp.gate_proj(xx)) * mlp.up_proj(xx))
    grads = torch.autograd.grad(ref.square().sum(), [xx, *mlp.parameters()])
    assert torch.equal(ref, y) and torch.equal(grads[0], x.grad)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads[1:], mlp.parameters()))
