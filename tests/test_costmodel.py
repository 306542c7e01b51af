"""Pure tests of the cost model: FLOP and byte counts, "auto" vs fixed strategies, validation."""
from __future__ import annotations

import pytest

from ds_twolevel.strategies import registry
from ds_twolevel.strategies.registry import universal
from ds_twolevel.costmodel import (ModelConfig, Phase, attention_call, attention_collectives,
                                   attention_ops, kv_cache_bytes, mlp_ops, param_bytes, predict)
from ds_twolevel.costmodel.hardware import CPU_GLOO, H100_SXM, PROFILES, get_profile
from ds_twolevel.costmodel.planner import PRESETS

LLAMA = PRESETS["llama-3-8b"]
PAPER = PRESETS["paper"]
# the benchmark grid: layouts of 16 devices, prefill and decode at short and long sequences
GRID = [(model, n, m, Phase(kind, b, s))
        for model in (LLAMA, PAPER)
        for n, m in ((1, 2), (2, 2), (4, 2), (8, 2), (2, 8), (4, 4), (1, 16))
        for kind, b, s in (("prefill", 1, 128), ("prefill", 8, 4096), ("decode", 1, 128), ("decode", 64, 10000))]


def _sent(call, strategy: str, backward: bool, eb: int = 2) -> int:
    return sum(c.bytes_sent(eb) for c in attention_collectives(call, strategy, backward=backward))


@pytest.mark.parametrize("hw", [H100_SXM, CPU_GLOO], ids=lambda hw: hw.name)
def test_auto_is_the_fastest_strategy_within_the_memory_bound(hw):
    """"auto" chooses by predicted time, not bytes: on the benchmark grid its time equals the best fixed
    strategy's among those within 2x of the leanest activations, and somewhere it sends more bytes than
    another strategy would (a byte-minimising choice would fail this)."""
    more_bytes = 0
    for model, n, m, phase in GRID:
        call = attention_call(model, n, m, phase.batch, phase.q_len, phase.kv_len)
        able = registry.candidates(call)
        lean = min(registry.predicted_activation(call, s, hw.dtype_bytes) for s in able)
        fits = [s for s in able if registry.predicted_activation(call, s, hw.dtype_bytes) <= 2 * lean]
        best = min(predict(model, n, m, phase, hw, strategy=s).time for s in fits)
        auto = predict(model, n, m, phase, hw)
        assert auto.time <= best * (1 + 1e-12), (model.name, n, m, phase, auto.strategy)
        more_bytes += _sent(call, auto.strategy, False) > min(_sent(call, s, False) for s in fits)
    assert more_bytes > 0


def test_auto_picks_score_allreduce_for_short_decode_and_seq_rows_for_long_prefill():
    assert predict(LLAMA, 4, 4, Phase("decode", 8, 8192), H100_SXM).strategy == "score_allreduce"
    assert predict(LLAMA, 4, 4, Phase("prefill", 1, 8192), H100_SXM).strategy == "seq_rows"
    # a long decode: the cost model's auto also weighs a cache held by position
    assert predict(LLAMA, 4, 4, Phase("decode", 64, 131072), H100_SXM).strategy == "kv_shard"


def test_flops_split_evenly_over_head_groups():
    """n x 1 (no segment duplication): per-rank FLOPs x n == single-device FLOPs."""
    phase = Phase("prefill", 2, 512)
    single = predict(PAPER, 1, 1, phase, H100_SXM).flops
    for n in (2, 4, 8, 16, 32):
        assert predict(PAPER, n, 1, phase, H100_SXM).flops * n == pytest.approx(single)


def test_dense_flops_match_formula():
    """m = n = 1 FLOPs: 2 T H (h + 2g) d + 4 b h s^2 d + 2 T h d H + MLP 2 T H I (x3 gated) (+5 per score)."""
    model, b, s = LLAMA, 2, 256
    t, H, h, g, d, i = b * s, model.hidden, model.heads, model.kv_heads, model.head_dim, model.intermediate
    call = attention_call(model, 1, 1, b, s, s)
    attn = sum(op.flops for op in attention_ops(model, call, "qk_allgather", 2))
    assert attn == 2 * t * H * (h + 2 * g) * d + 4 * b * h * s * s * d + 5 * b * h * s * s + 2 * t * h * d * H
    assert sum(op.flops for op in mlp_ops(model, t, 1, 2)) == 2 * t * H * i * 3


def test_segment_strategy_flops():
    """score all-reduce splits QK^T by m; QK all-gather repeats it on every segment."""
    model, b, s = PAPER, 1, 1024
    ops = lambda m, strat: {o.name: o.flops for o in attention_ops(model, attention_call(model, 1, m, b, s, s), strat, 2)}
    assert ops(4, "score_allreduce")["scores"] * 4 == ops(1, "score_allreduce")["scores"]
    full = ops(4, "qk_allgather")["fused_attention"]
    assert full == 2 * b * 32 * s * s * 128 + 2 * b * 32 * s * s * 32 + 5 * b * 32 * s * s


def test_kv_cache_and_params_shrink_by_mn_and_replication_costs_memory():
    b, s = 4, 1000
    dense_kv = kv_cache_bytes(LLAMA, 1, b, s, 1, 2)
    assert dense_kv == 32 * b * 8 * s * 2 * 128 * 2
    assert kv_cache_bytes(LLAMA, 4, b, s, 4, 2) * 16 == dense_kv
    assert kv_cache_bytes(LLAMA, 16, b, s, 1, 2) * 8 == dense_kv  # n=16 > g=8: replicated, only 1/8
    assert kv_cache_bytes(LLAMA, 8, b, s, 2, 2) * 16 == dense_kv  # two-level keeps 1/16
    no_embed = ModelConfig("x", 256, 8, 2, 32, 512, 2)
    layer = lambda n, m: param_bytes(no_embed, n, m, 2)
    replicated = (2 * 2 * 256 + 256) * 2  # norms + final norm
    assert (layer(2, 2) - replicated) * 4 == layer(1, 1) - replicated


def test_prediction_time_is_roofline_plus_comm():
    p = predict(LLAMA, 4, 2, Phase("decode", 8, 4096), H100_SXM)
    assert p.time == pytest.approx(p.compute_time + p.comm_time)
    # bf16 activations; the sums over ranks in fp32 (the layers' default reduce_dtype), gathers in bf16
    assert p.comm_bytes == LLAMA.layers * sum(c.bytes_sent(2, 4) for c in p.collectives)
    assert p.tokens == 8 and p.tokens_per_s == pytest.approx(8 / p.time)
    sums = sum(c.bytes_sent(2) for c in p.collectives if c.op in ("all_reduce", "reduce_scatter"))
    narrow = predict(LLAMA, 4, 2, Phase("decode", 8, 4096), H100_SXM, strategy=p.strategy, reduce_size=0)
    assert sums > 0 and p.comm_bytes - narrow.comm_bytes == LLAMA.layers * sums  # reduce_dtype="input": half
    assert narrow.comm_time < p.comm_time and narrow.compute_time == p.compute_time


def test_phase_and_dp_validation():
    with pytest.raises(ValueError, match="phase must be one of"):
        Phase("train", 1, 1)
    with pytest.raises(ValueError, match=r"batch \(6\) is not divisible by dp=4"):
        predict(LLAMA, 2, 2, Phase("prefill", 6, 128), H100_SXM, dp=4)
    with pytest.raises(ValueError, match="strategy must be one of"):
        predict(LLAMA, 2, 2, Phase("prefill", 4, 128), H100_SXM, strategy="ring")


def test_from_hf_config():
    """Shapes from the config's key names; the architecture facts are arguments (the core knows no model_type)."""
    cfg = {"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
           "head_dim": 128, "intermediate_size": 3072, "num_hidden_layers": 28, "vocab_size": 151936,
           "tie_word_embeddings": True}
    model = ModelConfig.from_hf_config(cfg, "qwen3-0.6b")
    assert (model.hidden, model.heads, model.kv_heads, model.head_dim, model.layers) == (1024, 16, 8, 128, 28)
    assert model.gated and model.tied_embeddings and not model.qk_norm  # defaults: no model_type list
    told = ModelConfig.from_hf_config(cfg, "qwen3-0.6b", qk_norm=True, qk_norm_scope="projection", gated=False,
                                      rope_style="none")
    assert (told.qk_norm, told.qk_norm_scope, told.gated, told.rope_style) == (True, "projection", False, "none")
    gpt2 = ModelConfig.from_hf_config({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12})
    assert (gpt2.kv_heads, gpt2.head_dim, gpt2.intermediate) == (12, 64, 3072)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_config({"foo": 1})


def test_from_hf_config_with_the_spec_facts():
    """hf_integration.specs.cost_model_config: the same config read with its ArchSpec's facts."""
    from hf_integration.specs import cost_model_config

    cfg = {"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
           "head_dim": 128, "intermediate_size": 3072, "num_hidden_layers": 28, "vocab_size": 151936,
           "tie_word_embeddings": True}
    model = cost_model_config(cfg, "qwen3-0.6b")
    assert (model.hidden, model.heads, model.kv_heads, model.head_dim, model.layers) == (1024, 16, 8, 128, 28)
    assert model.qk_norm and model.gated and model.tied_embeddings
    gpt2 = cost_model_config({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12})
    assert (gpt2.kv_heads, gpt2.head_dim, gpt2.intermediate, gpt2.gated) == (12, 64, 3072, False)


def test_profiles():
    assert get_profile("h100") is H100_SXM and get_profile("cpu") is CPU_GLOO
    assert H100_SXM.busbw(8) == 450e9 and H100_SXM.busbw(16) == 45e9
    with pytest.raises(ValueError, match="known: cpu, h100"):
        get_profile("tpu")
    assert all(p.peak_flops > 0 and p.mem_bandwidth > 0 for p in PROFILES.values())


def test_comm_time_uses_the_bandwidth_of_the_span():
    from ds_twolevel.costmodel import Collective, comm_time

    big = 10**9
    col = lambda axis, ranks: Collective("all_reduce", axis, "x", big, ranks)
    seconds = lambda bw, ranks: H100_SXM.collective_latency + 2 * (ranks - 1) * big * 2 // ranks / bw
    assert comm_time([col("m", 8)], H100_SXM, 2, 8, 1) == pytest.approx(seconds(450e9, 8))
    assert comm_time([col("m", 16)], H100_SXM, 2, 16, 1) == pytest.approx(seconds(45e9, 16))
    assert comm_time([col("n", 4)], H100_SXM, 2, 2, 4) == pytest.approx(seconds(450e9, 4))  # spans 8 ranks
    assert comm_time([col("n", 4)], H100_SXM, 2, 4, 4) == pytest.approx(seconds(45e9, 4))  # spans 16 ranks


def test_split_score_path_gathers_values_only_where_that_sends_fewer_bytes():
    """values_gathered: all-gather v + all-to-all the output rows (~s d) instead of all-gathering the
    probabilities (~s^2): where s_kv > d_v (g/h + 1/m) - here 128 (4/16 + 1/2) = 96 (a tie keeps the
    probabilities) - and never for shorter rows."""
    from ds_twolevel.costmodel import score_strategy_collectives, values_gathered

    for s, expect in ((64, False), (96, False), (128, True), (8192, True)):
        call = attention_call(LLAMA, 2, 2, 1, s, s, causal=False)  # h/n = 16, g/n = 4, d = 128, split softmax
        probs = call.batch * call.local_heads * s * s
        assert values_gathered(call, probs) is expect, s
        tags = {c.tag for c in score_strategy_collectives(call, "score_allreduce")}
        assert tags == ({"scores", "v", "attn_rows"} if expect else {"scores", "probs"}), (s, tags)
        # whichever tail is taken, it is the one with fewer bytes
        v_tail = 1 * (s * 4 * 128 + 16 * s * 128 // 2) // 2  # ring (m-1)/m of v and of this rank's rows, m = 2
        assert min(v_tail, probs // 2) * 2 == sum(c.bytes_sent(2) for c in score_strategy_collectives(call, "score_allreduce")
                                                   if c.tag != "scores")
