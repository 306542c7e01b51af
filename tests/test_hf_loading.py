"""``load_partitioned`` loads like ``from_pretrained``, and its safetensors parser is bounded.

Single process (m = n = 1 builds real layers without any process group): each case is compared
with plain ``AutoModelForCausalLM.from_pretrained`` of the same directory — logits, and the
warnings transformers prints. The reader's hostile-file cases need no model at all.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers.testing_utils import CaptureLogger

from ds_twolevel import TwoLevelLayout
from ds_twolevel.testing import rel_err
from hf_integration import load_partitioned
from hf_integration.safetensors_files import MAX_HEADER_BYTES
from hf_integration.testing import tiny_model
from hf_integration.weights import SafetensorsReader

IDS = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))
HF_LOGGER = transformers.modeling_utils.logger


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _both(directory: Path) -> tuple[torch.Tensor, str, torch.Tensor, str, torch.nn.Module]:
    """(HF logits, HF log, our logits, our log, our model) for one directory."""
    with CaptureLogger(HF_LOGGER) as hf_log:
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with CaptureLogger(HF_LOGGER) as our_log:
        ours, _ = load_partitioned(directory, TwoLevelLayout(n=1, m=1).build())
    with torch.no_grad():
        return hf(IDS).logits, hf_log.out, ours(IDS).logits, our_log.out, ours


def test_tied_config_with_a_distinct_lm_head_keeps_both_as_hf_does(tmp_path):
    """Table row: tie_word_embeddings true + a distinct lm_head.weight was tied silently (rel 1.20)."""
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(tmp_path)
    _edit_config(tmp_path, tie_word_embeddings=True)
    hf, hf_log, ours, our_log, model = _both(tmp_path)
    assert rel_err(ours, hf) <= 1e-5, rel_err(ours, hf)
    warning = ("The tied weights mapping and config for this model specifies to tie model.embed_tokens.weight to "
               "lm_head.weight, but both are present in the checkpoints with different values, so we will NOT tie them")
    assert warning in hf_log and warning in our_log, (hf_log, our_log)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.all_tied_weights_keys


def test_tied_config_ties_when_hf_would(tmp_path):
    """Equal tensors (a torch .bin-style checkpoint with both keys) and a checkpoint holding only the
    LM head (HF swaps source and target) are tied, like from_pretrained."""
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "only_embed")  # save_pretrained drops the tied lm_head
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, keep in (("both_equal", state), ("only_head", {k: v for k, v in state.items()
                                                             if k != "model.embed_tokens.weight"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "only_embed" / "config.json").read_text())
        save_file({k: v.clone() for k, v in keep.items()}, tmp_path / name / "model.safetensors",
                  metadata={"format": "pt"})
    for name in ("only_embed", "both_equal", "only_head"):
        hf, _, ours, our_log, lazy = _both(tmp_path / name)
        assert rel_err(ours, hf) <= 1e-5, (name, rel_err(ours, hf))
        assert lazy.lm_head.weight is lazy.model.embed_tokens.weight, name
        assert "NOT tie" not in our_log, name


@pytest.mark.parametrize("change,unexpected", [
    ({"attention_bias": False}, "model.layers.{0, 1}.self_attn.{q_proj, k_proj, v_proj, o_proj}.bias"),
    ({"num_hidden_layers": 1}, "model.layers.1.input_layernorm.weight"),
])
def test_unused_checkpoint_tensors_get_hfs_load_report(tmp_path, change, unexpected):
    """Table row: biases with attention_bias=false, extra layers were loaded silently."""
    tiny_model("llama").save_pretrained(tmp_path)  # attention_bias=True, mlp_bias=True, 2 layers
    _edit_config(tmp_path, **change)
    hf, hf_log, ours, our_log, _ = _both(tmp_path)
    assert rel_err(ours, hf) <= 1e-5
    assert "UNEXPECTED" in our_log and our_log == hf_log, (our_log, hf_log)  # the same report, line for line
    assert any(unexpected.replace("{", "").split(".")[0] in line for line in our_log.splitlines())
    for line in hf_log.splitlines():
        assert line in our_log


def test_a_valid_single_file_wins_over_a_stale_index(tmp_path):
    """Table row: model.safetensors next to a stale model.safetensors.index.json gave FileNotFoundError."""
    tiny_model("qwen2").save_pretrained(tmp_path)
    stale = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(stale))
    hf, _, ours, _, _ = _both(tmp_path)
    assert rel_err(ours, hf) <= 1e-5
    (tmp_path / "model.safetensors").unlink()  # now the index is all there is: its missing shard is named
    with pytest.raises(ValueError, match=r"model.safetensors.index.json names shard\(s\) that do not exist: "
                                         r"model-00002-of-00002.safetensors"):
        load_partitioned(tmp_path, TwoLevelLayout(n=1, m=1).build())


# -- a bounded parser: hostile headers are ValueErrors naming the file, never an allocation ----------
def _raw(directory: Path, header_len: int, header: bytes, data: bytes = b"") -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / "model.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + header + data)
    return path


def _header(entries: dict) -> bytes:
    return json.dumps(entries).encode()


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("name,make,match", [
    ("huge_length", lambda d: _raw(d, 2 ** 62, b"{}"), r"header length field says 4611686018427387904 bytes"),
    ("length_past_end", lambda d: _raw(d, 1000, b"{}"), r"header length field says 1000 bytes, but the file has 2"),
    ("tiny_file", lambda d: (d.mkdir(), (d / "model.safetensors").write_bytes(b"abc")), r"shorter than the 8-byte"),
    ("not_json", lambda d: _raw(d, 4, b"{{{{"), r"header is not valid JSON"),
    ("deep_json", lambda d: _raw(d, 200_000, b"[" * 100_000 + b"]" * 100_000), r"header is not valid JSON"),
    ("not_object", lambda d: _raw(d, 2, b"[]"), r"header must be a JSON object, got list"),
    ("bad_entry", lambda d: _raw(d, len(_header({"w": 3})), _header({"w": 3})), r"tensor 'w': header entry must be"),
    ("bad_dtype", lambda d: _raw(d, len(h := _header({"w": {**F32_2x2, "dtype": "F128"}})), h, bytes(16)),
     r"tensor 'w' has unsupported dtype 'F128'"),
    ("bad_shape", lambda d: _raw(d, len(h := _header({"w": {**F32_2x2, "shape": [2, -2]}})), h, bytes(16)),
     r"shape must be a list of non-negative integers"),
    ("bad_offsets", lambda d: _raw(d, len(h := _header({"w": {**F32_2x2, "data_offsets": [16, 0]}})), h, bytes(16)),
     r"data_offsets must be \[begin, end\]"),
    ("size_mismatch", lambda d: _raw(d, len(h := _header({"w": {**F32_2x2, "shape": [4, 4]}})), h, bytes(16)),
     r"span 16 bytes, but F32 x \(4, 4\) needs 64"),
    ("huge_shape", lambda d: _raw(d, len(h := _header({"w": {**F32_2x2, "shape": [2 ** 40, 2 ** 40]}})), h, bytes(16)),
     r"span 16 bytes, but F32 x \(1099511627776, 1099511627776\) needs"),
    ("truncated", lambda d: _raw(d, len(h := _header({"w": F32_2x2})), h, bytes(10)),
     r"tensor 'w' needs data up to byte 16 but the file holds 10 bytes of data: the file is truncated"),
])
def test_hostile_safetensors_headers_are_refused(tmp_path, name, make, match):
    """Table row: a huge header length field was a MemoryError."""
    make(tmp_path / name)
    with pytest.raises(ValueError, match=match) as err:
        SafetensorsReader(tmp_path / name)
    assert str(tmp_path / name / "model.safetensors") in str(err.value)  # the file is named
    assert MAX_HEADER_BYTES == 100_000_000


def test_a_valid_file_reads_back(tmp_path):
    path = _raw(tmp_path / "ok", len(h := _header({"w": F32_2x2})), h, struct.pack("<4f", 1, 2, 3, 4))
    with SafetensorsReader(path.parent) as reader:
        assert torch.equal(reader.read("w"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_an_index_may_not_point_outside_its_directory(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match=r"'../elsewhere.safetensors' points outside"):
        SafetensorsReader(tmp_path)
    index.write_text(json.dumps({"weight_map": ["w"]}))
    with pytest.raises(ValueError, match=r"not a safetensors index"):
        SafetensorsReader(tmp_path)
