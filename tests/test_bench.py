"""Benchmark plumbing at tiny shapes: no timed assertions, only shapes, bytes, errors and the report."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ds_twolevel.tools.bench import (BenchConfig, ShardCase, _gpu_section, _modelled_bytes, layout_rank, local_collectives, shard_layer,
                               time_shards, write_report)
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.layers.rope import rope_cos_sin
from ds_twolevel.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
QUICK = BenchConfig.quick()


QUICK_AUTOTP = BenchConfig(**{**asdict(QUICK), "autotp": True})
"""the quick shapes with DeepSpeed AutoTP (real deepspeed.init_inference, bytes from its comms logger)."""


@pytest.fixture(scope="module")
def layout_rows() -> list[dict]:
    return run_distributed(layout_rank, QUICK_AUTOTP.ranks, QUICK_AUTOTP, timeout=240)[0]


def test_layout_bench_matches_dense_and_counts_modelled_bytes(layout_rows):
    names = [r["name"] for r in layout_rows]
    assert names[0].startswith("dense") and "n=2 x m=1" in names and "n=1 x m=2, score_allreduce" in names
    assert any(n.startswith("DeepSpeed AutoTP") for n in names)
    for r in layout_rows:
        assert r["max_error"] < 1e-4, r["name"]
        assert len(r["prefill_times"]) == QUICK.repeats and r["prefill_ms"] > 0 and r["decode_ms"] > 0
        for phase in ("prefill", "decode"):
            modelled = _modelled_bytes(asdict(QUICK_AUTOTP), r["name"], phase)
            if modelled is not None:
                assert r[f"{phase}_bytes_per_layer"] == modelled, (r["name"], phase)
    two_level = next(r for r in layout_rows if r["name"].startswith("n=1 x m=2"))
    replicated = next(r for r in layout_rows if r["name"] == "n=2 x m=1")
    # g=1 < n=2: replicated KV costs cache memory; segments split it
    assert replicated["kv_cache_bytes"] == 2 * two_level["kv_cache_bytes"]


def test_shard_layer_local_collectives_keep_shapes():
    spec = AttentionSpec(4, 4, 16, rope_style="half")
    x = torch.randn(1, 8, 32)
    rope = rope_cos_sin(torch.arange(8).expand(1, -1), spec)
    with torch.no_grad(), local_collectives():
        for n, m, strategy in ((1, 1, "qk_allgather"), (2, 2, "score_allreduce"), (1, 4, "qk_allgather")):
            assert shard_layer(32, spec, n, m, strategy)(x, position_embeddings=rope).shape == (1, 8, 32)
    from ds_twolevel import attention

    assert attention.all_reduce_both.__module__ == "ds_twolevel.parallel.collectives"  # restored


def test_time_shards_rows():
    spec = AttentionSpec(4, 4, 16, rope_style="half")
    rows = time_shards(ShardCase(32, spec, "decode", 2, 16, repeats=1), ((2, 2, "score_allreduce"), (8, 1, "x")))
    # dense fused, dense explicit, then the shard; n=8 does not divide 4 heads: skipped
    assert [(r["n"], r["m"], r["strategy"]) for r in rows] == [
        (1, 1, "qk_allgather"), (1, 1, "score_allreduce"), (2, 2, "score_allreduce")]
    assert rows[0]["ratio_to_ideal"] == 1.0 and rows[1]["ratio_to_same_path"] == 1.0
    assert rows[2]["ratio_to_ideal"] == pytest.approx(rows[2]["ms"] / (rows[0]["ms"] / 4))
    assert rows[2]["ratio_to_same_path"] == pytest.approx(rows[2]["ms"] / (rows[1]["ms"] / 4))


def test_report_renders_from_results(tmp_path, layout_rows):
    shard = time_shards(ShardCase(32, AttentionSpec(4, 4, 16, rope_style="half"), "prefill", 1, 1024, 1),
                        ((2, 2, "score_allreduce"),))
    results = {"config": asdict(QUICK), "torch": torch.__version__, "threads_per_rank": 1, "cpu_count": 2,
               "seconds": 1.0, "layouts": layout_rows, "shard": shard,
               "overhead": [{"heads": 4, "kv_heads": 4, "head_dim": 16, "seq": 32, "hf_ms": 1.0, "ours_ms": 1.02,
                             "overhead": 0.02, "max_rel_diff": 0.0}]}
    json.dumps(results)  # JSON-able
    text = write_report(results, tmp_path).read_text()
    assert "python -m ds_twolevel bench --out docs/" in text
    assert "m = n = 1 overhead <= 5% against HF SDPA): holds" in text
    assert "within 1.3x of ideal): " in text and "oversubscription" in text
    assert "llama-3-8b" in text and "paper's claim" in text
    assert (tmp_path / "bench_layouts.png").stat().st_size > 0 and (tmp_path / "bench_shard.png").stat().st_size > 0


def test_gpu_recipe_small_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu_shard", ROOT / "recipes" / "bench_gpu_shard.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "rows.json"
    assert recipe.main(["--device", "cpu", "--small", "--dtype", "float32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["shards"]
    assert {r["phase"] for r in rows} == {"prefill", "decode"} and all(r["ms"] > 0 for r in rows)
    # the m = n = 1 overhead rows: our layer and HF's agree (fp32 here; bf16 on the GPU)
    assert len(result["overhead"]) == 2 and all(r["max_rel_diff"] < 1e-5 for r in result["overhead"])
    printed = capsys.readouterr().out
    assert "ratio to ideal" in printed and "HF LlamaAttention (sdpa)" in printed
    section = _gpu_section(out)  # the report's section 8 renders whatever device the recipe ran on
    assert "Measured on cpu" in section and "| prefill | 1 | 256 | 2 x 2 | score_allreduce |" in section
    assert "No GPU results" in _gpu_section(tmp_path / "missing.json")
