"""Communication model of the partitioned layers: which collectives a call issues, how big.

The functions here predict, from shapes alone, the exact list of collectives that
:class:`~ds_twolevel.attention.TwoLevelAttention` and :class:`~ds_twolevel.mlp.TwoLevelMLP`
issue; tests check them against what the layers count at run time. The ``"auto"`` strategy
picks the score strategy that moves fewer bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .collectives import ring_bytes

STRATEGIES = ("score_allreduce", "qk_allgather")


@dataclass(frozen=True)
class Collective:
    """One predicted collective: op, mesh axis, payload tag, full-tensor elements, group size."""

    op: str
    axis: str
    tag: str
    numel: int
    ranks: int
    backward: bool = False

    def bytes_sent(self, element_size: int) -> int:
        return ring_bytes(self.op, self.numel * element_size, self.ranks)


@dataclass(frozen=True)
class AttentionCall:
    """Shapes of one call of one partitioned attention layer on one rank."""

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
    m: int
    n: int
    qk_norm: bool = False
    kv_rep: int = 1
    """head groups holding copies of one KV head (n/g when n > g, else 1)."""
    qkv_bias: bool = False
    causal_blocks: bool = False
    """plain causal mask (no padding, no dropout) with q_len == kv_len > 1: the score path
    computes only the key blocks each query block can see (:func:`causal_block_rows`)."""
    v_head_dim: int | None = None
    """value head dim (None: head_dim)."""
    qk_norm_scope: str = "head"
    """q/k norm over each head ("head": sums of squares all-reduced over segments) or over the whole
    projection ("projection", OLMo2: all-reduced over the tensor-parallel axis)."""

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim


def split_softmax(m: int, q_len: int) -> bool:
    """Whether score_allreduce splits its all-reduce into reduce-scatter (partial scores, by query
    rows) + all-gather (probabilities): when there are m > 1 segments and the query rows divide by
    m (not for decode's single row)."""
    return m > 1 and q_len > 1 and q_len % m == 0


def causal_block_rows(m: int, q_len: int, min_rows: int = 128, max_pairs: int = 4) -> int:
    """Rows per query block of the causal score path (0: q_len does not split into 2m blocks).

    The q_len rows are cut into B = 2*m*pairs blocks (each rank of the segment group owns
    ``pairs`` zigzag pairs, :func:`causal_block_owner`); the most pairs (up to ``max_pairs``) that
    divide q_len with blocks of at least ``min_rows`` rows, else one pair.
    """
    for pairs in range(max_pairs, 0, -1):
        blocks = 2 * m * pairs
        if q_len % blocks == 0 and (q_len // blocks >= min_rows or pairs == 1):
            return q_len // blocks
    return 0


def causal_block_owner(m: int, blocks: int, rank: int) -> list[int]:
    """Query blocks owned by ``rank`` of m: pairs (t*2m + rank, t*2m + 2m-1 - rank), so every rank
    gets the same number of visible scores."""
    return [c for t in range(0, blocks, 2 * m) for c in (t + rank, t + 2 * m - 1 - rank)]


def causal_block_numel(call: "AttentionCall", rows: int) -> int:
    """Scores of the blocked causal path: block c (of B) has rows x (c+1)*rows of them."""
    blocks = call.q_len // rows
    return call.batch * call.local_heads * rows * rows * blocks * (blocks + 1) // 2


def values_gathered(call: AttentionCall, probs_numel: int) -> bool:
    """Whether the split score path gathers V instead of the probabilities (fewer bytes).

    After the reduce-scatter each rank of the segment group holds the probabilities of its own
    query rows. Two exact ways to finish: all-gather those probabilities (``probs_numel``
    elements, s_q x s_kv per head) and multiply by this segment's v; or all-gather v (full
    value dim, b g/n s_kv d_v) so that each rank multiplies its rows by the whole v, then
    all-to-all the (rows, d_v) outputs back to (all rows, d_v/m) per segment for the row-parallel
    output projection. Same FLOPs; the second moves ~s·d instead of ~s² elements, so it wins
    once s_kv > d_v (g/h + 1/m) (split softmax; the causal blocks send about half the
    probabilities, so about twice that) - every long prefill. Ties keep the probabilities.
    Every one of these collectives sends (m-1)/m of the elements it is counted by, so elements
    decide, whatever the dtype.
    """
    c = call
    v_numel = c.batch * c.local_kv_heads * c.kv_len * c.v_dim
    rows_numel = c.batch * c.local_heads * c.q_len * c.v_dim // c.m  # this rank's all-to-all tensor
    return v_numel + rows_numel < probs_numel


def _split_collectives(call: AttentionCall, scores_numel: int) -> list[Collective]:
    """Reduce-scatter of the partial scores, then the probabilities or V (:func:`values_gathered`)."""
    c, m = call, call.m
    out = [Collective("reduce_scatter", "m", "scores", scores_numel, m)]
    if values_gathered(c, scores_numel):
        return out + [Collective("all_gather", "m", "v", c.batch * c.local_kv_heads * c.kv_len * c.v_dim, m),
                      Collective("all_to_all", "m", "attn_rows", c.batch * c.local_heads * c.q_len * c.v_dim // m, m)]
    return out + [Collective("all_gather", "m", "probs", scores_numel, m)]


def score_strategy_collectives(call: AttentionCall, strategy: str) -> list[Collective]:
    """Forward collectives over the segment axis for the score computation."""
    c, m = call, call.m
    if m == 1:
        return []
    if strategy == "score_allreduce":
        rows = causal_block_rows(m, c.q_len) if c.causal_blocks else 0
        if rows:  # only the visible key blocks, packed into one reduce-scatter
            return _split_collectives(c, causal_block_numel(c, rows))
        numel = c.batch * c.local_heads * c.q_len * c.kv_len
        if split_softmax(m, c.q_len):  # the all-reduce as its two halves, softmax on 1/m of the rows
            return _split_collectives(c, numel)
        return [Collective("all_reduce", "m", "scores", numel, m)]
    if strategy == "qk_allgather":
        return [
            Collective("all_gather", "m", "q", c.batch * c.local_heads * c.q_len * c.head_dim, m),
            Collective("all_gather", "m", "k", c.batch * c.local_kv_heads * c.kv_len * c.head_dim, m),
        ]
    raise ValueError(f"strategy must be one of {STRATEGIES} or 'auto', got {strategy!r}")


def choose_strategy(call: AttentionCall, element_size: int = 4) -> str:
    """The strategy that sends fewer bytes for this call (ties go to qk_allgather: fused SDPA)."""
    sent = {
        s: sum(col.bytes_sent(element_size) for col in score_strategy_collectives(call, s))
        for s in STRATEGIES
    }
    return "score_allreduce" if sent["score_allreduce"] < sent["qk_allgather"] else "qk_allgather"


_BACKWARD_OF = {"all_reduce": "all_reduce", "all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
                "all_to_all": "all_to_all"}


def attention_collectives(
    call: AttentionCall, strategy: str, *, backward: bool = False, input_grad: bool = True
) -> list[Collective]:
    """Every collective one TwoLevelAttention call issues (forward, plus backward if asked).

    ``input_grad``: whether the input needs a gradient (the backward input all-reduce).
    """
    c = call
    tp = c.m * c.n
    whole = c.qk_norm and c.qk_norm_scope == "projection"
    fwd: list[Collective] = []
    if c.qk_norm and not whole and c.m > 1:
        fwd += [
            Collective("all_reduce", "m", "q_sumsq", c.batch * c.q_len * c.local_heads, c.m),
            Collective("all_reduce", "m", "k_sumsq", c.batch * c.q_len * c.local_kv_heads, c.m),
        ]
    if whole and tp > 1:  # one sum of squares per token over every rank of the layer
        fwd += [Collective("all_reduce", "tp", f"{t}_sumsq", c.batch * c.q_len, tp) for t in ("q", "k")]
    fwd += score_strategy_collectives(c, strategy)
    if tp > 1:
        fwd.append(Collective("all_reduce", "tp", "attn_out", c.batch * c.q_len * c.hidden, tp))
    if not backward:
        return fwd
    bwd = [
        Collective(_BACKWARD_OF[f.op], f.axis, f.tag, f.numel, f.ranks, True)
        for f in fwd if f.axis == "m" or f.tag.endswith("_sumsq")
    ]
    dl = c.head_dim // c.m
    if c.qk_norm and not whole and c.n > 1:
        bwd += [Collective("all_reduce", "n", "q_norm_weight", dl, c.n, True),
                Collective("all_reduce", "n", "k_norm_weight", dl, c.n, True)]
    if whole and c.kv_rep > 1:  # k's weight slice lives on every copy of its KV head
        bwd.append(Collective("all_reduce", "kv_rep", "k_norm_weight", c.local_kv_heads * dl, c.kv_rep, True))
    if c.kv_rep > 1:  # replicated KV heads: weight (and bias) gradients summed over the copies
        kv_out = c.local_kv_heads * (c.head_dim // c.m)
        for t in ("k", "v"):
            bwd.append(Collective("all_reduce", "kv_rep", f"{t}_weight", kv_out * c.hidden, c.kv_rep, True))
            if c.qkv_bias:
                bwd.append(Collective("all_reduce", "kv_rep", f"{t}_bias", kv_out, c.kv_rep, True))
    if tp > 1 and input_grad:
        bwd.append(Collective("all_reduce", "tp", "attn_in", c.batch * c.q_len * c.hidden, tp, True))
    return fwd + bwd


def mlp_collectives(
    *, batch: int, seq: int, hidden: int, tp: int, backward: bool = False, input_grad: bool = True
) -> list[Collective]:
    """Collectives of one TwoLevelMLP call: output all-reduce (+ input-gradient all-reduce)."""
    if tp == 1:
        return []
    out = [Collective("all_reduce", "tp", "mlp_out", batch * seq * hidden, tp)]
    if backward and input_grad:
        out.append(Collective("all_reduce", "tp", "mlp_in", batch * seq * hidden, tp, True))
    return out


# ==================================================================================================
# Performance model: FLOPs, bytes, memory and time of a whole model on a layout
# ==================================================================================================
# Assumptions (also in docs/performance.md):
#   * per-op roofline: an op takes max(flops / peak_flops, bytes / mem_bandwidth); ops run one
#     after another; communication is not overlapped with compute;
#   * a collective takes latency + ring_bytes / bus bandwidth (nccl-tests' busbw definition);
#     a group of consecutive ranks (m fastest) inside one node uses the intra-node bandwidth;
#   * attention computes the full s_q x s_kv score rectangle (causal block skipping is not
#     modelled in the FLOPs and times: the fused causal kernel and the blocked causal score path,
#     :func:`causal_block_rows`, skip about half of it at prefill - conservative for both; the
#     collectives above do count the blocked path's smaller score tensors exactly); "qk_allgather" is fused (scores never reach memory), "score_allreduce"
#     writes and reads the scores (materialised: 4 passes over b*h/n*s_q*s_kv elements);
#   * weights are read once per forward, activations of each op read and written once;
#   * norms, RoPE, residual adds, embeddings and the LM head are left out of the time (they are
#     replicated and the same for every layout); embeddings count in memory when vocab is known.
PHASES = ("prefill", "decode")


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
        """The layer's :class:`~ds_twolevel.partition.AttentionSpec`."""
        from .partition import AttentionSpec

        return AttentionSpec(self.heads, self.kv_heads, self.head_dim, rope_style=self.rope_style,
                             name=name or self.name)

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "model") -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (Llama/Mistral/Qwen/GPT-2 key names)."""
        get = lambda *keys, default=None: next((config[k] for k in keys if config.get(k) is not None), default)
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        if hidden is None or heads is None:
            raise ValueError(f"{name}: config has no hidden_size/num_attention_heads; keys: {sorted(config)[:20]}")
        model_type = str(config.get("model_type", ""))
        return cls(
            name=name, hidden=hidden, heads=heads,
            kv_heads=get("num_key_value_heads", "n_head_kv", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            intermediate=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            layers=get("num_hidden_layers", "n_layer", default=1),
            gated=model_type not in ("gpt2", "gpt_neox", "bert", "opt", "gptj"),
            qk_norm=model_type.startswith(("qwen3", "olmo2", "olmo3", "gemma3")),
            qk_norm_scope="projection" if model_type.startswith(("olmo2", "olmo3")) else "head",
            rope_style="none" if model_type in ("gpt2", "bert", "opt") else "half",
            vocab=get("vocab_size", default=0),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class Phase:
    """One inference step: ``prefill`` of batch x seq tokens, or ``decode`` of one new token per
    sequence against a KV cache of ``seq`` positions.

    Example:
        >>> Phase("decode", batch=8, seq=4096).kv_len
        4097
    """

    kind: str
    batch: int
    seq: int

    def __post_init__(self) -> None:
        if self.kind not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.kind!r}")
        if self.batch < 1 or self.seq < 1:
            raise ValueError(f"batch ({self.batch}) and seq ({self.seq}) must be >= 1")

    @property
    def q_len(self) -> int:
        """New tokens per sequence."""
        return self.seq if self.kind == "prefill" else 1

    @property
    def kv_len(self) -> int:
        """Keys attended to (cached + new)."""
        return self.seq if self.kind == "prefill" else self.seq + 1

    @property
    def tokens(self) -> int:
        """Tokens produced (decode) or processed (prefill) by the step."""
        return self.batch * self.q_len


def attention_call(model: ModelConfig, n: int, m: int, batch: int, q_len: int, kv_len: int, *,
                   causal: bool = True) -> AttentionCall:
    """The :class:`AttentionCall` of one rank of an (n, m) layout (KV replicated when n > g).

    ``causal``: a decoder's plain causal mask (no padding); a prefill (q_len == kv_len > 1) then
    takes the blocked causal score path.
    """
    return AttentionCall(batch, q_len, kv_len, model.hidden, model.heads // n, max(model.kv_heads // n, 1),
                         model.head_dim, m, n, model.qk_norm, kv_rep=max(n // model.kv_heads, 1),
                         causal_blocks=causal and q_len == kv_len > 1, qk_norm_scope=model.qk_norm_scope)


def block_collectives(call: AttentionCall, strategy: str, *, backward: bool = False) -> list[Collective]:
    """Collectives of one TwoLevelBlock call (attention then MLP; the block input needs a grad)."""
    out = attention_collectives(call, strategy, backward=backward, input_grad=True)
    return out + mlp_collectives(batch=call.batch, seq=call.q_len, hidden=call.hidden,
                                 tp=call.m * call.n, backward=backward, input_grad=True)


def resolve(call: AttentionCall, strategy: str, element_size: int) -> str:
    """A fixed strategy, or the one "auto" picks (as TwoLevelAttention does)."""
    if strategy == "auto":
        return choose_strategy(call, element_size)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or 'auto', got {strategy!r}")
    return strategy


@dataclass(frozen=True)
class Op:
    """One compute op of a layer on one rank: FLOPs and bytes moved to/from device memory."""

    name: str
    flops: float
    bytes: float

    def time(self, hw) -> float:
        """Roofline time on ``hw``."""
        return max(self.flops / hw.peak_flops, self.bytes / hw.mem_bandwidth)


def attention_ops(model: ModelConfig, call: AttentionCall, strategy: str, eb: int) -> list[Op]:
    """Compute ops of one attention layer on one rank (``eb`` bytes per element)."""
    c, H, d = call, model.hidden, model.head_dim
    t, dl = c.batch * c.q_len, d // c.m
    hl, gl = c.local_heads, c.local_kv_heads
    qkv_out = (hl + 2 * gl) * dl
    scores = c.batch * hl * c.q_len * c.kv_len
    kv_bytes = c.batch * gl * c.kv_len * 2 * dl * eb  # K and V read from the cache / activations
    ops = [Op("qkv_proj", 2 * t * H * qkv_out, (H * qkv_out + t * H + t * qkv_out) * eb)]
    if strategy == "score_allreduce":
        ops += [Op("scores", 2 * scores * dl, (t * hl * dl + scores) * eb + kv_bytes / 2),
                Op("softmax", 5 * scores, 2 * scores * eb),
                Op("pv", 2 * scores * dl, (scores + t * hl * dl) * eb + kv_bytes / 2)]
    else:  # fused attention over gathered full-d q, k and this segment's v
        gathered = (t * hl * d + c.batch * gl * c.kv_len * d + c.batch * gl * c.kv_len * dl + t * hl * dl) * eb
        ops.append(Op("fused_attention", 2 * scores * d + 2 * scores * dl + 5 * scores, gathered))
    ops.append(Op("o_proj", 2 * t * hl * dl * H, (hl * dl * H + t * hl * dl + t * H) * eb))
    return ops


def mlp_ops(model: ModelConfig, tokens: int, tp: int, eb: int) -> list[Op]:
    """Compute ops of one MLP on one rank."""
    H, il = model.hidden, model.intermediate // tp
    n_in = 2 if model.gated else 1
    return [Op("mlp_in", 2 * tokens * H * il * n_in, (n_in * H * il + tokens * H + n_in * tokens * il) * eb),
            Op("mlp_out", 2 * tokens * il * H, (il * H + tokens * il + tokens * H) * eb)]


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one step on one rank of a dp x n x m layout (one data-parallel replica)."""

    n: int
    m: int
    dp: int
    strategy: str
    """strategy used by the attention layers (after "auto")."""
    batch_per_replica: int
    flops: float
    """per rank, whole model, one step."""
    collectives: tuple[Collective, ...]
    """per layer (every layer issues the same)."""
    comm_bytes: int
    """bytes this rank sends per step (all layers)."""
    param_bytes: float
    kv_cache_bytes: float
    """this rank's KV cache after the step."""
    activation_bytes: float
    """largest live activation set of one layer (inference, no stored activations)."""
    compute_time: float
    comm_time: float
    tokens: int
    """tokens produced/processed by the whole layout in the step (all replicas)."""

    @property
    def time(self) -> float:
        """Step time (compute + communication, not overlapped)."""
        return self.compute_time + self.comm_time

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time

    @property
    def memory_bytes(self) -> float:
        return self.param_bytes + self.kv_cache_bytes + self.activation_bytes


def param_bytes(model: ModelConfig, n: int, m: int, eb: int) -> float:
    """Per-rank parameter bytes: sharded attention/MLP, replicated norms and embeddings."""
    h, d, H = model.heads, model.head_dim, model.hidden
    gl = max(model.kv_heads // n, 1)
    attn = H * (h // n) * (d // m) * 2 + H * gl * (d // m) * 2  # W_q, W_o + W_k, W_v
    mlp = (3 if model.gated else 2) * H * model.intermediate // (n * m)
    qk_norm = (h // n + gl) * (d // m) if model.qk_norm_scope == "projection" else 2 * d // m
    norms = 2 * H + (qk_norm if model.qk_norm else 0)
    embed = model.vocab * H * (1 if model.tied_embeddings else 2)
    return (model.layers * (attn + mlp + norms) + embed + H) * eb


def kv_cache_bytes(model: ModelConfig, n: int, batch: int, kv_len: int, m: int, eb: int) -> float:
    """Per-rank KV-cache bytes: (b, g/n, s, d/m) keys and values per layer (KV replicated: g/n -> 1)."""
    return model.layers * batch * max(model.kv_heads // n, 1) * kv_len * 2 * (model.head_dim // m) * eb


def activation_bytes(model: ModelConfig, call: AttentionCall, strategy: str, eb: int) -> float:
    """Largest set of live activations of one layer on one rank (inference)."""
    c, t = call, call.batch * call.q_len
    dl = model.head_dim // c.m
    base = 2 * t * model.hidden  # input and output of the layer
    qkv = t * (c.local_heads + 2 * c.local_kv_heads) * dl
    if strategy == "score_allreduce":
        attn = qkv + 2 * c.batch * c.local_heads * c.q_len * c.kv_len  # scores + probs
    else:
        attn = qkv + (t * c.local_heads + c.batch * c.local_kv_heads * c.kv_len) * model.head_dim
    mlp = (3 if model.gated else 2) * t * model.intermediate // (c.m * c.n)
    return (base + max(attn, mlp)) * eb


def comm_time(collectives: list[Collective], hw, eb: int, m: int, n: int) -> float:
    """Seconds for the collectives of one layer: latency + ring bytes / bus bandwidth of the group.

    Ranks are laid out m fastest, then n, then dp: a group's span (consecutive ranks it covers)
    decides whether it stays inside one node.
    """
    stride = {"m": 1, "tp": 1, "n": m, "kv_rep": m, "dp": m * n}
    total = 0.0
    for col in collectives:
        span = col.ranks * stride.get(col.axis, m * n)
        total += hw.collective_latency + col.bytes_sent(eb) / hw.busbw(span)
    return total


def predict(model: ModelConfig, n: int, m: int, phase: Phase, hw, *, dp: int = 1, strategy: str = "auto",
            element_size: int | None = None) -> Prediction:
    """Predicted cost of one inference step of ``model`` on a dp x n x m layout.

    The global batch ``phase.batch`` is split over the dp replicas (it must divide).

    Example:
        >>> p = predict(model, n=4, m=2, phase=Phase("decode", 8, 4096), hw=H100_SXM)
        >>> p.time, p.comm_bytes, p.kv_cache_bytes
    """
    if phase.batch % dp:
        raise ValueError(f"batch ({phase.batch}) is not divisible by dp={dp}; use a batch that is a multiple of {dp}")
    eb = element_size or hw.dtype_bytes
    b = phase.batch // dp
    call = attention_call(model, n, m, b, phase.q_len, phase.kv_len)
    chosen = resolve(call, strategy, eb)
    cols = block_collectives(call, chosen)
    ops = attention_ops(model, call, chosen, eb) + mlp_ops(model, b * phase.q_len, n * m, eb)
    L = model.layers
    return Prediction(
        n=n, m=m, dp=dp, strategy=chosen, batch_per_replica=b,
        flops=L * sum(o.flops for o in ops), collectives=tuple(cols),
        comm_bytes=L * sum(c.bytes_sent(eb) for c in cols),
        param_bytes=param_bytes(model, n, m, eb),
        kv_cache_bytes=kv_cache_bytes(model, n, b, phase.kv_len, m, eb),
        activation_bytes=activation_bytes(model, call, chosen, eb),
        compute_time=L * sum(o.time(hw) for o in ops),
        comm_time=L * comm_time(cols, hw, eb, m, n),
        tokens=phase.tokens,
    )
