"""Model knowledge as data: one declarative spec per Hugging Face architecture.

A spec says where the projections of an attention layer and of an MLP live inside the Hugging
Face module tree, how fused weights are packed, which RoPE the model uses and how its attention
module is called. Everything else (slicing, loading, gathering, the forward adapters) is generic
code driven by these specs, so adding an architecture means adding a spec.

Packed QKV layouts (``fused_layout``), as rows of the fused weight (h heads, d dims, H = h*d)::

    "concat"   (GPT-2 c_attn):  [ q: h*d | k: g*d | v: g*dv ]          feature = block + head*d + t
    "per_head" (GPT-NeoX):      [ q0 k0 v0 | q1 k1 v1 | ... ]  (d each) feature = head*3d + block + t
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ds_twolevel.partition import AttentionSpec

FusedLayout = Literal["concat", "per_head"]
BoolOrAttr = bool | str


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention layer lives in the HF module tree and how it is called.

    Paths are dotted attribute paths relative to the ``owner`` module.
    """

    owner: str
    """HF class whose instances are replaced (the injection-policy key)."""
    target: str = ""
    """submodule of the owner that becomes the partitioned layer ("" = the owner itself)."""
    q: str | None = "q_proj"
    """query projection (None when fused)."""
    k: str | None = "k_proj"
    """key projection (None when fused)."""
    v: str | None = "v_proj"
    """value projection (None when fused)."""
    fused: str | None = None
    """fused QKV projection, when q/k/v are packed in one weight."""
    fused_layout: FusedLayout = "concat"
    """packing of the fused projection (see module docstring)."""
    o: str = "o_proj"
    """output projection (its bias, if any, is replicated and added after the all-reduce)."""
    conv1d: bool = False
    """weights stored (in, out) as GPT-2's Conv1D, i.e. transposed w.r.t. nn.Linear."""
    q_norm: str | None = None
    """per-head RMSNorm of q over d (Qwen3); its eps is read from the module."""
    k_norm: str | None = None
    """per-head RMSNorm of k over d (Qwen3)."""
    scaling: str = "scaling"
    """attribute holding the score scale (already includes e.g. GPT-2's inverse-layer-idx factor)."""
    layer_idx: str = "layer_idx"
    """attribute holding the layer index used with the KV cache."""
    signature: tuple[str, ...] = ()
    """positional parameters of the target's forward after ``hidden_states`` (transformers 5.24)."""
    post_dropout: str | None = None
    """dropout the HF module applies to its output (GPT-2 resid_dropout); kept as is."""
    identity: tuple[str, ...] = ()
    """modules made nn.Identity because the partitioned layer already computes them (BERT's
    BertSelfOutput.dense: the output projection runs row-parallel inside the layer)."""


@dataclass(frozen=True)
class MLPLayout:
    """Where one MLP lives in the HF module tree (paths relative to ``owner``)."""

    owner: str
    """HF class whose instances are patched (the injection-policy key)."""
    up: str
    """column-parallel input projection."""
    down: str
    """row-parallel output projection (its bias is replicated, added after the all-reduce)."""
    act: str
    """the activation module/callable, reused as is (exactness: HF's own GELU/SiLU variant)."""
    gate: str | None = None
    """gate projection of a gated MLP (``act(gate(x)) * up(x)``)."""
    target: str = ""
    """submodule replaced by the partitioned MLP ("" = the owner itself)."""
    dropout: str | None = None
    """dropout the HF module applies after ``down`` (GPT-2), kept as is."""
    conv1d: bool = False
    """weights stored (in, out) (GPT-2 Conv1D)."""
    identity: tuple[str, ...] = ()
    """modules made nn.Identity (BERT's BertOutput.dense runs inside the partitioned MLP)."""


@dataclass(frozen=True)
class ArchSpec:
    """Everything the integration knows about one Hugging Face architecture.

    Example:
        >>> SPECS["llama"].attention_spec(LlamaConfig(num_attention_heads=4, num_key_value_heads=2))
    """

    model_type: str
    """``config.model_type``."""
    attention: AttentionLayout
    mlp: MLPLayout
    rope_style: Literal["none", "half", "interleaved"] = "half"
    """RoPE pairing; partial rotary comes from ``rope_parameters["partial_rotary_factor"]``."""
    num_kv_heads_attr: str | None = "num_key_value_heads"
    """config attribute with g (None: MHA, g = h)."""
    qkv_bias: BoolOrAttr = False
    """q/k/v biases: a constant or the config attribute that says."""
    o_bias: BoolOrAttr = False
    """output projection bias: a constant or a config attribute."""
    mlp_bias: BoolOrAttr = False
    """MLP biases: a constant or a config attribute."""
    causal: bool = True
    """decoder (causal) or encoder (bidirectional) attention."""
    unsupported: tuple[tuple[str, Any], ...] = ()
    """(config attribute, value) pairs this integration refuses (e.g. BERT as a decoder)."""
    notes: str = ""

    # -- derived from a config -----------------------------------------------------------------
    def head_dim(self, config: Any) -> int:
        """d: ``config.head_dim`` when set, else hidden_size / num_attention_heads."""
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def rotary_dim(self, config: Any) -> int | None:
        """r: leading rotated dims (partial rotary), None when the whole head rotates."""
        if self.rope_style == "none":
            return None
        params = getattr(config, "rope_parameters", None) or {}
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        return int(self.head_dim(config) * factor)

    def flag(self, config: Any, value: BoolOrAttr) -> bool:
        """Resolve a constant-or-config-attribute flag."""
        return bool(getattr(config, value, False)) if isinstance(value, str) else value

    def attention_spec(self, config: Any, name: str | None = None) -> AttentionSpec:
        """The core AttentionSpec (h, g, d, RoPE) of this model."""
        h = config.num_attention_heads
        g = getattr(config, self.num_kv_heads_attr, None) if self.num_kv_heads_attr else None
        return AttentionSpec(h, g or h, self.head_dim(config), rope_style=self.rope_style,
                             rotary_dim=self.rotary_dim(config), name=name or self.model_type)

    def problems(self, config: Any) -> list[str]:
        """Config settings this integration cannot reproduce exactly."""
        return [f"{attr}={getattr(config, attr)!r}" for attr, bad in self.unsupported
                if getattr(config, attr, None) == bad]


def _llama_like(model_type: str, prefix: str, *, qkv_bias: BoolOrAttr = "attention_bias",
                o_bias: BoolOrAttr = "attention_bias", mlp_bias: BoolOrAttr = "mlp_bias",
                qk_norm: bool = False, notes: str = "") -> ArchSpec:
    attention = AttentionLayout(
        owner=f"{prefix}Attention", signature=("position_embeddings", "attention_mask", "cache"),
        q_norm="q_norm" if qk_norm else None, k_norm="k_norm" if qk_norm else None,
    )
    mlp = MLPLayout(owner=f"{prefix}MLP", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")
    return ArchSpec(model_type, attention, mlp, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, notes=notes)


SPECS: dict[str, ArchSpec] = {
    "llama": _llama_like("llama", "Llama", notes="GQA, RoPE (half), optional biases"),
    "mistral": _llama_like("mistral", "Mistral", qkv_bias=False, o_bias=False, mlp_bias=False,
                           notes="GQA, RoPE, sliding window through HF's mask"),
    "qwen2": _llama_like("qwen2", "Qwen2", qkv_bias=True, o_bias=False, mlp_bias=False,
                         notes="q/k/v biases"),
    "qwen3": _llama_like("qwen3", "Qwen3", mlp_bias=False, qk_norm=True,
                         notes="per-head q_norm/k_norm (sum of squares all-reduced over segments)"),
    "gpt2": ArchSpec(
        "gpt2",
        AttentionLayout(owner="GPT2Attention", q=None, k=None, v=None, fused="c_attn", fused_layout="concat",
                        o="c_proj", conv1d=True, post_dropout="resid_dropout",
                        signature=("cache", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                                   "output_attentions")),
        MLPLayout(owner="GPT2MLP", up="c_fc", down="c_proj", act="act", dropout="dropout", conv1d=True),
        rope_style="none", num_kv_heads_attr=None, qkv_bias=True, o_bias=True, mlp_bias=True,
        unsupported=(("add_cross_attention", True), ("reorder_and_upcast_attn", True)),
        notes="fused Conv1D c_attn split into q/k/v; absolute positions",
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox",
        AttentionLayout(owner="GPTNeoXAttention", q=None, k=None, v=None, fused="query_key_value",
                        fused_layout="per_head", o="dense",
                        signature=("attention_mask", "layer_past", "position_embeddings")),
        MLPLayout(owner="GPTNeoXMLP", up="dense_h_to_4h", down="dense_4h_to_h", act="act"),
        num_kv_heads_attr=None, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=True,
        notes="per-head interleaved fused QKV; partial rotary (rotary_pct)",
    ),
    "bert": ArchSpec(
        "bert",
        AttentionLayout(owner="BertAttention", target="self", q="self.query", k="self.key", v="self.value",
                        o="output.dense", scaling="self.scaling", layer_idx="self.layer_idx",
                        signature=("attention_mask", "cache"), identity=("output.dense",)),
        MLPLayout(owner="BertLayer", target="intermediate", up="intermediate.dense", down="output.dense",
                  act="intermediate.intermediate_act_fn", identity=("output.dense",)),
        rope_style="none", num_kv_heads_attr=None, qkv_bias=True, o_bias=True, mlp_bias=True, causal=False,
        unsupported=(("is_decoder", True), ("add_cross_attention", True)),
        notes="bidirectional encoder, padding masks; BertSelfOutput/BertOutput keep dropout + LayerNorm",
    ),
}


def supported_architectures() -> list[str]:
    """model_type of every architecture with a spec."""
    return sorted(SPECS)


def spec_for(config: Any, *, model_name: str | None = None) -> ArchSpec:
    """The spec of ``config.model_type``; ValueError listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS:
        raise ValueError(
            f"{model_name or model_type}: architecture {model_type!r} has no two-level spec; supported "
            f"architectures: {', '.join(supported_architectures())} (add an ArchSpec to "
            f"hf_integration.specs.SPECS, or pass strict=False to leave its attention dense)"
        )
    return SPECS[model_type]


def get_path(module: torch.nn.Module, path: str) -> Any:
    """``module.a.b`` for path "a.b" ("" = module itself)."""
    obj: Any = module
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def set_path(module: torch.nn.Module, path: str, value: torch.nn.Module) -> None:
    """Replace the submodule at ``path`` (non-empty)."""
    parent, _, name = path.rpartition(".")
    setattr(get_path(module, parent), name, value)


__all__ = ["ArchSpec", "AttentionLayout", "MLPLayout", "SPECS", "get_path", "set_path", "spec_for",
           "supported_architectures"]
