"""Bad input is refused with a clear ValueError before any module is touched or any collective issued.

The meshes here have n*m > 1 but no process groups at all: any collective would fail with a
different error, so a ValueError proves validation ran first.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

from ds_twolevel import AxisGroup, TwoLevelAxes, TwoLevelLayout, TwoLevelMesh
from hf_integration import load_partitioned, patch_model
from hf_integration.testing import tiny_model


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
    assert "gptj" in msg and "llama, mistral, qwen2, qwen3" in msg and "strict=False" in msg
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
