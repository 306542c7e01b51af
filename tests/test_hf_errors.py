"""Bad input is refused with a clear ValueError before any module is touched or any collective issued.

The meshes here have n*m > 1 but no process groups at all: any collective would fail with a
different error, so a ValueError proves validation ran first.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings

import pytest
import torch
import transformers

from ds_twolevel import AxisGroup, TwoLevelAxes, TwoLevelLayout, TwoLevelMesh
from hf_integration import SPECS, load_partitioned, patch_model, supported_architectures, verify
from hf_integration.probe import ProbeError
from hf_integration.specs import NOT_NONE, MLPLayout, QKNormStyle
from hf_integration.testing import rel_err, tiny_model


def groupless_mesh(n: int, m: int) -> TwoLevelMesh:
    """A mesh object for rank (0, 0) of an n x m layout, without process groups."""
    axes = TwoLevelAxes(AxisGroup("m", m, 0), AxisGroup("n", n, 0), AxisGroup("tp", n * m, 0))
    return TwoLevelMesh(TwoLevelLayout(n=n, m=m), None, axes)


def tiny_gptj() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GPTJConfig(vocab_size=96, n_embd=64, n_head=4, n_layer=1, rotary_dim=8, n_positions=64,
                                   bos_token_id=None, eos_token_id=None)
    return transformers.GPTJForCausalLM(config).eval()


def test_unsupported_architecture_strict():
    model = tiny_gptj()
    with pytest.raises(ValueError) as err:
        patch_model(model, groupless_mesh(2, 2))
    msg = str(err.value)
    assert "gptj" in msg and "strict=False" in msg
    assert "supported architectures: " + ", ".join(supported_architectures()) in msg
    assert type(model.transformer.h[0].attn).__name__ == "GPTJAttention"


def test_unsupported_architecture_non_strict_warns_and_leaves_dense():
    model = tiny_gptj()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning, match="left dense"):
        report = patch_model(model, TwoLevelLayout(n=1, m=1).build(), strict=False)
    assert report.replaced == {} and report.left_dense == ["transformer.h.0.attn"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_layout_with_too_many_head_groups():
    model = tiny_model("llama")
    with pytest.raises(ValueError) as err:
        patch_model(model, groupless_mesh(8, 1))
    msg = str(err.value)
    assert msg.startswith("LlamaForCausalLM (llama): num_heads (4) is not divisible by n=8")
    assert "layouts that fit 8 devices: n=2 x m=4, n=1 x m=8" in msg
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"


def test_gqa_layout_needs_kv_replication():
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) is not divisible by n=4.*kv_replication=True"):
        patch_model(tiny_model("mistral"), groupless_mesh(4, 2))


def test_rope_segments_that_do_not_fit():
    # GPT-NeoX, head_dim 16 with rotary_pct 0.5: 4 RoPE pairs cannot be cut into 8 segments
    with pytest.raises(ValueError, match=r"the 4 RoPE pairs of head_dim 16 do not split into m=8"):
        patch_model(tiny_model("gpt_neox"), groupless_mesh(1, 8))


def test_mlp_width_that_does_not_fit():
    model = tiny_model("qwen2", intermediate_size=100)
    with pytest.raises(ValueError, match=r"intermediate_size \(100\) is not divisible by n\*m = 2\*4 = 8.*n=2 x m=2"):
        patch_model(model, groupless_mesh(2, 4))


def test_refused_config_settings():
    model = tiny_model("gpt2", add_cross_attention=True)
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        patch_model(model, groupless_mesh(2, 2))


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy must be one of"):
        patch_model(tiny_model("llama"), groupless_mesh(2, 2), strategy="fastest")


def test_unknown_hardware_profile_and_a_known_one_reaches_every_layer():
    with pytest.raises(ValueError, match="unknown hardware profile 'h200'; known: cpu, h100"):
        patch_model(tiny_model("llama"), groupless_mesh(2, 2), hardware="h200")
    from ds_twolevel.costmodel.hardware import H100_SXM
    from hf_integration.partitioned import partitioned_layers

    model = tiny_model("llama")
    patch_model(model, TwoLevelLayout(n=1, m=1).build(), hardware="h100")
    layers = [mod for mod in model.modules() if hasattr(mod, "hardware")]
    assert len(layers) == model.config.num_hidden_layers and all(mod.hardware is H100_SXM for mod in layers)
    assert partitioned_layers(model)


def test_reduce_dtype_reaches_every_layer_and_a_wrong_one_is_refused():
    """``reduce_dtype``: fp32 sums by default on every partitioned layer (attention and MLP, axes included),
    "input" for sums in the model's dtype; anything else refused before a module is touched."""
    from hf_integration.partitioned import partitioned_layers

    with pytest.raises(ValueError, match=r"reduce_dtype must be one of \['float32', 'float64', 'fp32', 'input'\].*"
                                         r"got 'bf16'"):
        patch_model(tiny_model("llama"), groupless_mesh(2, 2), reduce_dtype="bf16")
    for reduce, want in ((None, torch.float32), ("input", None), (torch.float64, torch.float64)):
        model = tiny_model("llama")
        patch_model(model, TwoLevelLayout(n=1, m=1).build(), **({} if reduce is None else {"reduce_dtype": reduce}))
        layers = [layer for _, layer in partitioned_layers(model)]
        assert len(layers) == 2 * model.config.num_hidden_layers  # attention + MLP of every block
        for layer in layers:
            axes = (layer.axes.seg, layer.axes.tp, layer.axes.kv_rep) if hasattr(layer, "axes") else (layer.tp,)
            assert layer.reduce_dtype is want and all(a.reduce_dtype is want for a in axes), (reduce, layer)


def test_checkpoint_shapes_not_matching_config(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256  # the saved MLP weights are 128 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_partitioned(tmp_path, groupless_mesh(2, 2))
    msg = str(err.value)
    assert "does not match its config.json (10 tensor(s))" in msg  # gate, up (+ biases), down x 2 layers
    assert "model.layers.0.mlp.gate_proj.weight: checkpoint (128, 64) vs config (256, 64)" in msg


def test_checkpoint_directory_without_safetensors(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no model.safetensors"):
            load_partitioned(tmp_path, groupless_mesh(2, 2))


def test_patching_twice_is_refused():
    model = tiny_model("gpt2")
    patch_model(model, TwoLevelLayout(n=1, m=1).build())
    with pytest.raises(ValueError, match="already partitioned"):
        patch_model(model, TwoLevelLayout(n=1, m=1).build())


# -- specs that describe a model wrongly: refused, never computed --------------------------------------
def _with_spec(monkeypatch, arch: str, change) -> None:
    """Register a changed spec for ``arch`` (as user code would, through SPECS) for one test."""
    monkeypatch.setitem(SPECS, arch, change(SPECS[arch]))


def _layers(model) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


WRONG_SPECS = {  # the wrong-spec table: (arch, spec change, what the message must name)
    "phi3_gate_up_as_up": ("phi3", lambda s: dataclasses.replace(s, mlp=MLPLayout(
        owner="Phi3MLP", up="gate_up_proj", down="down_proj", act="activation_fn")),
        ["model.layers.0.mlp.gate_up_proj.weight", "MLPLayout.up", "(128, 64)", "(256, 64)"]),
    "gemma2_softcap_unset": ("gemma2", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, softcap=None)), ["ProbeError", "model.layers.0.self_attn (Gemma2Attention)", "relative error"]),
    "gemma3_norm_as_w": ("gemma3_text", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, norm_style=dataclasses.replace(s.attention.norm_style, formula="w"))),
        ["ProbeError", "model.layers.0.self_attn (Gemma3Attention)", "relative error"]),
    "olmo2_norm_per_head": ("olmo2", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, norm_style=QKNormStyle(weight_in_float=True))),
        ["model.layers.0.self_attn.q_norm.weight", "AttentionLayout.q_norm, norm_style.scope='head'", "(16,)",
         "(64,)"]),
}


@pytest.mark.parametrize("case", list(WRONG_SPECS))
def test_wrong_spec_is_refused_naming_the_layer(monkeypatch, case):
    arch, change, named = WRONG_SPECS[case]
    _with_spec(monkeypatch, arch, change)
    model = tiny_model(arch)
    ids = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
    classes = _layers(model)
    with pytest.raises(ValueError) as err:
        patch_model(model, TwoLevelLayout(n=1, m=1).build())
    msg = f"{type(err.value).__name__}: {err.value}"
    assert all(part in msg for part in named), msg
    assert _layers(model) == classes and not verify(model).replaced  # nothing was left partitioned
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("case", ["phi3_gate_up_as_up", "olmo2_norm_per_head"])
def test_shape_checks_run_before_any_collective(monkeypatch, case):
    arch, change, named = WRONG_SPECS[case]
    _with_spec(monkeypatch, arch, change)
    with pytest.raises(ValueError, match=re.escape(named[0])):  # a collective would raise something else
        patch_model(tiny_model(arch), groupless_mesh(2, 2))


def test_probe_catches_what_no_shape_check_sees(monkeypatch):
    """A RoPE pairing is invisible to shapes: without the probe the wrong spec computes wrong logits."""
    _with_spec(monkeypatch, "llama", lambda s: dataclasses.replace(s, rope_style="interleaved"))
    dense = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 9))
    with pytest.raises(ProbeError, match=r"model\.layers\.0\.self_attn \(LlamaAttention\): relative error"):
        patch_model(copy.deepcopy(dense), TwoLevelLayout(n=1, m=1).build())
    unprobed = copy.deepcopy(dense)
    patch_model(unprobed, TwoLevelLayout(n=1, m=1).build(), probe=False)  # the opt-out: computed, and wrong
    with torch.no_grad():
        assert rel_err(unprobed(ids).logits, dense(ids).logits) > 1e-2


def test_initialize_policy_probes_unless_the_config_says_probe_false(monkeypatch):
    """``ds_twolevel.initialize``'s policy runs the probe (``"two_level": {"probe": ...}`` in the config)."""
    from ds_twolevel.costmodel.hardware import H100_SXM
    from ds_twolevel.deepspeed.config import TwoLevelConfig
    from ds_twolevel.deepspeed.runtime import default_policy

    _with_spec(monkeypatch, "llama", lambda s: dataclasses.replace(s, rope_style="interleaved"))
    mesh, dense = TwoLevelLayout(n=1, m=1).build(), tiny_model("llama")
    with pytest.raises(ProbeError, match=r"model\.layers\.0\.self_attn \(LlamaAttention\): relative error"):
        default_policy(copy.deepcopy(dense), mesh, TwoLevelConfig.from_dict({"n": 1, "m": 1}))
    off = TwoLevelConfig.from_dict({"n": 1, "m": 1, "probe": False, "hardware": "h100"})
    patched = default_policy(copy.deepcopy(dense), mesh, off)
    assert verify(patched).replaced  # patched, unprobed
    assert {getattr(mod, "hardware", None) for mod in patched.modules() if hasattr(mod, "hardware")} == {H100_SXM}
    with pytest.raises(ValueError, match=r'"two_level.hardware" must be one of .*cpu.*h100'):
        TwoLevelConfig.from_dict({"n": 1, "m": 1, "hardware": "h200"})
    assert {mod.reduce_dtype for mod in patched.modules() if hasattr(mod, "reduce_dtype")} == {torch.float32}
    narrow = default_policy(copy.deepcopy(dense), mesh, TwoLevelConfig.from_dict(
        {"n": 1, "m": 1, "probe": False, "reduce_dtype": "input"}))
    assert {mod.reduce_dtype for mod in narrow.modules() if hasattr(mod, "reduce_dtype")} == {None}
    with pytest.raises(ValueError, match=r'"two_level.reduce_dtype" must be one of .*fp32.*input'):
        TwoLevelConfig.from_dict({"n": 1, "m": 1, "reduce_dtype": "bf16"})


def test_spec_leaving_out_a_parameter_is_refused(monkeypatch):
    _with_spec(monkeypatch, "gemma3_text", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, q_norm=None, k_norm=None)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn \(Gemma3Attention\): parameters q_norm\.weight, "
                                         r"k_norm\.weight are not described by the ArchSpec"):
        patch_model(tiny_model("gemma3_text"), groupless_mesh(2, 2))


def test_spec_naming_a_missing_attribute_is_refused(monkeypatch):
    _with_spec(monkeypatch, "gemma3_text", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, norm_style=dataclasses.replace(s.attention.norm_style, eps="variance_epsilon"))))
    with pytest.raises(ValueError, match=r"norm_style\.eps = 'q_norm\.variance_epsilon' names an attribute"):
        patch_model(tiny_model("gemma3_text"), groupless_mesh(2, 2))


def test_unsupported_predicates():
    with pytest.raises(ValueError, match=re.escape("use_qk_norm=True (any true / non-zero value)")):
        patch_model(tiny_model("cohere", use_qk_norm=True), groupless_mesh(2, 2))
    spec = dataclasses.replace(SPECS["llama"], unsupported=(("rope_scaling_extra", NOT_NONE), ("tie_word_embeddings", True)))
    config = tiny_model("llama").config
    assert spec.problems(config) == []
    config.rope_scaling_extra, config.tie_word_embeddings = 0.0, True
    assert spec.problems(config) == ["rope_scaling_extra=0.0 (any non-null value)", "tie_word_embeddings=True"]


def test_report_and_verify_agree_on_what_stayed_dense():
    model = tiny_gptj()
    with pytest.warns(UserWarning, match="left dense"):
        report = patch_model(model, TwoLevelLayout(n=1, m=1).build(), strict=False)
    assert report.left_dense == verify(model).left_dense == ["transformer.h.0.attn"]
    assert "left dense: 1" in str(report)
    bert = tiny_model("bert")  # nested attention modules (BertAttention > BertSelfAttention) count once
    assert verify(bert).left_dense == ["bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention"]
    assert patch_model(bert, TwoLevelLayout(n=1, m=1).build()).left_dense == verify(bert).left_dense == []


def test_sliding_window_without_a_mask_is_refused():
    model = tiny_model("phi3")  # sliding_window=10
    patch_model(model, TwoLevelLayout(n=1, m=1).build())
    x = torch.randn(1, 12, 64)
    rope = model.model.rotary_emb(x, torch.arange(12).unsqueeze(0))
    with pytest.raises(ValueError, match=r"sliding window 10 < 12 keys but no attention mask"):
        model.model.layers[0].self_attn(x, position_embeddings=rope, attention_mask=None)


@pytest.mark.parametrize("strategy", ["seq_rows"])
def test_attention_sinks_are_refused_by_fused_strategies(strategy):
    """GPT-OSS's sinks join the softmax: a fused strategy cannot add them and refuses the call by name
    (here in the parity probe's first partitioned forward), leaving the model as it was."""
    model = tiny_model("gpt_oss")
    with pytest.raises(ValueError, match=f"{strategy} runs fused attention, which has no attention sinks"):
        patch_model(model, TwoLevelLayout(n=1, m=1).build(), strategy=strategy)
    assert type(model.model.layers[0].self_attn).__name__ == "GptOssAttention"
