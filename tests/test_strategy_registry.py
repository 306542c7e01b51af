"""The strategy registry: one planning function for the layer and the cost model, a toy entry picked up
everywhere without edits, keyed dropout that a recompute draws again (single process)."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as checkpoint

from ds_twolevel.costmodel import ModelConfig, Phase, attention_call, attention_collectives, predict
from ds_twolevel.costmodel.hardware import CPU_GLOO, H100_SXM
from ds_twolevel.deepspeed.config import TwoLevelConfig
from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.layers.rope import rope_cos_sin
from ds_twolevel.parallel.layout import TwoLevelAxes
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.strategies import qk_allgather, registry
from ds_twolevel.testing import rel_err
from ds_twolevel.testing.reference import DenseAttention
from tests import toy_strategy

MODEL = ModelConfig("toy", hidden=1024, heads=16, kv_heads=4, head_dim=64, intermediate=2048, layers=2)


def test_every_strategy_implements_the_interface():
    for name in registry.names():
        s = registry.get(name)
        assert s.NAME == name
        for fn in ("why_not", "collectives", "ops", "activation_bytes", "attend"):
            assert callable(getattr(s, fn)), (name, fn)


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="strategy must be one of .*score_allreduce.*qk_allgather"):
        registry.plan_call(attention_call(MODEL, 2, 2, 1, 8, 8), "qk_allgahter")
    with pytest.raises(ValueError, match="chosen by the KV cache"):
        registry.check_layer_strategy("kv_shard")


def test_layer_and_cost_model_ask_the_same_plan():
    """The layer's call record and the cost model's give the same plan for the same shapes."""
    spec = AttentionSpec(4, 4, 8, rope_style="none")
    layer = TwoLevelAttention(32, spec, TwoLevelAxes.single()).eval()
    for s in (1, 7, 64):
        x = torch.randn(2, s, 32)
        with torch.no_grad():
            mine = layer.attention_call(x, None, None)
        model = ModelConfig("t", hidden=32, heads=4, kv_heads=4, head_dim=8, intermediate=64, layers=1)
        modelled = attention_call(model, 1, 1, 2, s, s)
        assert registry.plan_call(mine).name == registry.plan_call(modelled).name


def test_a_toy_strategy_is_picked_up_by_auto_the_cost_model_and_the_layer():
    call = attention_call(MODEL, 2, 2, 1, 64, 64)  # short prefill on an H100: qk_allgather is fastest
    assert registry.plan_call(call, hw=H100_SXM).name == "qk_allgather"
    with toy_strategy.registered():
        assert "toy_qk" in registry.names() and "toy_qk" in registry.universal()
        assert registry.plan_call(call, hw=H100_SXM).name == "toy_qk"  # "auto" picks it (it wins the tie)
        pred = predict(MODEL, 2, 2, Phase("prefill", 1, 64), H100_SXM, element_size=4)
        assert pred.strategy == "toy_qk"
        assert attention_collectives(call, "toy_qk") == attention_collectives(call, "qk_allgather")
        TwoLevelConfig.from_dict({"n": 1, "m": 1, "strategy": "toy_qk"})  # the config accepts it
        torch.manual_seed(0)
        spec = AttentionSpec(4, 2, 8, rope_style="half")
        dense = DenseAttention(16, spec)
        layer = TwoLevelAttention.from_dense(dense, TwoLevelAxes.single())
        x = torch.randn(2, 5, 16)
        rope = rope_cos_sin(torch.arange(5)[None].expand(2, -1), spec)
        before = toy_strategy.CALLS[0]
        with torch.no_grad():
            y = layer(x, position_embeddings=rope, strategy="toy_qk")
        assert toy_strategy.CALLS[0] == before + 1
        assert rel_err(y, dense(x, position_embeddings=rope)) < 1e-5
    assert "toy_qk" not in registry.names()
    with pytest.raises(ValueError, match='strategy" must be one of'):
        TwoLevelConfig.from_dict({"n": 1, "m": 1, "strategy": "toy_qk"})
    assert qk_allgather.NAME in registry.names()


def test_auto_chooses_by_predicted_time_not_bytes():
    """A strategy that sends more bytes but computes less wins "auto": on the CPU profile seq_rows beats
    qk_allgather's m-fold QK^T at a long prefill. The profile decides: a short prefill goes to
    score_allreduce on the CPU (fewer collectives) and to qk_allgather on an H100. A named strategy is
    still run."""
    call = attention_call(MODEL, 2, 2, 1, 2048, 2048)
    assert registry.bytes_sent(call, "seq_rows", 4) > registry.bytes_sent(call, "qk_allgather", 4)
    assert registry.predicted_time(call, "seq_rows", CPU_GLOO) < registry.predicted_time(call, "qk_allgather", CPU_GLOO)
    assert registry.plan_call(call, hw=CPU_GLOO).name == "seq_rows"
    assert registry.plan_call(call).name == "seq_rows"  # the default profile is the CPU's
    assert registry.plan_call(call, "qk_allgather", hw=CPU_GLOO).name == "qk_allgather"
    short = attention_call(MODEL, 2, 2, 1, 64, 64)
    assert [registry.plan_call(short, hw=hw).name for hw in (CPU_GLOO, H100_SXM)] == ["score_allreduce", "qk_allgather"]
    for hw in (CPU_GLOO, H100_SXM):  # the cost model reports what the layer would run
        assert predict(MODEL, 2, 2, Phase("prefill", 1, 2048), hw, element_size=4).strategy == \
            registry.plan_call(call, hw=hw).name
    # decode: seq_rows cannot split one row, kv_shard reads only its own cache layout
    decode = attention_call(MODEL, 2, 2, 8, 1, 4097)
    assert set(registry.candidates(decode)) == {"score_allreduce", "qk_allgather"}


def test_layer_plans_with_its_devices_profile_or_the_one_it_is_given():
    spec = AttentionSpec(16, 4, 64, rope_style="none")
    call = attention_call(MODEL, 2, 2, 1, 64, 64)  # the plan reads the call, not the layer's axes
    layer = TwoLevelAttention(1024, spec, TwoLevelAxes.single(), device="meta")
    assert layer.resolve_strategy(call, device="cpu") == "score_allreduce"
    assert layer.resolve_strategy(call, device="cuda") == "qk_allgather"
    layer.hardware = H100_SXM
    assert layer.resolve_strategy(call, device="cpu") == "qk_allgather"
    assert TwoLevelAttention(1024, spec, TwoLevelAxes.single(), hardware="h100", device="meta").hardware is H100_SXM
    with pytest.raises(ValueError, match="unknown hardware profile 'h200'; known: cpu, h100"):
        TwoLevelAttention(1024, spec, TwoLevelAxes.single(), hardware="h200", device="meta")


LEAN = [0]


def _lean_toy():
    """A toy entry that predicts no time at all and ``LEAN[0]`` x the leanest built-in's activations."""
    import types

    toy = types.ModuleType("toy_memory")
    toy.NAME, toy.AUTO, toy.UNIVERSAL = "toy_memory", True, False
    toy.why_not, toy.collectives, toy.attend = qk_allgather.why_not, lambda call: [], qk_allgather.attend
    toy.ops = lambda model, call, eb: []
    builtin = [registry.get(n) for n in ("score_allreduce", "qk_allgather", "seq_rows")]
    toy.activation_bytes = lambda model, call, eb: LEAN[0] * min(
        s.activation_bytes(model, call, eb) for s in builtin if s.why_not(call) is None)
    return toy


@pytest.mark.parametrize("factor,picked", [(2.0, True), (2.01, False)])
def test_auto_leaves_out_a_fast_strategy_that_needs_over_twice_the_lean_memory(factor, picked):
    """The fastest strategy (no time at all) is picked while its activations stay within 2x of the
    leanest able strategy's, and left out above; forcing it still runs it."""
    call = attention_call(MODEL, 2, 2, 1, 64, 64)
    LEAN[0] = factor
    with registry.registered(_lean_toy()):
        assert (registry.plan_call(call).name == "toy_memory") is picked
        assert registry.plan_call(call, "toy_memory").name == "toy_memory"


def test_auto_never_picks_over_twice_the_lean_activations_on_a_grid():
    """Over prefill and decode shapes (both profiles), auto's pick predicts at most 2x the activations
    of the leanest able strategy (a fused path), e.g. no s^2 score tensor at a long prefill."""
    for n, m in ((1, 2), (2, 2), (1, 4), (4, 2)):
        for b, q, kv in ((1, 2048, 2048), (1, 8192, 8192), (4, 512, 512), (8, 1, 4097), (64, 1, 131073)):
            call = attention_call(MODEL, n, m, b, q, kv)
            lean = min(registry.predicted_activation(call, s) for s in registry.candidates(call))
            for hw in (CPU_GLOO, H100_SXM):
                chosen = registry.plan_call(call, hw=hw).name
                assert registry.predicted_activation(call, chosen) <= 2 * lean, (n, m, b, q, kv, hw.name, chosen)
    long = attention_call(MODEL, 2, 2, 1, 8192, 8192)  # the filter matters: score_allreduce would not fit
    assert registry.predicted_activation(long, "score_allreduce") > 2 * registry.predicted_activation(long, "seq_rows")


def _dropout_inputs():
    """A spec, an input (2, 6, 16) and its rope tables, seeded."""
    torch.manual_seed(0)
    spec = AttentionSpec(4, 2, 8, rope_style="half")
    return spec, torch.randn(2, 6, 16), rope_cos_sin(torch.arange(6)[None].expand(2, -1), spec)


def _dropout_layer(spec, strategy):
    """The same dense layer with dropout 0.4 (seeded) and its partition, in training mode."""
    torch.manual_seed(1)
    dense = DenseAttention(16, spec, dropout=0.4, dropout_seed=7)
    return dense, TwoLevelAttention.from_dense(dense, TwoLevelAxes.single(), strategy=strategy).train()


@pytest.mark.parametrize("strategy", ["score_allreduce", "qk_allgather"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_dropout_recompute_under_activation_checkpointing_draws_the_same_mask(strategy, reentrant):
    """Gradients with torch.utils.checkpoint equal those without it (same keys), and both equal the
    dense reference's (a recompute that drew a new mask would differ)."""
    spec, x0, rope = _dropout_inputs()
    grads = []
    for use_checkpoint in (False, True):
        dense, layer = _dropout_layer(spec, strategy)
        x = x0.clone().requires_grad_()
        fn = lambda t: layer(t, position_embeddings=rope)  # noqa: E731
        for _ in range(2):  # two steps: the second uses key 1 in both runs
            y = checkpoint.checkpoint(fn, x, use_reentrant=reentrant) if use_checkpoint else fn(x)
            y.square().sum().backward()
        ref_x = x0.clone().requires_grad_()
        for _ in range(2):
            dense.train()(ref_x, position_embeddings=rope).square().sum().backward()
        assert rel_err(x.grad, ref_x.grad) < 1e-5
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_fused_sequence_strategies_refuse_softcapped_scores():
    """Gemma2's soft-cap cannot run inside fused SDPA: seq_rows and kv_shard refuse such calls before any
    collective (forcing seq_rows on a soft-capped layer would otherwise be silently wrong)."""
    spec = AttentionSpec(4, 2, 8, rope_style="half")
    layer = TwoLevelAttention(16, spec, TwoLevelAxes.single(), softcap=30.0, strategy="seq_rows").eval()
    x = torch.randn(1, 4, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="layer 0: seq_rows .*soft-cap"):
        layer(x, position_embeddings=rope_cos_sin(torch.arange(4)[None], spec))


def test_dropout_recompute_of_same_inputs_in_pipeline_order_and_unknown_recompute_is_refused():
    """Two forwards of the same input before their backwards (a pipeline schedule) each get their own
    mask back in the recompute, first in first out: gradients equal the run without checkpointing. A
    recompute whose input no forward had is refused, not computed with an unknown mask."""
    from ds_twolevel.layers.dropout import DropoutKeys

    spec, x0, rope = _dropout_inputs()
    grads = []
    for use_checkpoint in (False, True):
        _, layer = _dropout_layer(spec, "auto")
        xs = [x0.clone().requires_grad_() for _ in range(2)]
        fn = lambda t: layer(t, position_embeddings=rope)  # noqa: E731
        ys = [checkpoint.checkpoint(fn, x, use_reentrant=False) if use_checkpoint else fn(x) for x in xs]
        for y in ys:
            y.square().sum().backward()
        grads.append([x.grad for x in xs])
    assert not torch.equal(grads[0][0], grads[0][1])  # two masks
    assert all(torch.equal(a, b) for a, b in zip(*grads))

    keys = DropoutKeys()
    keys.key(torch.ones(3))

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            keys.key(torch.zeros(3))  # a "recompute" of an input no forward had
            return g

    with pytest.raises(RuntimeError, match="dropout mask it must repeat is unknown"):
        Recompute.apply(torch.ones(3, requires_grad=True)).sum().backward()
