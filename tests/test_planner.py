"""Planner: feasibility from the partition rules, best layout first, CLI output (pure, no ranks)."""
from __future__ import annotations

import json

import pytest

from ds_twolevel.tools.cli import main as cli_main
from ds_twolevel.costmodel import Phase
from ds_twolevel.costmodel.hardware import H100_SXM
from ds_twolevel.parallel.layout import factorizations
from ds_twolevel.costmodel.planner import PAPER_CLAIMS, PRESETS, format_paper, paper_experiment, plan
from ds_twolevel.tools.plan import load_model

LLAMA = PRESETS["llama-3-8b"]


@pytest.mark.parametrize("devices", [8, 16, 32, 64])
@pytest.mark.parametrize("model", ["llama-3-8b", "paper"])
def test_plan_lists_every_factorisation(model, devices):
    rows = plan(PRESETS[model], devices, Phase("decode", 64, 4096))
    assert sorted((r.dp, r.n, r.m) for r in rows) == sorted(factorizations(devices))
    feasible = [r for r in rows if r.feasible]
    assert feasible and all(r.dp * r.n * r.m == devices for r in rows)
    times = [r.prediction.time for r in feasible]
    assert times == sorted(times)  # best first
    assert all(r.reason for r in rows if not r.feasible)


def test_infeasible_reasons_name_the_numbers():
    rows = {(r.dp, r.n, r.m): r for r in plan(LLAMA, 64, Phase("prefill", 16, 1024))}
    assert rows[(1, 64, 1)].reason == "num_heads (32) is not divisible by n=64"
    assert rows[(64, 1, 1)].reason == "batch (16) is not divisible by dp=64"
    assert rows[(1, 16, 4)].feasible and rows[(1, 16, 4)].kind == "two-level + KV replication"
    assert rows[(1, 32, 2)].kind == "two-level + KV replication"


def test_memory_infeasible():
    rows = {(r.dp, r.n, r.m): r for r in plan(LLAMA, 2, Phase("decode", 64, 32768))}
    assert "GB per device" in rows[(2, 1, 1)].reason and "> 80 GB" in rows[(2, 1, 1)].reason


def test_paper_experiment_rows():
    rows = paper_experiment(H100_SXM)
    assert rows[0].label.startswith("TP=8 x PP=2")
    assert any("n=4 x m=4" in r.label for r in rows)
    assert all(r.prefill_tokens_per_s > 0 and r.tpot_ms > 0 for r in rows)
    text = format_paper(rows)
    assert f"{PAPER_CLAIMS['twolevel_tokens_per_s'] / 1e6:.2f}M" in text


def test_load_model_from_hf_config(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
           "intermediate_size": 1024, "num_hidden_layers": 4}
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    model = load_model(str(path.parent))
    assert (model.name, model.kv_heads, model.head_dim) == (str(path.parent), 2, 64)  # no _name_or_path: the path
    assert model.gated and not model.qk_norm and model.rope_style == "half"  # from the llama ArchSpec
    path.write_text(json.dumps(dict(cfg, model_type="olmo2")))
    olmo2 = load_model(str(path))
    assert olmo2.qk_norm and olmo2.qk_norm_scope == "projection"
    with pytest.raises(ValueError, match="neither a preset"):
        load_model(str(tmp_path / "missing.json"))


def test_cli_plan(capsys):
    assert cli_main(["plan", "--model", "llama-3-8b", "--devices", "16", "--phase", "decode",
                     "--seq", "8192", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "**best**" in out and "Infeasible" not in out.split("**best**")[0]
    assert cli_main(["plan", "--model", "paper", "--devices", "64", "--hardware", "tpu"]) == 2
    assert "invalid choice: 'tpu' (choose from 'cpu', 'h100')" in capsys.readouterr().err
