"""Model knowledge as data: one declarative spec per Hugging Face architecture.

A spec says where the projections of an attention layer and of an MLP live inside the Hugging
Face module tree, how fused weights are packed, which RoPE the model uses and how its attention
module is called. Everything else (slicing, loading, gathering, the forward adapters) is generic
code driven by these specs, so adding an architecture means adding a spec.

Packed QKV layouts (``fused_layout``), as rows of the fused weight (h heads, d dims, H = h*d)::

    "concat"   (GPT-2 c_attn, Phi3 qkv_proj): [ q: h*d | k: g*d | v: g*dv ]   feature = block + head*d + t
    "per_head" (GPT-NeoX):      [ q0 k0 v0 | q1 k1 v1 | ... ]  (d each) feature = head*3d + block + t
    "grouped"  (Falcon, new decoder architecture): per KV group c, its h/g query heads, then k_c, v_c:
               [ q_0 .. q_{h/g-1} k_0 v_0 | q_{h/g} .. k_1 v_1 | ... ]  (d each)

Packed MLP input (``MLPLayout.gate_up``, Phi3 ``gate_up_proj``; MoE experts ``gate_up_proj``)::

    [ gate: I | up: I ]   rows of the (2I, H) weight; rank r holds rows [f | I + f], f its I/p features

Nothing in a spec is trusted blindly: every tensor a spec implies is checked against the module's
real tensor (shape, and that no parameter is left unplaced) before anything is replaced, and the
patched layer is compared with the dense module on a small input (the parity probe,
``hf_integration.probe``), so a spec that describes the model wrongly is refused, not computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from ds_twolevel.costmodel.roofline import ModelConfig
from ds_twolevel.sharding.partition import AttentionSpec

FusedLayout = Literal["concat", "per_head", "grouped"]
BoolOrAttr = bool | str
DEFAULT_CACHE_ARGS = ("cache", "past_key_values", "layer_past")
"""``AttentionLayout.cache_args`` unless a spec says otherwise."""


@dataclass(frozen=True)
class Predicate:
    """A test of a config value for ``ArchSpec.unsupported`` (constants are compared with ==).

    Example:
        >>> ArchSpec(..., unsupported=(("use_qk_norm", TRUTHY), ("is_decoder", True)))
    """

    test: Callable[[Any], bool]
    text: str
    """what it matches, for the error message ("any non-null value")."""

    def __call__(self, value: Any) -> bool:
        return bool(self.test(value))


NOT_NONE = Predicate(lambda v: v is not None, "any non-null value")
TRUTHY = Predicate(bool, "any true / non-zero value")


@dataclass(frozen=True)
class QKNormStyle:
    """What an attention layer's q/k norm computes (``AttentionLayout.q_norm`` / ``k_norm``)."""

    formula: Literal["w", "1+w"] = "w"
    """``w*x`` (Llama-style RMSNorm: Qwen3, OLMo2) or ``(1+w)*x`` (Gemma)."""
    eps: str = "variance_epsilon"
    """attribute of the norm module holding its epsilon (Gemma: "eps")."""
    scope: Literal["head", "projection"] = "head"
    """"head": over each head's d dims (Qwen3, Gemma3); "projection": over the whole h*d / g*d
    projection (OLMo2: sum of squares all-reduced over every rank of the layer)."""
    weight_in_float: bool = False
    """the weight multiplies the fp32 normalised value before the cast back (OLMo2, Gemma);
    False: after it (Llama, Qwen3). Same in fp32, a different rounding in bf16/fp16."""


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
    """RMSNorm of q (Qwen3, Gemma3, OLMo2); what it computes is ``norm_style``."""
    k_norm: str | None = None
    """RMSNorm of k."""
    norm_style: QKNormStyle = field(default_factory=QKNormStyle)
    """formula, eps attribute and scope of q_norm / k_norm."""
    scaling: str = "scaling"
    """attribute holding the score scale (already includes e.g. GPT-2's inverse-layer-idx factor,
    Gemma2/3's ``query_pre_attn_scalar ** -0.5``, Granite's ``attention_multiplier``)."""
    softcap: str | None = None
    """attribute holding the score soft-cap (Gemma2 ``attn_logit_softcapping``: scores become
    ``cap * tanh(scores / cap)`` before the mask); None: this module applies none."""
    sliding_window: str | None = None
    """attribute with this layer's sliding window (Gemma2/3, Qwen2: per layer, None on full-attention
    layers), or "config.<name>" (Mistral, Phi3, Mixtral: one for the model). The window itself
    arrives through HF's mask; the layer refuses a call without a mask that the window would cut."""
    layer_idx: str = "layer_idx"
    """attribute holding the layer index used with the KV cache."""
    sinks: str | None = None
    """parameter of the owner holding one sink logit per query head (GPT-OSS ``sinks``): it joins each
    row's softmax as an extra key and is dropped after it. Computed by score_allreduce and qk_allgather
    (explicit scores); seq_rows and kv_shard (fused attention) refuse the call by name."""
    use_rope: str | None = None
    """attribute of the owner saying whether this layer rotates q/k (SmolLM3 ``use_rope``, from
    ``config.no_rope_layers``): a false value builds that layer without RoPE (NoPE). None: every layer
    rotates as ``rope_style`` says."""
    cache_args: tuple[str, ...] = DEFAULT_CACHE_ARGS
    """names the HF forward's KV-cache argument goes by, positional or keyword (the first one bound
    and not None is the cache; transformers 5.x renames ``past_key_values`` to ``cache``)."""
    attention_dropout: str = "config.attention_dropout"
    """where the attention-probability dropout rate is read ("config.<name>" or an attribute of the
    owner): GPT-2 ``attn_pdrop``, BERT ``attention_probs_dropout_prob``."""
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
    up: str | None
    """column-parallel input projection (None when ``gate_up`` holds it)."""
    down: str
    """row-parallel output projection (its bias is replicated, added after the all-reduce)."""
    act: str
    """the activation module/callable, reused as is (exactness: HF's own GELU/SiLU variant)."""
    gate: str | None = None
    """gate projection of a gated MLP (``act(gate(x)) * up(x)``)."""
    gate_up: str | None = None
    """fused [gate | up] projection (Phi3 ``gate_up_proj``, (2I, H)): set instead of gate and up."""
    target: str = ""
    """submodule replaced by the partitioned MLP ("" = the owner itself)."""
    dropout: str | None = None
    """dropout the HF module applies after ``down`` (GPT-2), kept as is."""
    conv1d: bool = False
    """weights stored (in, out) (GPT-2 Conv1D)."""
    identity: tuple[str, ...] = ()
    """modules made nn.Identity (BERT's BertOutput.dense runs inside the partitioned MLP)."""
    width: str | None = None
    """attribute of the owner holding its intermediate size I (Qwen2-MoE's shared expert and dense
    layers: ``intermediate_size``); None: the config's (``intermediate_size``, GPT-2's ``n_inner``)."""

    @property
    def gated(self) -> bool:
        """``act(gate(x)) * up(x)`` (a gate or a fused gate_up projection) rather than ``act(up(x))``."""
        return self.gate is not None or self.gate_up is not None


@dataclass(frozen=True)
class MoELayout:
    """A sparse mixture-of-experts block in the fused-experts layout of transformers 5.x (Mixtral).

    Every expert's MLP is column/row-split over the n*m ranks of the layer (each rank holds I/p
    features of every expert); the router is replicated and runs on every rank. Paths are
    relative to ``owner``; the experts module's own layout flags (``is_transposed``,
    ``is_concatenated``, ``has_bias``) are checked against this spec.
    """

    owner: str
    """HF class whose instances are patched (MixtralSparseMoeBlock)."""
    target: str = "experts"
    """the experts module, replaced by the partitioned one."""
    gate_up: str = "experts.gate_up_proj"
    """(E, 2I, H) fused [gate | up] weights of every expert."""
    down: str = "experts.down_proj"
    """(E, H, I) down weights."""
    num_experts_attr: str = "num_local_experts"
    """config attribute with E."""
    intermediate_attr: str = "intermediate_size"
    """config attribute with each expert's I (Qwen2-MoE, Qwen3-MoE: ``moe_intermediate_size``)."""
    transposed: bool = False
    """experts stored (E, H, 2I) / (E, I, H) (GPT-OSS) rather than (E, 2I, H) / (E, H, I)."""
    packing: Literal["concat", "interleaved"] = "concat"
    """gate/up features of ``gate_up``: [gate: I | up: I] (Mixtral) or interleaved [g0 u0 g1 u1 ...] (GPT-OSS)."""
    bias: bool = False
    """experts have ``gate_up_proj_bias`` (E, 2I), sliced like gate_up, and ``down_proj_bias`` (E, H), added
    once (on tensor-parallel rank 0) before the all-reduce (GPT-OSS)."""
    act: str | None = "experts.act_fn"
    """the experts' activation (reused as is); None where the experts' own gate computes it (GPT-OSS's
    clamped SwiGLU ``_apply_gate`` runs as is on each rank's [gate, up] pairs)."""
    identity: tuple[str, ...] = ()
    """modules made nn.Identity (none for Mixtral)."""

    gated = True
    """every expert is a gated MLP ([gate | up] fused)."""


@dataclass(frozen=True)
class ArchSpec:
    """Everything the integration knows about one Hugging Face architecture.

    Example:
        >>> SPECS["llama"].attention_spec(LlamaConfig(num_attention_heads=4, num_key_value_heads=2))
    """

    model_type: str
    """``config.model_type``."""
    attention: AttentionLayout
    mlp: MLPLayout | MoELayout
    rope_style: Literal["none", "half", "interleaved", "interleaved_half"] = "half"
    """RoPE pairing and cos/sin table layout (:class:`~ds_twolevel.sharding.partition.AttentionSpec`);
    partial rotary comes from ``rope_parameters["partial_rotary_factor"]``."""
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
    """(config attribute, value or :class:`Predicate`) pairs this integration refuses (e.g. BERT as a
    decoder, ``("use_qk_norm", TRUTHY)``)."""
    notes: str = ""
    dense_mlp: MLPLayout | None = None
    """a second MLP kind of an MoE model: its dense layers (``mlp_only_layers``) and shared experts
    (Qwen2-MoE ``shared_expert``; its sigmoid gate stays replicated in the MoE block)."""

    @property
    def mlp_layouts(self) -> tuple[MLPLayout | MoELayout, ...]:
        """Every MLP kind of the architecture (``mlp``, then ``dense_mlp``)."""
        return (self.mlp,) if self.dense_mlp is None else (self.mlp, self.dense_mlp)

    def mlp_layout(self, owner_class: str) -> MLPLayout | MoELayout:
        """The MLP layout whose owner is ``owner_class``."""
        return next(lay for lay in self.mlp_layouts if lay.owner == owner_class)

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
        out = []
        for attr, bad in self.unsupported:
            value = getattr(config, attr, None)
            if bad(value) if isinstance(bad, Predicate) else value == bad:
                out.append(f"{attr}={value!r}" + (f" ({bad.text})" if isinstance(bad, Predicate) else ""))
        return out


LLAMA_SIGNATURE = ("position_embeddings", "attention_mask", "cache")
"""positional parameters of most decoder attention modules after ``hidden_states`` (transformers 5.24)."""
BIDIRECTIONAL = (("use_bidirectional_attention", TRUTHY),)
"""Gemma's encoder mode: attention without the causal mask this integration assumes when HF passes none."""


def _llama_like(model_type: str, prefix: str, *, qkv_bias: BoolOrAttr = "attention_bias",
                o_bias: BoolOrAttr = "attention_bias", mlp_bias: BoolOrAttr = "mlp_bias",
                qk_norm: bool = False, norm_style: QKNormStyle = QKNormStyle(), notes: str = "",
                **spec_fields: Any) -> ArchSpec:
    """A Llama-shaped architecture: q/k/v/o_proj in ``{prefix}Attention``, gate/up/down in ``{prefix}MLP``.

    ``spec_fields``: ArchSpec fields (rope_style, unsupported, ...) and AttentionLayout fields
    (softcap, sliding_window, ...), told apart by name.
    """
    layout_keys = {"softcap", "sliding_window", "o", "signature", "use_rope", "sinks"}
    layout_kw = {k: spec_fields.pop(k) for k in list(spec_fields) if k in layout_keys}
    attention = AttentionLayout(
        owner=f"{prefix}Attention", signature=layout_kw.pop("signature", LLAMA_SIGNATURE),
        q_norm="q_norm" if qk_norm else None, k_norm="k_norm" if qk_norm else None, norm_style=norm_style,
        **layout_kw,
    )
    mlp = MLPLayout(owner=f"{prefix}MLP", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")
    return ArchSpec(model_type, attention, spec_fields.pop("mlp", mlp), qkv_bias=qkv_bias, o_bias=o_bias,
                    mlp_bias=mlp_bias, notes=notes, **spec_fields)


GEMMA_NORM = QKNormStyle(formula="1+w", eps="eps", weight_in_float=True)
OLMO2_NORM = QKNormStyle(scope="projection", weight_in_float=True)
NO_BIAS = dict(qkv_bias=False, o_bias=False, mlp_bias=False)

SPECS: dict[str, ArchSpec] = {
    "llama": _llama_like("llama", "Llama", notes="GQA, RoPE (half), optional biases"),
    "mistral": _llama_like("mistral", "Mistral", **NO_BIAS, sliding_window="config.sliding_window",
                           notes="GQA, RoPE, sliding window through HF's mask"),
    "qwen2": _llama_like("qwen2", "Qwen2", qkv_bias=True, o_bias=False, mlp_bias=False,
                         sliding_window="sliding_window", notes="q/k/v biases"),
    "qwen3": _llama_like("qwen3", "Qwen3", mlp_bias=False, qk_norm=True, sliding_window="sliding_window",
                         notes="per-head q_norm/k_norm (sum of squares all-reduced over segments)"),
    "gemma": _llama_like("gemma", "Gemma", mlp_bias=False, unsupported=BIDIRECTIONAL,
                         notes="GQA/MQA, RoPE; (1+w) RMSNorms and the scaled embedding stay replicated"),
    "gemma2": _llama_like("gemma2", "Gemma2", mlp_bias=False, softcap="attn_logit_softcapping",
                          sliding_window="sliding_window", unsupported=BIDIRECTIONAL,
                          notes="score soft-capping (score path), query_pre_attn_scalar scaling, sliding and "
                                "full layers alternating through HF's masks"),
    "gemma3_text": _llama_like("gemma3_text", "Gemma3", mlp_bias=False, qk_norm=True, norm_style=GEMMA_NORM,
                               sliding_window="sliding_window", unsupported=BIDIRECTIONAL,
                               notes="per-head (1+w) q/k norms (eps attribute .eps); per-layer-type RoPE; "
                                     "transformers 5.24 applies no score softcap in Gemma3"),
    "olmo2": _llama_like("olmo2", "Olmo2", mlp_bias=False, qk_norm=True, norm_style=OLMO2_NORM,
                         notes="q/k norms over the whole projection: sum of squares all-reduced over n*m ranks"),
    "mixtral": _llama_like("mixtral", "Mixtral", **NO_BIAS, sliding_window="config.sliding_window",
                           mlp=MoELayout(owner="MixtralSparseMoeBlock"),
                           unsupported=(("router_jitter_noise", TRUTHY),),
                           notes="MoE: every expert column/row-split over n*m ranks, router replicated"),
    "granite": _llama_like("granite", "Granite",
                           notes="attention_multiplier as the score scale; residual/embedding/logit multipliers "
                                 "stay outside the partitioned layers"),
    "cohere": _llama_like("cohere", "Cohere", mlp_bias=False, rope_style="interleaved",
                          unsupported=(("use_qk_norm", TRUTHY),),
                          notes="interleaved RoPE; parallel attention + MLP residual (outside the layers)"),
    "starcoder2": ArchSpec(
        "starcoder2",
        AttentionLayout(owner="Starcoder2Attention", signature=LLAMA_SIGNATURE, sliding_window="config.sliding_window"),
        MLPLayout(owner="Starcoder2MLP", up="c_fc", down="c_proj", act="act"),
        qkv_bias="use_bias", o_bias="use_bias", mlp_bias="use_bias", unsupported=(("residual_dropout", TRUTHY),),
        notes="GQA, biases (use_bias), plain GELU MLP; residual dropout refused (applied inside HF's modules)",
    ),
    "olmo3": _llama_like("olmo3", "Olmo3", mlp_bias=False, qk_norm=True, norm_style=OLMO2_NORM,
                         sliding_window="sliding_window",
                         notes="OLMo2's projection-wide q/k norms; sliding and full layers through HF's masks"),
    "smollm3": _llama_like("smollm3", "SmolLM3", use_rope="use_rope", sliding_window="sliding_window",
                           notes="per-layer NoPE (no_rope_layers): those layers are built without RoPE"),
    "glm4": _llama_like("glm4", "Glm4", o_bias=False, mlp_bias=False, rope_style="interleaved_half",
                        mlp=MLPLayout(owner="Glm4MLP", up=None, gate_up="gate_up_proj", down="down_proj",
                                      act="activation_fn"),
                        notes="interleaved RoPE from a half-layout table, partial rotary (0.5); fused gate_up; "
                              "post-attention/post-MLP norms stay replicated"),
    "helium": _llama_like("helium", "Helium", o_bias=False, rope_style="interleaved_half",
                          notes="interleaved RoPE from a half-layout table"),
    "qwen2_moe": _llama_like(
        "qwen2_moe", "Qwen2Moe", qkv_bias="qkv_bias", o_bias=False, mlp_bias=False,
        mlp=MoELayout(owner="Qwen2MoeSparseMoeBlock", num_experts_attr="num_experts",
                      intermediate_attr="moe_intermediate_size"),
        dense_mlp=MLPLayout(owner="Qwen2MoeMLP", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn",
                            width="intermediate_size"),
        unsupported=(("use_sliding_window", TRUTHY),),
        notes="MoE (experts of moe_intermediate_size) with a shared expert split like a dense MLP and its sigmoid "
              "gate replicated; mlp_only_layers dense"),
    "qwen3_moe": _llama_like(
        "qwen3_moe", "Qwen3Moe", mlp_bias=False, qk_norm=True, sliding_window="sliding_window",
        mlp=MoELayout(owner="Qwen3MoeSparseMoeBlock", num_experts_attr="num_experts",
                      intermediate_attr="moe_intermediate_size"),
        dense_mlp=MLPLayout(owner="Qwen3MoeMLP", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn",
                            width="intermediate_size"),
        notes="MoE (experts of moe_intermediate_size), per-head q/k norms; mlp_only_layers dense"),
    "gpt_oss": _llama_like(
        "gpt_oss", "GptOss", mlp_bias=False, sinks="sinks", sliding_window="sliding_window",
        mlp=MoELayout(owner="GptOssMLP", num_experts_attr="num_local_experts", act=None, transposed=True,
                      packing="interleaved", bias=True),
        notes="attention sinks (a logit per head, split with the head groups; score_allreduce and qk_allgather, "
              "fused strategies refuse); experts stored transposed with interleaved gate_up, biases and HF's "
              "clamped SwiGLU; RoPE table of r/2 frequencies; sliding and full layers"),
    "phi3": ArchSpec(
        "phi3",
        AttentionLayout(owner="Phi3Attention", q=None, k=None, v=None, fused="qkv_proj", fused_layout="concat",
                        signature=LLAMA_SIGNATURE, sliding_window="config.sliding_window"),
        MLPLayout(owner="Phi3MLP", up=None, gate_up="gate_up_proj", down="down_proj", act="activation_fn"),
        notes="fused qkv_proj [q | k | v] (GQA) and gate_up_proj [gate | up]; partial rotary",
    ),
    "phi": ArchSpec(
        "phi",
        AttentionLayout(owner="PhiAttention", o="dense", signature=LLAMA_SIGNATURE),
        MLPLayout(owner="PhiMLP", up="fc1", down="fc2", act="activation_fn"),
        qkv_bias=True, o_bias=True, mlp_bias=True, unsupported=(("qk_layernorm", TRUTHY),),
        notes="partial rotary (partial_rotary_factor), biases everywhere, plain GELU MLP",
    ),
    "stablelm": ArchSpec(
        "stablelm",
        AttentionLayout(owner="StableLmAttention",
                        signature=("attention_mask", "position_ids", "cache", "output_attentions", "use_cache",
                                   "position_embeddings")),
        MLPLayout(owner="StableLmMLP", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn"),
        qkv_bias="use_qkv_bias", unsupported=(("qk_layernorm", TRUTHY),),
        notes="partial rotary (0.25 by default), optional q/k/v biases",
    ),
    "gpt2": ArchSpec(
        "gpt2",
        AttentionLayout(owner="GPT2Attention", q=None, k=None, v=None, fused="c_attn", fused_layout="concat",
                        o="c_proj", conv1d=True, post_dropout="resid_dropout", attention_dropout="config.attn_pdrop",
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
    "falcon": ArchSpec(
        "falcon",
        AttentionLayout(owner="FalconAttention", q=None, k=None, v=None, fused="query_key_value",
                        fused_layout="grouped", o="dense", scaling="inv_norm_factor",
                        signature=("alibi", "attention_mask", "position_ids", "layer_past", "use_cache",
                                   "output_attentions", "position_embeddings")),
        MLPLayout(owner="FalconMLP", up="dense_h_to_4h", down="dense_4h_to_h", act="act",
                  width="config.ffn_hidden_size"),
        num_kv_heads_attr="num_kv_heads", qkv_bias="bias", o_bias="bias", mlp_bias="bias",
        unsupported=(("new_decoder_architecture", False), ("alibi", TRUTHY), ("attention_dropout", TRUTHY)),
        notes="new decoder architecture: fused QKV packed per KV group [q x h/g | k | v] (GQA); MLP width "
              "ffn_hidden_size; ALiBi and the older packings refused; attention_dropout refused (HF's rotary path "
              "applies none)",
    ),
    "bert": ArchSpec(
        "bert",
        AttentionLayout(owner="BertAttention", target="self", q="self.query", k="self.key", v="self.value",
                        o="output.dense", scaling="self.scaling", layer_idx="self.layer_idx",
                        signature=("attention_mask", "cache"), identity=("output.dense",),
                        attention_dropout="config.attention_probs_dropout_prob"),
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


COST_MODEL_FAMILIES: dict[str, str] = {"qwen3": "qwen3", "olmo2": "olmo2", "olmo3": "olmo3", "gemma3": "gemma3_text"}
"""model_type prefix -> the spec whose cost-model facts a variant without a spec of its own shares
(qwen3_next, the multimodal gemma3 config)."""
COST_MODEL_ONLY: dict[str, dict[str, Any]] = {"opt": dict(gated=False, rope_style="none"), "gptj": dict(gated=False)}
"""cost-model facts of architectures without a spec (the planner models them; ``patch_model`` refuses them)."""


def cost_model_facts(spec: ArchSpec) -> dict[str, Any]:
    """What :meth:`ModelConfig.from_hf_config` needs beyond a config's shapes, read from ``spec``."""
    norm = spec.attention.norm_style
    return dict(gated=spec.mlp.gated, qk_norm=spec.attention.q_norm is not None, qk_norm_scope=norm.scope,
                rope_style=spec.rope_style)


def _facts_for(model_type: str) -> dict[str, Any]:
    """Cost-model facts of a model_type: its spec, a family's spec, a spec-less entry, else none (the
    cost model's defaults: gated MLP, half RoPE, no q/k norm)."""
    if model_type in SPECS:
        return cost_model_facts(SPECS[model_type])
    family = next((key for prefix, key in COST_MODEL_FAMILIES.items() if model_type.startswith(prefix)), None)
    if family is not None:
        return cost_model_facts(SPECS[family])
    return dict(COST_MODEL_ONLY.get(model_type, {}))


def cost_model_config(config: Any, name: str = "model") -> ModelConfig:
    """The cost model's :class:`~ds_twolevel.costmodel.roofline.ModelConfig` of a Hugging Face config
    (a ``config.json`` dict or a ``PretrainedConfig``): shapes from the config, the rest from its spec.

    Example:
        >>> cost_model_config({"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16}).qk_norm
        True
    """
    data = dict(config if isinstance(config, dict) else config.to_dict())
    spec = SPECS.get(str(data.get("model_type") or ""))
    if spec is not None:  # shapes under the spec's own names (Falcon: num_kv_heads, ffn_hidden_size)
        if spec.num_kv_heads_attr and data.get(spec.num_kv_heads_attr) is not None:
            data.setdefault("num_key_value_heads", data[spec.num_kv_heads_attr])
        width = getattr(spec.mlp, "width", None) or ""
        if width.startswith("config.") and data.get(width[len("config."):]) is not None:
            data["intermediate_size"] = data[width[len("config."):]]
    return ModelConfig.from_hf_config(data, name, **_facts_for(str(data.get("model_type") or "")))


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


__all__ = ["NOT_NONE", "TRUTHY", "ArchSpec", "AttentionLayout", "MLPLayout", "MoELayout", "Predicate", "QKNormStyle",
           "SPECS", "cost_model_config", "cost_model_facts", "get_path", "set_path", "spec_for",
           "supported_architectures"]
