"""The strategy registry: one planning function for the layer and the cost model, a toy entry picked up
everywhere without edits, keyed dropout that a recompute draws again (single process)."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as checkpoint

from ds_twolevel.costmodel import ModelConfig, Phase, attention_call, attention_collectives, predict
from ds_twolevel.costmodel.hardware import H100_SXM
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
    call = attention_call(MODEL, 2, 2, 1, 4096, 4096)  # long prefill: qk_allgather sends fewer bytes
    assert registry.plan_call(call).name == "qk_allgather"
    with toy_strategy.registered():
        assert "toy_qk" in registry.names() and "toy_qk" in registry.universal()
        assert registry.plan_call(call).name == "toy_qk"  # "auto" picks it (it wins the tie)
        pred = predict(MODEL, 2, 2, Phase("prefill", 1, 4096), H100_SXM)
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
