"""Benchmark plumbing at tiny shapes: no timed assertions, only shapes, bytes, errors and the report."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ds_twolevel.costmodel import ModelConfig, attention_call, attention_collectives
from ds_twolevel.parallel.collectives import CommCounter
from ds_twolevel.parallel import collectives as coll
from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.tools.bench import BenchConfig, ShardCase, layout_rank, shard_layer, time_shards, write_report
from ds_twolevel.tools.bench.config import decode_strategies
from ds_twolevel.tools.bench.gpu import gpu_section as _gpu_section
from ds_twolevel.tools.bench.shard import DECODE_SHARD_LAYOUTS, decode_shard, shard_compute
from ds_twolevel.tools.bench.report import modelled_bytes as _modelled_bytes
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
    """Every row (every registered strategy, the Helix-style layer, AutoTP) matches the dense model at prefill and
    both decode shapes, and sends the bytes the cost model lists for the strategy that ran."""
    names = [r["name"] for r in layout_rows]
    assert names[0].startswith("dense") and "n=2 x m=1" in names and "n=1 x m=2, score_allreduce" in names
    assert {"n=1 x m=2, qk_allgather", "n=1 x m=2, seq_rows", "n=1 x m=2, kv_shard cache",
            "Helix-style n=1 x kvp=2"} <= set(names)
    assert any(n.startswith("DeepSpeed AutoTP") for n in names)
    for r in layout_rows:
        assert r["max_error"] < 1e-4, r["name"]
        for phase in ("prefill", "decode", "long_decode"):
            if not r[f"{phase}_times"]:  # the Helix-style layer is a decode layout
                assert phase == "prefill" and r["name"].startswith("Helix-style"), (r["name"], phase)
                continue
            assert len(r[f"{phase}_times"]) == QUICK.repeats and r[f"{phase}_ms"] > 0
            modelled = _modelled_bytes(asdict(QUICK_AUTOTP), r, phase)
            if modelled is not None:
                assert r[f"{phase}_bytes_per_layer"] == modelled, (r["name"], phase)
            else:
                assert r["name"].startswith("dense")
    by = {r["name"]: r for r in layout_rows}
    seq, kv, helix = by["n=1 x m=2, seq_rows"], by["n=1 x m=2, kv_shard cache"], by["Helix-style n=1 x kvp=2"]
    assert seq["prefill_strategy"] == "seq_rows" and seq["cache_layout"] == "segments"
    assert kv["decode_strategy"] == kv["long_decode_strategy"] == "kv_shard" and kv["cache_layout"] == "kv_shard"
    # by position: the bytes of a decode step do not grow with the context (same batch at both shapes here)
    assert QUICK.decode_batch == QUICK.long_decode[0] and QUICK.decode_seq < QUICK.long_decode[1]
    for r in (kv, helix):
        assert r["decode_bytes_per_layer"] == r["long_decode_bytes_per_layer"] > 0, r["name"]
    assert sum(r["default"] for r in layout_rows) == 1
    two_level = next(r for r in layout_rows if r["name"].startswith("n=1 x m=2"))
    replicated = next(r for r in layout_rows if r["name"] == "n=2 x m=1")
    # g=1 < n=2: replicated KV costs cache memory; segments split it, so does the position split
    assert replicated["kv_cache_bytes"] == 2 * two_level["kv_cache_bytes"]
    assert replicated["long_kv_cache_bytes"] == 2 * kv["long_kv_cache_bytes"] == 2 * helix["long_kv_cache_bytes"]


def test_simulated_shard_keeps_shapes_counts_and_module_globals():
    """A shard on simulated axes (sizes, no process group) runs in one process without touching
    layers/attention.py: its outputs and gradients have the shapes of the real shard (the dense
    (b, s, H) output; per-rank weight shapes), and it counts the collectives the cost model lists."""
    from ds_twolevel.layers import attention as attn_mod

    before = dict(vars(attn_mod))
    spec = AttentionSpec(4, 4, 16, rope_style="half")
    model = ModelConfig("t", 32, 4, 4, 16, 64, 1)
    x = torch.randn(1, 8, 32, requires_grad=True)
    rope = rope_cos_sin(torch.arange(8).expand(1, -1), spec)
    for n, m, strategy in ((1, 1, "qk_allgather"), (2, 2, "score_allreduce"), (2, 2, "qk_allgather"),
                           (1, 4, "qk_allgather"), (1, 4, "score_allreduce"), (2, 1, "qk_allgather")):
        layer = shard_layer(32, spec, n, m, strategy)
        with CommCounter() as comm:
            y = layer(x, position_embeddings=rope)
        assert y.shape == (1, 8, 32)
        y.sum().backward()  # every paired backward collective runs locally too
        assert layer.q_proj.weight.grad.shape == (4 // n * 16 // m, 32), (n, m, strategy)
        want = attention_collectives(attention_call(model, n, m, 1, 8, 8), strategy)
        got = [(r.op, r.axis, r.tag, r.numel, r.ranks) for r in comm.records]
        assert got == [(c.op, c.axis, c.tag, c.numel, c.ranks) for c in want], (n, m, strategy)
    assert vars(attn_mod) == before  # no monkeypatching: the layer module's globals are untouched


def test_simulated_axis_runs_local_ops_and_one_rank_axis_stays_a_no_op():
    sim, one = AxisGroup("m", 3, 1), AxisGroup.single("m")
    assert coll.simulated(sim) and not coll.simulated(one)
    x = torch.arange(6.0).view(2, 3).requires_grad_()
    for fn in (coll.copy_to_axis, coll.reduce_from_axis, coll.all_reduce_both):
        assert fn(x, one) is x
    assert coll.all_gather_dim(x, one, 1) is x and coll.reduce_scatter_dim(x, one, 1) is x
    with CommCounter() as comm:
        gathered = coll.all_gather_dim(x, sim, 1, "g")  # (2, 9): three copies along dim 1
        assert torch.equal(gathered, torch.cat([x] * 3, dim=1))
        scattered = coll.reduce_scatter_dim(gathered, sim, 1, "s")  # rank 1's chunk
        assert torch.equal(scattered, gathered[:, 3:6])
        swapped = coll.all_to_all_dim0(torch.ones(3, 2), sim, "a")
        summed = coll.all_reduce_both(x, sim, "r")
        assert swapped.shape == (3, 2) and torch.equal(summed, x) and summed.data_ptr() != x.data_ptr()
        (scattered.sum() + summed.sum()).backward()
    assert [(r.op, r.backward) for r in comm.records] == [
        ("all_gather", False), ("reduce_scatter", False), ("all_to_all", False), ("all_reduce", False),
        ("all_reduce", True), ("all_gather", True), ("reduce_scatter", True)]
    assert torch.equal(x.grad, torch.full_like(x, 2.0))  # the local backward ops, same pairing as the real ones


def test_time_shards_rows():
    spec = AttentionSpec(4, 4, 16, rope_style="half")
    rows = time_shards(ShardCase(32, spec, "decode", 2, 16, repeats=1), ((2, 2, "score_allreduce"), (8, 1, "x")))
    # dense fused, dense explicit, then the shard; n=8 does not divide 4 heads: skipped
    assert [(r["n"], r["m"], r["strategy"]) for r in rows] == [
        (1, 1, "qk_allgather"), (1, 1, "score_allreduce"), (2, 2, "score_allreduce")]
    assert rows[0]["ratio_to_ideal"] == 1.0 and rows[1]["ratio_to_same_path"] == 1.0
    assert rows[2]["ratio_to_ideal"] == pytest.approx(rows[2]["ms"] / (rows[0]["ms"] / 4))
    assert rows[2]["ratio_to_same_path"] == pytest.approx(rows[2]["ms"] / (rows[1]["ms"] / 4))


def test_quick_shard_grid_times_kv_shard_at_decode_only():
    rows = shard_compute(QUICK)
    kv = {(r["phase"], r["n"], r["m"]) for r in rows if r["strategy"] == "kv_shard"}
    assert kv == {("decode", 2, 2), ("decode", 1, 4)}
    seq_rows = {(r["phase"], r["n"], r["m"]) for r in rows if r["strategy"] == "seq_rows"}
    assert seq_rows == {("prefill", 2, 2), ("prefill", 1, 4)}
    assert DECODE_SHARD_LAYOUTS == ((2, 2, "kv_shard"), (1, 4, "kv_shard")) and decode_strategies() == ("kv_shard",)
    assert all(r["ms"] > 0 for r in rows)


@pytest.mark.parametrize("n, m, strategy", [(2, 2, "kv_shard"), (1, 4, "kv_shard"), (2, 2, "score_allreduce"),
                                            (1, 1, "qk_allgather")])
@pytest.mark.parametrize("seq", [QUICK.shard_decode[1], QUICK.shard_decode[1] + 1])  # 33: rank 0 owns the new position
def test_decode_shard_steps_on_the_preallocated_cache(n, m, strategy, seq):
    """The bench's decode shard: a SeqShardCache of s - 1 positions (kv_shard: the positions p % m == 0 at
    full d), one step runs the strategy named (kv_shard's own collectives), writes in place (no new buffer,
    unlike KVCache's torch.cat) and the cache is cropped back to s - 1."""
    from ds_twolevel.layers.seq_cache import GrowingKV, PositionShardedKV

    batch, spec = QUICK.shard_decode[0], AttentionSpec(QUICK.shard_heads, QUICK.shard_heads, QUICK.shard_head_dim,
                                                      rope_style="half")
    case = ShardCase(QUICK.shard_hidden, spec, "decode", batch, seq)
    x = torch.randn(batch, 1, QUICK.shard_hidden)
    rope = rope_cos_sin(torch.full((batch, 1), seq - 1), spec)
    with torch.no_grad():
        shard = decode_shard(case, n, m, strategy, x)
        (store,) = shard.cache.stores.values()
        assert shard.cache.get_seq_length() == seq - 1
        buffer = store.keys.data_ptr()  # the start of the preallocated buffer
        with CommCounter() as comm:
            y = shard.step(x, rope)
        assert shard.step(x, rope).shape == y.shape == (batch, 1, QUICK.shard_hidden)  # again on the cropped cache
    assert shard.cache.get_seq_length() == seq - 1 and store.keys.data_ptr() == buffer
    tags = {r.tag for r in comm.records}
    if strategy == "kv_shard":
        assert shard.cache.kv_layout == "kv_shard" and isinstance(store, PositionShardedKV)
        assert store.length == len(range(0, seq - 1, m)) and store.keys.shape[-1] == spec.head_dim  # full d
        assert {"qkv_new", "partial_out"} <= tags
    else:
        assert type(store) is GrowingKV and store.length == seq - 1 and store.keys.shape[-1] == spec.head_dim // m
        assert not {"qkv_new", "partial_out"} & tags


def test_decode_shard_refuses_a_strategy_it_would_not_run():
    """A prefill-only strategy asked for at decode falls back to "auto" in the layer: the bench says so
    instead of timing another strategy under its name."""
    case = ShardCase(32, AttentionSpec(4, 4, 16, rope_style="half"), "decode", 1, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="decode shard of 'seq_rows' would run"):
        decode_shard(case, 2, 2, "seq_rows", torch.randn(1, 1, 32))


def test_report_renders_from_results(tmp_path, layout_rows):
    spec = AttentionSpec(4, 4, 16, rope_style="half")
    shard = time_shards(ShardCase(32, spec, "prefill", 1, 1024, 1), ((2, 2, "score_allreduce"),))
    decode = ((2, 2, "score_allreduce"), (2, 2, "qk_allgather"), (4, 1, "qk_allgather")) + DECODE_SHARD_LAYOUTS
    shard += time_shards(ShardCase(32, spec, "decode", 2, 64, 1), decode)
    results = {"config": asdict(QUICK), "torch": torch.__version__, "threads_per_rank": 1, "cpu_count": 2,
               "seconds": 1.0, "layouts": layout_rows, "shard": shard,
               "overhead": [{"heads": 4, "kv_heads": 4, "head_dim": 16, "seq": 32, "hf_ms": 1.0, "ours_ms": 1.02,
                             "overhead": 0.02, "max_rel_diff": 0.0}]}
    json.dumps(results)  # JSON-able
    results["layouts_run"] = {"seconds": 12.0, "load_average": [3.0, 4.0]}
    text = write_report(results, tmp_path).read_text()
    assert "section 3 by `python -m ds_twolevel bench --only layouts --out docs/` in 12 s, load average 3.0" in text
    assert "python -m ds_twolevel bench --out docs/" in text
    assert "m = n = 1 overhead <= 5% against HF SDPA): holds" in text
    assert "within 1.3x of ideal): " in text and "oversubscription" in text
    line = next(li for li in text.splitlines() if "decode shard at m*n = 4 with the preallocated cache" in li)
    assert "kv_shard and score_allreduce, within 1.2x of ideal): " in line
    assert "holds**" in line or "does NOT hold**" in line
    worst = max(r["ratio_to_ideal"] for r in shard if r["phase"] == "decode" and r["m"] > 1
                and r["strategy"] in ("kv_shard", "score_allreduce"))
    assert f"worst measured ratio {worst:.2f}x" in line and ("holds**" in line) == (worst <= 1.2)
    for label in ("kv_shard n=2 x m=2, s=64", "kv_shard n=1 x m=4, s=64", "score_allreduce n=2 x m=2, s=64"):
        assert label in line
    assert "Not covered: qk_allgather n=2 x m=2, s=64" in line and "head-wise n=4 x m=1, s=64" in line
    assert "llama-3-8b" in text and "paper's claim" in text
    verdict = next(li for li in text.splitlines() if li.startswith("**Verdict (b = 2, s_kv = 64"))
    default = next(r for r in layout_rows if r["default"])
    for peer in (r for r in layout_rows if r["kind"].startswith("AutoTP") or r["name"] == "n=2 x m=1"):
        name = peer["name"] if peer["kind"].startswith("AutoTP") else f"head-wise TP + KV replication ({peer['name']})"
        assert f"{name} {peer['long_decode_ms']:.2f} ms ({default['long_decode_ms'] / peer['long_decode_ms']:.2f}x)" in verdict
    assert f"({default['name']}, running {default['long_decode_strategy']}" in verdict
    assert "Helix-style n=1 x kvp=2" in text and "| n=1 x m=2, seq_rows |" in text
    assert (tmp_path / "bench_layouts.png").stat().st_size > 0 and (tmp_path / "bench_shard.png").stat().st_size > 0


def test_layouts_only_refuses_saved_results_of_other_single_process_settings():
    """``bench --only layouts`` keeps sections 4 and 5 from a saved run only when they were measured with the same
    settings; otherwise it says which and asks for the whole run, before launching any rank."""
    from ds_twolevel.tools.bench.run import run_layouts

    saved = {"config": {**json.loads(json.dumps(asdict(QUICK))), "shard_seqs": [4096]}}
    with pytest.raises(ValueError, match=r"other settings for \['shard_seqs'\]: run the whole bench"):
        run_layouts(QUICK, saved)


def test_gpu_recipe_small_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu_shard", ROOT / "recipes" / "bench_gpu_shard.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "rows.json"
    assert recipe.main(["--device", "cpu", "--small", "--dtype", "float32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["shards"]
    assert {r["phase"] for r in rows} == {"prefill", "decode"} and all(r["ms"] > 0 for r in rows)
    seq_rows = {(r["phase"], r["n"], r["m"]) for r in rows if r["strategy"] == "seq_rows"}
    assert seq_rows == {("prefill", 2, 2), ("prefill", 1, 4)}  # the new strategy, prefill only
    kv_shard = {(r["phase"], r["n"], r["m"]) for r in rows if r["strategy"] == "kv_shard"}
    assert kv_shard == {("decode", 2, 2), ("decode", 1, 4)}  # the cache held by position, decode only
    # the m = n = 1 overhead rows: our layer and HF's agree (fp32 here; bf16 on the GPU)
    assert len(result["overhead"]) == 2 and all(r["max_rel_diff"] < 1e-5 for r in result["overhead"])
    printed = capsys.readouterr().out
    assert "ratio to ideal" in printed and "HF LlamaAttention (sdpa)" in printed
    steps = {(r["family"], r["n"], r["m"], r["cache_layout"]): r for r in result["decode_steps"]}
    assert {("dense", 1, 1, "segments"), ("head-wise", 4, 1, "segments"), ("two-level", 2, 2, "kv_shard"),
            ("two-level", 1, 4, "segments"), ("helix", 2, 2, "kv_shard"), ("helix", 1, 4, "kv_shard")} <= set(steps)
    assert steps[("two-level", 2, 2, "kv_shard")]["ran"] == "kv_shard" and steps[("helix", 1, 4, "kv_shard")]["ran"] == "helix"
    # rank (0, 0)'s cache: 1/4 of the dense one in every 4-rank layout (8 KV heads: no replication)
    dense_kv = steps[("dense", 1, 1, "segments")]["kv_bytes"]
    assert all(4 * r["kv_bytes"] == dense_kv for k, r in steps.items() if k[0] != "dense")
    section = _gpu_section(out)  # the report's section 8 renders whatever device the recipe ran on
    assert "Measured on cpu" in section and "| prefill | 1 | 256 | 2 x 2 | score_allreduce |" in section
    assert "End-to-end decode step" in section and "| helix | 2 x 2 | kv_shard | helix |" in section
    assert "No GPU results" in _gpu_section(tmp_path / "missing.json")


def test_generation_bench_runs_every_peer_with_dense_tokens():
    """The end-to-end generation bench at tiny shapes: dense, two-level at every n x m with m > 1, head-wise TP
    with KV replication, DeepSpeed AutoTP and HF native TP (or its error) at every shape, plus the many-head
    miniature; every distributed row that ran gives the dense model's tokens, and the report renders."""
    from ds_twolevel.tools.bench import generation

    cfg = generation.GenerationBenchConfig.quick()
    rows = generation.run(cfg, timeout=900)
    llama = [r for r in rows if r["model"] == "tiny Llama"]
    peers = {r["peer"] for r in llama}
    assert {"dense, 1 process", "two-level 2x2 (defaults)", "two-level 1x4 (defaults)",
            "head-wise TP n=4 + KV replication", "DeepSpeed AutoTP tp=4", "HF native TP tp=4"} <= peers, peers
    for r in rows:
        if r["peer"].startswith(("two-level", "head-wise", "DeepSpeed")):
            assert not r["error"] and r["same_tokens"] is True and r["seconds"] > 0, r
    assert any(r["model"].startswith("2-layer MHA") and r["peer"].startswith("head-wise") for r in rows)
    page = generation.report(rows, cfg, {"when": "today", "commit": "abc", "machine": "cpu"})
    assert "long-context verdict" in page and page.count("| dense, 1 process |") == 1
