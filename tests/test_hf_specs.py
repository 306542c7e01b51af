"""Pure tests (one process): specs match the transformers modules, fused QKV maps match HF's own
splitting, the slice reader matches safetensors, and the policy plugs into DeepSpeed's replace_module."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from ds_twolevel import TwoLevelLayout
from ds_twolevel.sharding.partition import AttentionSpec
from hf_integration import SPECS, injection_policy, patch_model, supported_architectures
from hf_integration.policy import find_owners
from hf_integration.testing import ARCHITECTURES, sample_batch, tiny_model
from hf_integration.weights import SafetensorsReader, fused_feature_map


def test_every_architecture_has_a_spec_and_a_tiny_model():
    assert supported_architectures() == sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_spec_finds_every_layer(arch):
    model = tiny_model(arch)
    attn, mlp, refused = find_owners(model, SPECS[arch])
    # Qwen2-MoE: MoE block + its shared expert on layer 0, a dense MLP on layer 1; Qwen3-MoE: no shared expert
    mlps = {"qwen2_moe": 3}.get(arch, 2)
    assert len(attn) == 2 and len(mlp) == mlps and refused == []


def test_per_head_fused_map_matches_gpt_neox_split():
    h, d = 4, 16
    spec = AttentionSpec(h, h, d, rope_style="half", rotary_dim=8)
    rows = torch.arange(3 * h * d).view(1, 1, h, 3 * d).transpose(1, 2)  # as GPTNeoXAttention views qkv
    q, k, v = rows.chunk(3, dim=-1)  # (1, h, 1, d) each
    for kind, want in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(fused_feature_map("per_head", kind, spec), want.transpose(1, 2).reshape(-1))


def test_grouped_fused_map_matches_falcon_split():
    """Falcon's new decoder architecture packs [q x h/g | k | v] per KV group; FalconAttention._split_heads
    applied to the row numbers gives each q/k/v feature's row."""
    import transformers

    config = transformers.FalconConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                                       new_decoder_architecture=True, num_hidden_layers=1)
    attn = transformers.models.falcon.modeling_falcon.FalconAttention(config, layer_idx=0)
    h, g, d = 4, 2, 16
    q, k, v = attn._split_heads(torch.arange((h + 2 * g) * d).view(1, 1, -1))  # (1, 1, h, d) each, k/v broadcast
    spec = AttentionSpec(h, g, d)
    assert torch.equal(fused_feature_map("grouped", "q", spec), q.reshape(-1))
    for kind, got in (("k", k), ("v", v)):  # HF broadcasts each KV head to its h/g query heads: take one per group
        assert torch.equal(fused_feature_map("grouped", kind, spec), got[0, 0, :: h // g].reshape(-1))


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_interleaved_half_rope_matches_glm4(rotary_dim):
    """rope_style "interleaved_half": pairs (2t, 2t+1) rotated with frequency t of HF's half-layout table,
    as GLM4's (and Helium's) apply_rotary_pos_emb computes it, partial rotary included."""
    from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb

    from ds_twolevel.layers.rope import apply_rope_dense, rope_cos_sin

    spec = AttentionSpec(2, 2, 16, rope_style="interleaved_half", rotary_dim=rotary_dim)
    half = AttentionSpec(2, 2, 16, rope_style="half", rotary_dim=rotary_dim)
    cos, sin = rope_cos_sin(torch.arange(5)[None], half, dtype=torch.float64)  # HF's table: cat(freqs, freqs)
    assert torch.equal(torch.stack(rope_cos_sin(torch.arange(5)[None], spec, dtype=torch.float64)),
                       torch.stack((cos, sin)))
    x = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.equal(apply_rope_dense(x, cos, sin, spec), want)


def test_concat_fused_map_matches_gpt2_split():
    h, d = 4, 16
    spec = AttentionSpec(h, h, d)
    q, k, v = torch.arange(3 * h * d).split(h * d)  # GPT2Attention: c_attn(x).split(split_size, dim=2)
    for kind, want in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(fused_feature_map("concat", kind, spec), want)


def test_reader_slices_equal_safetensors(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path, max_shard_size="30KB")
    index = torch.tensor([0, 1, 2, 7, 8, 40, 41, 42, 63])
    with SafetensorsReader(tmp_path) as reader:
        assert (tmp_path / "model.safetensors.index.json").exists() and len(reader.keys()) > 10
        for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
            file = next(f for f in tmp_path.glob("*.safetensors") if key in safe_open(f, "pt").keys())
            full = safe_open(file, "pt").get_tensor(key)
            assert torch.equal(reader.read(key), full)
            assert torch.equal(reader.read(key, 0, index), full[index])
            assert torch.equal(reader.read(key, 1, index), full[:, index])


def test_policy_works_with_deepspeed_replace_module():
    from deepspeed.module_inject.replace_module import replace_module

    dense = tiny_model("qwen3")
    model = copy.deepcopy(dense)
    mesh = TwoLevelLayout(n=1, m=1).build()
    for cls, fn in injection_policy(model, mesh).items():
        replace_module(model, cls, fn, None)
    ids, mask = sample_batch(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                           dense(input_ids=ids, attention_mask=mask).logits[mask.bool()])
    assert type(model.model.layers[0].self_attn).__name__ == "HFTwoLevelAttention"


def test_patched_model_keeps_its_class_and_train_mode():
    model = tiny_model("bert")
    model.train()
    report = patch_model(model, TwoLevelLayout(n=1, m=1).build())
    assert type(model).__name__ == "BertForMaskedLM" and report.replaced == {"BertAttention": 2, "BertLayer": 2}
    assert all(mod.training for mod in model.modules())


def test_dense_save_replaces_an_existing_checkpoint_atomically(tmp_path):
    from transformers import GPT2LMHeadModel

    dense = tiny_model("gpt2")
    model = copy.deepcopy(dense)
    patch_model(model, TwoLevelLayout(n=1, m=1).build())
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left behind
    assert not (target / "stale.txt").exists()
    back = GPT2LMHeadModel.from_pretrained(target)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in dense.state_dict().items())


def test_mistral_sliding_window_goes_through_hfs_mask():
    """Mistral's own ``sliding_window`` (the launch's tiny Mistral has none): a window shorter than the
    prompt, logits and greedy tokens (HF's sliding cache) equal to the unpatched model's; one process,
    n = m = 1, which runs the partitioned code path."""
    from ds_twolevel.testing import rel_err

    dense = tiny_model("mistral", sliding_window=4)
    patched = copy.deepcopy(dense)
    patch_model(patched, TwoLevelLayout(n=1, m=1).build())
    ids, mask = sample_batch(3, seq=12)
    with torch.no_grad():
        assert rel_err(patched(input_ids=ids, attention_mask=mask).logits,
                       dense(input_ids=ids, attention_mask=mask).logits) < 1e-5
        full = dense.__class__(dense.config.__class__(**{**dense.config.to_dict(), "sliding_window": None}))
        full.load_state_dict(dense.state_dict())
        assert rel_err(full.eval()(input_ids=ids, attention_mask=mask).logits,
                       dense(input_ids=ids, attention_mask=mask).logits) > 1e-3  # the window matters here
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(ids, attention_mask=mask, **kwargs),
                           dense.generate(ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cost_model_config_follows_the_spec(arch):
    """The cost model's architecture facts come from the ArchSpec: a gated MLP where the spec has a gate
    (or MoE experts), q/k norms and their scope, the RoPE style; shapes from the config."""
    from hf_integration.specs import cost_model_config

    config, spec = tiny_model(arch).config, SPECS[arch]
    model = cost_model_config(config, arch)
    mlp = spec.mlp
    gated = not hasattr(mlp, "gate") or mlp.gate is not None or mlp.gate_up is not None
    assert (model.gated, model.rope_style, model.qk_norm) == (gated, spec.rope_style, spec.attention.q_norm is not None)
    assert model.qk_norm_scope == spec.attention.norm_style.scope
    assert (model.hidden, model.heads, model.layers) == (64, 4, 2)
    assert model.kv_heads == spec.attention_spec(config).num_kv_heads


def test_cost_model_config_of_architectures_without_a_spec():
    from hf_integration.specs import cost_model_config

    shapes = {"hidden_size": 64, "num_attention_heads": 4}
    facts = lambda t: (lambda c: (c.gated, c.qk_norm, c.qk_norm_scope, c.rope_style))(
        cost_model_config(dict(shapes, model_type=t)))
    assert facts("qwen3_next") == (True, True, "head", "half")  # the qwen3 family
    assert facts("opt") == (False, False, "head", "none") and facts("gptj")[0] is False
    assert facts("some_new_model") == (True, False, "head", "half")  # the cost model's defaults


@pytest.mark.parametrize("arch,attr", [("llama", "attention_dropout"), ("gpt2", "attn_pdrop"),
                                       ("bert", "attention_probs_dropout_prob")])
def test_attention_dropout_is_read_where_the_spec_says(arch, attr):
    from hf_integration.policy import partitioned_layers

    model = tiny_model(arch, **{attr: 0.25})
    patch_model(model, TwoLevelLayout(n=1, m=1).build())
    rates = {layer.dropout for _, layer in partitioned_layers(model) if hasattr(layer, "part")}
    assert rates == {0.25}, (arch, rates)
    assert SPECS[arch].attention.attention_dropout == f"config.{attr}"


DRAFTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text", "mixtral", "granite", "cohere", "phi",
           "starcoder2", "glm4", "helium", "qwen2_moe", "qwen3_moe")
"""architectures whose base_model_tp_plan, plus the RoPE style and norm formula, makes an exact spec."""


def _patch_with(arch: str, spec) -> None:
    """patch_model (n = m = 1, parity probe on) of the tiny model with ``spec`` registered for the call."""
    good = SPECS[arch]
    SPECS[arch] = spec
    try:
        patch_model(tiny_model(arch), TwoLevelLayout(n=1, m=1).build())
    finally:
        SPECS[arch] = good


@pytest.mark.parametrize("arch", DRAFTED)
def test_spec_drafted_from_the_tp_plan_is_exact(arch):
    """draft_spec reads q/k/v/o, gate/up/down (or packed gate_up, experts), per-head norms from the plan and
    owners, signature, biases from the model; given what the plan cannot say, the parity probe accepts it."""
    from hf_integration.tp_plan import draft_spec

    good = SPECS[arch]
    draft = draft_spec(tiny_model(arch), rope_style=good.rope_style, norm_style=good.attention.norm_style)
    assert (draft.attention.owner, draft.mlp.owner) == (good.attention.owner, good.mlp.owner)
    assert (draft.attention.q, draft.attention.fused, draft.attention.o) == (good.attention.q, good.attention.fused,
                                                                             good.attention.o)
    _patch_with(arch, draft)  # raises ProbeError / ValueError if the draft describes the model wrongly


def test_glm4_draft_with_the_default_rope_is_refused_by_the_probe():
    """What the plan cannot say: GLM4's rotation. The draft's default rope_style="half" is refused by name."""
    from hf_integration.probe import ProbeError
    from hf_integration.tp_plan import draft_spec

    with pytest.raises(ProbeError, match=r"model\.layers\.0\.self_attn \(Glm4Attention\): relative error"):
        _patch_with("glm4", draft_spec(tiny_model("glm4")))


def test_draft_without_a_tp_plan_is_refused():
    from hf_integration.tp_plan import draft_spec

    with pytest.raises(ValueError, match="names no attention projections.*write the ArchSpec by hand"):
        draft_spec(tiny_model("falcon"))
