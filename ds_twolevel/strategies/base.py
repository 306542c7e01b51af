"""What every attention strategy shares: the call record, the cost records, the context of ``attend``.

A strategy is one module of this package with

* ``NAME`` (the config / CLI / ``strategy=`` spelling) and ``AUTO`` (whether ``"cost_model"`` may pick it);
* ``why_not(call) -> str | None``: why it cannot compute the call exactly (None: it can);
* ``collectives(call) -> list[Collective]``: the forward collectives it issues over the segment axis
  (what :class:`~ds_twolevel.parallel.collectives.CommCounter` counts at run time);
* ``ops(model, call, eb) -> list[Op]``: its compute ops (FLOPs and bytes, for the roofline);
* ``activation_bytes(model, call, eb) -> float``: its largest live activation set (inference);
* ``attend(ctx, q, k, v, mask) -> (b, h/n, s, dv/m)``: the attention itself.

Optionally ``BACKWARD = False`` (inference only) and ``PREFILL_ONLY = True`` (a requested strategy that
splits query rows falls back to ``"cost_model"`` for decode's single row). :mod:`.registry` lists them and
:func:`~.registry.plan_call` is the one place that decides which strategy runs a call - for the layer
and for the cost model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ds_twolevel.parallel.collectives import ring_bytes
from ds_twolevel.parallel.layout import AxisGroup

CACHE_LAYOUTS = ("segments", "kv_shard")
""""segments": each rank caches (b, g/n, s, d/m) of every position (the dim split);
"kv_shard": each rank of a segment group caches full-d K/V of its own positions (p % m == j)."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a decoder-only transformer, as the cost model needs them.

    Example:
        >>> ModelConfig("tiny", hidden=256, heads=8, kv_heads=2, head_dim=32, intermediate=512, layers=2)
    """

    name: str
    hidden: int
    """H."""
    heads: int
    """h: query heads."""
    kv_heads: int
    """g: key/value heads."""
    head_dim: int
    """d."""
    intermediate: int
    """MLP intermediate size I."""
    layers: int
    gated: bool = True
    """gated MLP (gate, up, down: Llama) or plain (up, down: GPT)."""
    qk_norm: bool = False
    """RMSNorm of q and k (Qwen3, Gemma3: per head; OLMo2: over the whole projection)."""
    qk_norm_scope: str = "head"
    """"head" or "projection" (see :class:`AttentionCall`)."""
    rope_style: str = "half"
    vocab: int = 0
    """vocabulary size (memory of the replicated embedding + LM head; 0: left out)."""
    tied_embeddings: bool = False

    def spec(self, name: str | None = None):
        """The layer's :class:`~ds_twolevel.sharding.partition.AttentionSpec`."""
        from ds_twolevel.sharding.partition import AttentionSpec

        return AttentionSpec(self.heads, self.kv_heads, self.head_dim, rope_style=self.rope_style,
                             name=name or self.name)

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "model", *, gated: bool = True, qk_norm: bool = False,
                       qk_norm_scope: str = "head", rope_style: str = "half") -> "ModelConfig":
        """Read the shapes of a Hugging Face ``config.json`` dict (Llama/Mistral/Qwen/GPT-2 key names).

        What a config does not state - a gated MLP, q/k norms and their scope, the RoPE style - is
        passed in: the Hugging Face integration's ``cost_model_config(config)`` reads it from the
        model's ArchSpec (the core knows no architecture by name).

        Example:
            >>> ModelConfig.from_hf_config({"n_embd": 768, "n_head": 12}, "gpt2", gated=False, rope_style="none")
        """
        get = lambda *keys, default=None: next((config[k] for k in keys if config.get(k) is not None), default)
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        if hidden is None or heads is None:
            raise ValueError(f"{name}: config has no hidden_size/num_attention_heads; keys: {sorted(config)[:20]}")
        return cls(
            name=name, hidden=hidden, heads=heads,
            kv_heads=get("num_key_value_heads", "n_head_kv", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            intermediate=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            layers=get("num_hidden_layers", "n_layer", default=1),
            gated=gated, qk_norm=qk_norm, qk_norm_scope=qk_norm_scope, rope_style=rope_style,
            vocab=get("vocab_size", default=0),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class Collective:
    """One predicted collective: op, mesh axis, payload tag, full-tensor elements, group size."""

    op: str
    axis: str
    tag: str
    numel: int
    ranks: int
    backward: bool = False

    def bytes_sent(self, element_size: int, sum_size: int | None = None) -> int:
        """Ring bytes this rank sends; a sum (all-reduce, reduce-scatter) at ``sum_size`` bytes per
        element when given (:func:`sum_size`: the layer's ``reduce_dtype``), else at ``element_size``."""
        size = sum_size if sum_size and self.op in SUMS else element_size
        return ring_bytes(self.op, self.numel * size, self.ranks)


@dataclass(frozen=True)
class Op:
    """One compute op of a layer on one rank: FLOPs and bytes moved to/from device memory."""

    name: str
    flops: float
    bytes: float

    def time(self, hw) -> float:
        """Roofline time on ``hw``."""
        return max(self.flops / hw.peak_flops, self.bytes / hw.mem_bandwidth)


SUMS = ("all_reduce", "reduce_scatter")
"""the collectives that add tensors (in the layer's ``reduce_dtype``); gathers and all-to-alls move them."""


def comm_time(collectives: Sequence[Collective], hw, eb: int, m: int, n: int, sum_size: int | None = None) -> float:
    """Seconds for ``collectives`` of one layer on ``hw``: latency + ring bytes / bus bandwidth of the group.

    A group's span (consecutive ranks it covers: m fastest, then n, then dp) decides whether it stays
    inside one node. ``sum_size``: bytes per element of the sums (see :meth:`Collective.bytes_sent`).
    """
    stride = {"m": 1, "tp": 1, "n": m, "kv_rep": m, "dp": m * n}
    total = 0.0
    for col in collectives:
        span = col.ranks * stride.get(col.axis, m * n)
        total += hw.collective_latency + col.bytes_sent(eb, sum_size) / hw.busbw(span)
    return total


@dataclass(frozen=True, kw_only=True)
class AttentionCall:
    """Shapes and facts of one call of one partitioned attention layer on one rank (keyword-only).

    Example:
        >>> AttentionCall(batch=1, q_len=2048, kv_len=2048, hidden=1024, local_heads=4, local_kv_heads=4,
        ...               head_dim=128, n=2, m=2, causal_blocks=True, plain_causal=True)
    """

    batch: int
    q_len: int
    kv_len: int
    """keys attended to (cached + new)."""
    hidden: int
    local_heads: int
    """h/n."""
    local_kv_heads: int
    """g/n (1 when KV heads are replicated)."""
    head_dim: int
    """full d."""
    n: int
    """head groups."""
    m: int
    """segments of each head's dims (the segment axis)."""
    qk_norm: bool = False
    kv_rep: int = 1
    """head groups holding copies of one KV head (n/g when n > g, else 1)."""
    qkv_bias: bool = False
    causal_blocks: bool = False
    """plain causal mask (no padding, no dropout) with q_len == kv_len > 1: the score path
    computes only the key blocks each query block can see."""
    v_head_dim: int | None = None
    """value head dim (None: head_dim)."""
    qk_norm_scope: str = "head"
    """q/k norm over each head ("head": sums of squares all-reduced over segments) or over the whole
    projection ("projection", OLMo2: all-reduced over the tensor-parallel axis)."""
    plain_causal: bool = False
    """causal attention with no mask tensor (queries are the last q_len of the kv_len keys);
    ``causal_blocks`` implies it."""
    dropout: bool = False
    """attention dropout is active (training with p > 0)."""
    grad: bool = False
    """autograd will differentiate the call."""
    softcap: bool = False
    """scores are soft-capped (Gemma2): fused SDPA cannot compute them."""
    sinks: bool = False
    """attention sinks (GPT-OSS): a learnable logit per head joins each row's softmax and is dropped after
    it; the score strategies add it to the softmax's denominator, the fused ones refuse the call."""
    cache_layout: str = "segments"
    """layout of the KV cache the call reads and writes (see :data:`CACHE_LAYOUTS`)."""
    cached: int = 0
    """positions already in the cache before the call."""
    element_size: int = 4
    """bytes per element of the activations."""
    reduce_size: int = 4
    """bytes per element of the dtype the layer sums over ranks in (its ``reduce_dtype``: fp32 by
    default) when wider than the activations'; 0: the activations' own dtype (:func:`sum_size`)."""

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @property
    def no_mask_causal(self) -> bool:
        """Causal with no mask tensor (``causal_blocks`` or ``plain_causal``)."""
        return self.causal_blocks or self.plain_causal


def sum_size(call: AttentionCall, element_size: int | None = None) -> int:
    """Bytes per element of the call's sums over ranks with activations of ``element_size`` bytes
    (default: the call's).

    Example:
        >>> shape = dict(batch=1, q_len=1, kv_len=8, hidden=64, local_heads=2, local_kv_heads=2, head_dim=16, n=2, m=2)
        >>> sum_size(AttentionCall(**shape, element_size=2)), sum_size(AttentionCall(**shape, element_size=2, reduce_size=0))
        (4, 2)
    """
    eb = call.element_size if element_size is None else element_size
    return eb if call.reduce_size == 0 else max(eb, call.reduce_size)


def plain_causal(call: AttentionCall) -> bool:
    """Whether the call is causal with no mask tensor (``causal_blocks`` or ``plain_causal``)."""
    return bool(call.causal_blocks or call.plain_causal)


@dataclass(frozen=True)
class AttendContext:
    """What a strategy's ``attend`` needs from the layer for one call."""

    seg: AxisGroup
    """the m ranks of this head group (the segment axis)."""
    scaling: float
    """score scale (1/sqrt(d) of the full head dim unless the model says otherwise)."""
    causal: bool
    """the layer is causal (a decoder)."""
    q_heads: Sequence[int] = ()
    """global query heads of this head group (to slice a per-head 4-D mask given for all h heads)."""
    store: Any = None
    """kv_shard: this layer's :class:`~ds_twolevel.layers.seq_cache.PositionShardedKV`."""
    call: AttentionCall | None = None
    """the call being attended (the score strategies read their variant from it)."""
    softcap: float | None = None
    """Gemma2's score soft-cap (None: none)."""
    sinks: Any = None
    """(h/n,) sink logits of this head group's query heads (GPT-OSS; None: none), replicated over segments."""
    dropout: Callable[..., Any] | None = None
    """``dropout(probs, q_len, row0)`` with the call's keyed mask (None: no dropout)."""


class Strategy(Protocol):
    """The module interface of an attention strategy (see the module docstring)."""

    NAME: str
    AUTO: bool

    def why_not(self, call: AttentionCall) -> str | None: ...

    def collectives(self, call: AttentionCall) -> list[Collective]: ...

    def ops(self, model: Any, call: AttentionCall, eb: int) -> list[Op]: ...

    def activation_bytes(self, model: Any, call: AttentionCall, eb: int) -> float: ...

    def attend(self, ctx: AttendContext, q: Any, k: Any, v: Any, mask: Any) -> Any: ...
