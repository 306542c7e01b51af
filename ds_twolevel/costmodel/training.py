"""Training cost model: per-rank memory and step time of a dp x sp x n x m layout, and its planner.

A layout is dp data-parallel replicas x sp Ulysses sequence ranks x a two-level group of n head groups
x m head-dim segments (dp * sp * n * m devices). Ulysses alone is (dp, sp, 1, 1); two-level alone is
(dp, 1, n, m); both at once is the composition: the n * m ranks of a group hold the same s/sp tokens,
all-to-alls over sp move tokens to heads around attention, two-level attention runs inside.

Per-rank memory (bytes), Psi = parameters of this rank's n * m shard, D = dp * sp (ZeRO's group):

* **weights / gradients / optimizer**: the ZeRO paper's 2 + 2 + 12 bytes per parameter (bf16 weights
  and gradients; fp32 master weights, Adam momentum and variance), each divided by D from ZeRO stage
  3 / 2 / 1 on (stage 0: nothing divided). ZeRO-3 adds ``gathered``: two layers' bf16 weights live at a
  time (the layer computing and the one prefetched), or the embedding or head table when larger.
* **activations**, stored for backward, bf16, fused (flash) attention (no s x s scores), per layer:
  ``2 H`` per residual token (the inputs of the two norms; under sequence parallelism a rank holds
  s / (sp n m) residual tokens, else s / sp) and ``2 H`` per token of the rank's s / sp (the norms'
  outputs as the projections see them: all-gathered along the sequence under sequence parallelism),
  plus per token of the rank's s / sp: q and the attention output (``h d / (n m)`` each), the
  relaid output that enters o_proj when sp > 1 or m > 1 (the all-to-all back), k and v at full head
  width (``seq_rows`` gathers them over m; past Ulysses' KV limit each rank holds a copy:
  ``sp * max(g_n / sp, 1) * d`` each, g_n = max(g / n, 1)), and the MLP's ``2 I / (n m)`` when
  partitioned (gate and up: the partitioned MLP recomputes act(gate) * up, elementwise, in its backward)
  or ``4 I`` when Hugging Face's own MLP runs it (n m = 1: act(gate) and the product stored too);
  ``2 I / (n m)`` ungated. With activation checkpointing only each layer's input is kept (``H`` per residual token)
  plus one layer's full set while it recomputes.
* **loss**: the head's input and the logits: bf16 logits, their fp32 copy for the cross entropy and
  its fp32 gradient (10 bytes per logit). With the vocab-parallel head a rank holds (s / sp) x V / (n m)
  logits; without it s / (sp n m) x V under sequence parallelism, else (s / sp) x V.

Step time: forward + backward, each op on the roofline (backward 2 x its forward, recompute 1 x more
with checkpointing; causal attention computes half the score rectangle) plus the collectives (latency +
ring bytes / bus bandwidth; not overlapped) plus Adam's pass over the local optimizer state. Ranks are
ordered m fastest, then n, sp, dp: a two-level group stays inside a node when n * m <= 8, Ulysses'
sp group spans sp * n * m ranks. A ring collective whose group spans nodes runs on the NICs of its ranks
in each node (:func:`ring_busbw`); an all-to-all sends the share for peers in its node at the intra-node
and the rest at the per-GPU inter-node bandwidth.

Collectives per layer: two-level's tensor-parallel reduces over n * m on the s / sp tokens (sums in
``reduce_size`` bytes: fp32, the layers' default); with sequence parallelism each all-reduce becomes a
reduce-scatter + all-gather (same bytes). Ulysses' four all-to-alls over sp (q, k, v forward, o back;
KV heads repeated to sp first past g_n, as DeepSpeed's ``UlyssesSPAttentionHF`` does), each with an
all-to-all backward. ``seq_rows``' segment collectives (:mod:`ds_twolevel.strategies.seq_rows`) inside the
group. Per step: ZeRO over D (bf16): stage 0 an all-reduce of the gradients, 1-2 a reduce-scatter of
gradients + all-gather of updated weights, 3 an all-gather of weights in forward and in backward + a
reduce-scatter of gradients. Weights replicated inside the group while tokens are split (norms; the
embedding and head without vocab parallelism) have their gradients all-reduced over n * m. Per forward,
the ranks that split the sequence (sp, or the group's n * m under sequence parallelism) all-gather their
inputs' descriptions and the whole sequence's positions (with the padding mask when there is one), int64.

Pure: no torch, no process group.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ds_twolevel.costmodel.hardware import H100_SXM, HardwareProfile
from ds_twolevel.costmodel.roofline import ModelConfig, param_bytes
from ds_twolevel.costmodel.traffic import attention_collectives
from ds_twolevel.strategies.base import AttentionCall, Collective, Op

ZERO_STAGES = (0, 1, 2, 3)
ADAM_BYTES = 12
"""fp32 master weights, Adam momentum and variance, per parameter."""
LOGIT_BYTES = 10
"""bf16 logits + their fp32 copy for the cross entropy + its fp32 gradient, per logit."""
INNER_STRATEGY = "seq_rows"
"""two-level attention inside a group when m > 1 (the fused, exact training path)."""
SHARD_FIELDS = 7
"""integers each rank describes its shard with before the first collective whose shape depends on it
(``hf_integration.sequence_parallel.BATCH_FIELDS``: batch size, tokens, mask, ..., label tokens)."""
INDEX_TAGS = ("batch", "positions")
"""the all-gathers of integer inputs (shard descriptions; positions and padding mask)."""
INDEX_SIZE = 8
"""bytes per element of those integers (int64)."""
SUM_AXES = ("tp", "m", "n", "kv_rep")
"""axes whose sums run in the two-level layers' ``reduce_size``."""


@dataclass(frozen=True)
class TrainLayout:
    """dp data-parallel x sp Ulysses sequence ranks x n head groups x m head-dim segments.

    Example:
        >>> TrainLayout(1, 4, 2, 2).label
        'Ulysses sp=4 x two-level 2x2'
    """

    dp: int
    sp: int
    n: int
    m: int

    @property
    def tp(self) -> int:
        """Ranks of a two-level group (n * m)."""
        return self.n * self.m

    @property
    def devices(self) -> int:
        return self.dp * self.sp * self.n * self.m

    @property
    def family(self) -> str:
        """"Ulysses" (n = m = 1, sp > 1), "two-level" (sp = 1, n * m > 1), "composed" or "data parallel"."""
        if self.tp == 1:
            return "Ulysses" if self.sp > 1 else "data parallel"
        return "two-level" if self.sp == 1 else "composed"

    @property
    def label(self) -> str:
        parts = ([f"Ulysses sp={self.sp}"] if self.sp > 1 else []) + (
            [f"two-level {self.n}x{self.m}"] if self.tp > 1 else [])
        name = " x ".join(parts) or "data parallel"
        return name + (f" (dp={self.dp})" if self.dp > 1 and parts else f" dp={self.dp}" if not parts else "")


@dataclass(frozen=True)
class TrainSetup:
    """What one training step does: the global batch, its sequence length and the memory savers.

    Example:
        >>> TrainSetup(batch=1, seq=131072, zero=3).tokens
        131072
    """

    batch: int
    """global batch (sequences), split over dp."""
    seq: int
    """tokens per sequence."""
    zero: int = 3
    """ZeRO stage (0-3), sharding over the dp * sp ranks that hold the same n * m shard."""
    checkpointing: bool = True
    """activation checkpointing of every layer (its input kept, the rest recomputed in backward)."""
    sequence_parallel: bool = True
    """two-level's residual stream split over the group's n * m ranks between sublayers."""
    vocab_parallel: bool = True
    """embedding, LM head and cross entropy split over the group's n * m ranks by vocabulary rows."""
    element_size: int = 2
    """bytes per element of weights and activations (bf16)."""
    reduce_size: int = 4
    """bytes per element of the two-level layers' sums over ranks (their default fp32 ``reduce_dtype``)."""
    padding_mask: bool = False
    """the batch carries a padding mask: attention runs the masked path (no causal-block skipping), and the
    mask is all-gathered with the positions."""

    def __post_init__(self) -> None:
        if self.zero not in ZERO_STAGES:
            raise ValueError(f"zero stage must be one of {ZERO_STAGES}, got {self.zero}")
        if self.batch < 1 or self.seq < 1:
            raise ValueError(f"batch ({self.batch}) and seq ({self.seq}) must be >= 1")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-rank bytes of one training step, by kind (see the module docstring)."""

    weights: float
    gathered: float
    """ZeRO-3's gathered working weights (0 below stage 3)."""
    gradients: float
    optimizer: float
    activations: float
    loss: float
    """the head's input and the logits (with their fp32 copy and gradient)."""

    @property
    def total(self) -> float:
        return self.weights + self.gathered + self.gradients + self.optimizer + self.activations + self.loss


@dataclass(frozen=True)
class TrainPrediction:
    """Predicted cost of one training step on one rank of a dp x sp x n x m layout."""

    layout: TrainLayout
    memory: MemoryBreakdown
    flops: float
    """per rank, forward + backward (+ recompute), whole model."""
    compute_time: float
    comm_time: float
    optimizer_time: float
    comm_bytes: float
    """bytes this rank sends per step."""
    bytes_by_axis: dict[str, float]
    """comm_bytes split by where they go: "tp" (n * m reduces), "sp" (Ulysses), "m" (segments), "zero"."""
    tokens: int

    @property
    def time(self) -> float:
        """Step time (compute + communication + optimizer, not overlapped)."""
        return self.compute_time + self.comm_time + self.optimizer_time

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time


# -- layouts and their rules --------------------------------------------------------------------------
def layouts(devices: int) -> list[TrainLayout]:
    """Every (dp, sp, n, m) whose product is ``devices``."""
    divs = [k for k in range(1, devices + 1) if devices % k == 0]
    return [TrainLayout(dp, sp, n, devices // (dp * sp * n)) for dp in divs for sp in divs for n in divs
            if devices % (dp * sp * n) == 0]


def kv_heads_per_group(model: ModelConfig, n: int) -> int:
    """g_n: KV heads a head group holds (1, a replicated head, when n > g)."""
    return max(model.kv_heads // n, 1)


def layout_problem(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> str:
    """Why ``layout`` cannot train ``model`` on ``setup`` ('' when it can): the partition rules,
    Ulysses' rules on the group's heads, and the shapes that must divide."""
    from ds_twolevel.sharding.partition import head_problem, segment_problem

    dp, sp, n, m = layout.dp, layout.sp, layout.n, layout.m
    spec = model.spec()
    problem = head_problem(spec, n, kv_replication=True) or segment_problem(spec, m)
    if problem:
        return problem
    if (model.heads // n) % sp:
        return (f"Ulysses needs the group's {model.heads // n} query heads (h/n = {model.heads}/{n}) divisible by "
                f"sp={sp}" if n > 1 else f"Ulysses needs num_heads ({model.heads}) divisible by sp={sp}")
    g_n = kv_heads_per_group(model, n)
    if g_n % sp and sp % g_n:
        return f"Ulysses needs the group's {g_n} KV heads and sp={sp} to divide one another"
    if model.intermediate % layout.tp:
        return f"intermediate_size ({model.intermediate}) is not divisible by n*m={layout.tp}"
    if setup.vocab_parallel and model.vocab % layout.tp:
        return f"vocab ({model.vocab}) is not divisible by n*m={layout.tp} (pad it, or no vocab_parallel)"
    if setup.batch % dp:
        return f"batch ({setup.batch}) is not divisible by dp={dp}"
    split = sp * (layout.tp if setup.sequence_parallel else 1)
    if setup.seq % split:
        return f"seq ({setup.seq}) is not divisible by the {split} ranks that split it (pad it)"
    return ""


# -- memory -----------------------------------------------------------------------------------------
def shard_parameters(model: ModelConfig, n: int, m: int, vocab_parallel: bool) -> tuple[float, float, float]:
    """(all, one layer, embedding + head) parameters of one rank's n x m shard, before ZeRO.

    Example:
        >>> shard_parameters(ModelConfig("t", 64, 4, 2, 16, 128, 2, vocab=100), 2, 1, True)
        (43584.0, 18560.0, 6400.0)
    """
    body = dataclasses.replace(model, vocab=0)
    layers_and_final_norm = param_bytes(body, n, m, 1)
    one_layer = (layers_and_final_norm - model.hidden) / model.layers
    embed = model.vocab * model.hidden * (1 if model.tied_embeddings else 2) / (n * m if vocab_parallel else 1)
    return layers_and_final_norm + embed, one_layer, embed


def token_counts(layout: TrainLayout, setup: TrainSetup) -> tuple[float, float]:
    """(residual tokens, sequence tokens) per rank: s/sp of each of its b/dp sequences, the residual
    stream further split over n * m under sequence parallelism."""
    seq_tokens = setup.batch // layout.dp * setup.seq / layout.sp
    return seq_tokens / (layout.tp if setup.sequence_parallel else 1), seq_tokens


def layer_activation_elements(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> float:
    """Elements one layer stores for its backward on one rank (see the module docstring)."""
    resid, tokens = token_counts(layout, setup)
    n, m, sp, d = layout.n, layout.m, layout.sp, model.head_dim
    q = model.heads * d / (n * m)  # per token: h/n heads x d/m
    kv_full = sp * max(kv_heads_per_group(model, n) // sp, 1) * d  # k (or v) at full width, per token
    relaid = q if sp > 1 or m > 1 else 0.0
    stored = (2 if layout.tp > 1 else 4) if model.gated else 2  # GatedDownProj keeps gate and up only
    mlp = stored * model.intermediate / layout.tp
    return 2 * model.hidden * resid + tokens * (2 * model.hidden + 2 * q + relaid + 2 * kv_full + mlp)


def loss_elements(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> tuple[float, float]:
    """(head input elements, logits) on one rank."""
    resid, tokens = token_counts(layout, setup)
    if setup.vocab_parallel:
        return tokens * model.hidden, tokens * model.vocab / layout.tp
    return resid * model.hidden, resid * model.vocab


def memory(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> MemoryBreakdown:
    """Per-rank memory of one training step, broken down (see the module docstring).

    Example:
        >>> memory(PRESETS["llama-3-8b"], TrainLayout(1, 16, 1, 1), TrainSetup(1, 131072)).total / 1e9
    """
    eb, D = setup.element_size, layout.dp * layout.sp
    params, layer, embed = shard_parameters(model, layout.n, layout.m, setup.vocab_parallel)
    per = lambda stage: D if setup.zero >= stage else 1
    table = embed / (1 if model.tied_embeddings else 2)  # the embedding or the head, gathered one at a time
    gathered = max(2 * layer, table) * eb if setup.zero == 3 else 0.0
    per_layer = layer_activation_elements(model, layout, setup)
    resid, _ = token_counts(layout, setup)
    kept = model.layers * resid * model.hidden + per_layer if setup.checkpointing else model.layers * per_layer
    head_in, logits = loss_elements(model, layout, setup)
    return MemoryBreakdown(weights=2 * params / per(3), gathered=gathered, gradients=2 * params / per(2),
                           optimizer=ADAM_BYTES * params / per(1), activations=kept * eb,
                           loss=head_in * eb + logits * LOGIT_BYTES)


# -- collectives ------------------------------------------------------------------------------------
def inner_call(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> AttentionCall:
    """The two-level attention call of one rank after Ulysses' all-to-all: the full sequence on
    (h/n)/sp query heads and max(g_n/sp, 1) KV heads, d/m dims each."""
    b = setup.batch // layout.dp
    return AttentionCall(batch=b, q_len=setup.seq, kv_len=setup.seq, hidden=model.hidden,
                         local_heads=model.heads // layout.n // layout.sp,
                         local_kv_heads=max(kv_heads_per_group(model, layout.n) // layout.sp, 1),
                         head_dim=model.head_dim, n=layout.n, m=layout.m, qk_norm=model.qk_norm,
                         kv_rep=max(layout.n // model.kv_heads, 1), causal_blocks=not setup.padding_mask,
                         plain_causal=not setup.padding_mask,
                         qk_norm_scope=model.qk_norm_scope, grad=True, element_size=setup.element_size,
                         reduce_size=setup.reduce_size)


def _tp_pair(tag: str, numel: float, tp: int, sequence_parallel: bool) -> list[Collective]:
    """A row-parallel exit and its column-parallel entry's backward over the group: all-reduce each, or
    under sequence parallelism reduce-scatter (exit) / all-gather (entry), forward and backward."""
    numel = int(numel)
    if tp == 1:
        return []
    if not sequence_parallel:
        return [Collective("all_reduce", "tp", f"{tag}_out", numel, tp),
                Collective("all_reduce", "tp", f"{tag}_in", numel, tp, True)]
    return [Collective("all_gather", "tp", f"{tag}_in", numel, tp),
            Collective("reduce_scatter", "tp", f"{tag}_out", numel, tp),
            Collective("all_gather", "tp", f"{tag}_out", numel, tp, True),
            Collective("reduce_scatter", "tp", f"{tag}_in", numel, tp, True)]


def ulysses_collectives(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> list[Collective]:
    """Ulysses' all-to-alls of one layer over sp (q, k, v, o; each forward and backward). A rank's k and
    v hold max(g_n, sp) heads when sent (repeated up to sp past Ulysses' KV limit)."""
    sp, n, m = layout.sp, layout.n, layout.m
    if sp == 1:
        return []
    _, tokens = token_counts(layout, setup)
    dl = model.head_dim // m
    q = int(tokens * model.heads // n * dl)
    kv = int(tokens * max(kv_heads_per_group(model, n), sp) * dl)
    fwd = [Collective("all_to_all", "sp", "q", q, sp), Collective("all_to_all", "sp", "k", kv, sp),
           Collective("all_to_all", "sp", "v", kv, sp), Collective("all_to_all", "sp", "o", q, sp)]
    return fwd + [dataclasses.replace(c, backward=True) for c in fwd]


def layer_collectives(model: ModelConfig, layout: TrainLayout, setup: TrainSetup, *,
                      strategy: str = INNER_STRATEGY) -> list[Collective]:
    """Every collective one layer issues on one rank in forward and backward (recompute not included);
    ``strategy``: the two-level attention that runs inside the group."""
    _, tokens = token_counts(layout, setup)
    inner = [c for c in attention_collectives(inner_call(model, layout, setup), strategy, backward=True)
             if c.axis != "tp" or c.tag.endswith("_sumsq")]
    out = ulysses_collectives(model, layout, setup) + inner
    out += _tp_pair("attn", tokens * model.hidden, layout.tp, setup.sequence_parallel)
    out += _tp_pair("mlp", tokens * model.hidden, layout.tp, setup.sequence_parallel)
    if setup.sequence_parallel and layout.tp > 1:  # norm weights see only this rank's tokens
        out.append(Collective("all_reduce", "tp", "norm_weights", 2 * model.hidden, layout.tp, True))
    return out


def head_collectives(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> list[Collective]:
    """The embedding's, head's and loss's collectives over the group per step (forward and backward)."""
    tp, (_, tokens) = layout.tp, token_counts(layout, setup)
    if tp == 1:
        return []
    if not setup.vocab_parallel:
        if not setup.sequence_parallel:
            return []  # every rank computes every token against the whole table: identical gradients
        table = model.vocab * model.hidden * (1 if model.tied_embeddings else 2)
        return [Collective("all_reduce", "tp", "embed_head_grad", table, tp, True)]
    numel = int(tokens * model.hidden)
    embed = ([Collective("reduce_scatter", "tp", "embed_out", numel, tp),
              Collective("all_gather", "tp", "embed_out", numel, tp, True)] if setup.sequence_parallel
             else [Collective("all_reduce", "tp", "embed_out", numel, tp)])
    head = _tp_pair("head", numel, tp, setup.sequence_parallel)
    head = [c for c in head if c.tag == "head_in"]  # the head is column-parallel: an entry, no exit
    loss = [Collective("all_reduce", "tp", "loss_stats", int(3 * tokens), tp)]  # max, target logit, sum exp
    return embed + head + loss


def input_collectives(layout: TrainLayout, setup: TrainSetup) -> list[Collective]:
    """The per-forward all-gathers of the inputs over the ranks that split the sequence (sp under Ulysses, the
    group's n * m under sequence parallelism): each rank's shard description (tag "batch") and the whole
    sequence's positions, stacked with the padding mask when there is one (tag "positions"); int64, no backward.

    Example:
        >>> [c.numel for c in input_collectives(TrainLayout(1, 2, 1, 2), TrainSetup(2, 14, padding_mask=True))]
        [14, 56]
    """
    ranks = layout.sp if layout.sp > 1 else layout.tp if setup.sequence_parallel else 1
    if ranks == 1:
        return []
    axis, rows = "sp" if layout.sp > 1 else "tp", 2 if setup.padding_mask else 1
    return [Collective("all_gather", axis, "batch", SHARD_FIELDS * ranks, ranks),
            Collective("all_gather", axis, "positions", rows * setup.batch // layout.dp * setup.seq, ranks)]


def zero_collectives(params: float, layout: TrainLayout, setup: TrainSetup) -> list[Collective]:
    """ZeRO's collectives per step over the dp * sp ranks holding the same shard of ``params``."""
    D, numel = layout.dp * layout.sp, int(params)
    if D == 1:
        return []
    if setup.zero == 0:
        return [Collective("all_reduce", "zero", "grads", numel, D, True)]
    grads = Collective("reduce_scatter", "zero", "grads", numel, D, True)
    if setup.zero < 3:
        return [grads, Collective("all_gather", "zero", "weights", numel, D, True)]
    return [Collective("all_gather", "zero", "weights", numel, D),
            Collective("all_gather", "zero", "weights", numel, D, True), grads]


def step_collectives(model: ModelConfig, layout: TrainLayout, setup: TrainSetup, *,
                     strategy: str = INNER_STRATEGY) -> list[Collective]:
    """Every collective of one step on one rank: the inputs' all-gathers, L layers (forward twice with
    checkpointing), the head, ZeRO; ``strategy``: the two-level attention inside the group.

    Example:
        >>> cols = step_collectives(PRESETS["llama-3-8b"], TrainLayout(2, 2, 1, 2), TrainSetup(4, 8192, zero=2))
    """
    per_layer = layer_collectives(model, layout, setup, strategy=strategy)
    recompute = [c for c in per_layer if not c.backward] if setup.checkpointing else []
    params, _, _ = shard_parameters(model, layout.n, layout.m, setup.vocab_parallel)
    return (input_collectives(layout, setup) + (per_layer + recompute) * model.layers
            + head_collectives(model, layout, setup) + zero_collectives(params, layout, setup))


def collective_bytes(c: Collective, eb: int, sum_size: int) -> int:
    """Ring bytes one rank sends for ``c``: integer inputs at :data:`INDEX_SIZE` per element, the group's sums
    (over :data:`SUM_AXES`) at ``sum_size``, everything else (Ulysses' all-to-alls, ZeRO) at ``eb``.

    Example:
        >>> collective_bytes(Collective("all_reduce", "tp", "attn_out", 1024, 2), 2, 4)
        4096
    """
    if c.tag in INDEX_TAGS:
        return c.bytes_sent(INDEX_SIZE)
    return c.bytes_sent(eb, sum_size if c.axis in SUM_AXES else eb)


def _span_stride(axis: str, layout: TrainLayout) -> int:
    """Rank stride of an axis's group (m fastest, then n, sp, dp)."""
    return {"m": 1, "tp": 1, "n": layout.m, "kv_rep": layout.m, "sp": layout.tp, "zero": layout.tp}[axis]


def ring_busbw(ranks: int, stride: int, hw: HardwareProfile) -> float:
    """Bus bandwidth of a ring collective over ``ranks`` ranks ``stride`` apart.

    Inside a node: the intra-node bus bandwidth. Across nodes NCCL runs one ring per NIC, so a group
    with k ranks per node crosses nodes on k NICs at once: min(intra-node, k x the per-GPU inter-node
    bus bandwidth). This is a modelling assumption (one NIC per GPU, as on DGX H100).
    """
    if ranks * stride <= hw.devices_per_node:
        return hw.intra_node_busbw
    per_node = max(1, min(ranks, hw.devices_per_node // stride))
    return min(hw.intra_node_busbw, per_node * hw.inter_node_busbw)


def collective_time(c: Collective, layout: TrainLayout, hw: HardwareProfile, eb: int, sum_size: int) -> float:
    """Latency + bytes / bandwidth of one collective on ``hw``: a ring at :func:`ring_busbw`; an
    all-to-all sends the share for peers in its node at the intra-node bandwidth and the rest through
    this rank's NIC at the inter-node bandwidth."""
    stride = _span_stride(c.axis, layout)
    sent = collective_bytes(c, eb, sum_size)
    if c.op != "all_to_all" or c.ranks * stride <= hw.devices_per_node:
        return hw.collective_latency + sent / ring_busbw(c.ranks, stride, hw)
    local = max(1, min(c.ranks, hw.devices_per_node // stride))  # peers (self included) in this node
    share_in = (local - 1) / (c.ranks - 1)
    return hw.collective_latency + sent * share_in / hw.intra_node_busbw + sent * (1 - share_in) / hw.inter_node_busbw


# -- compute ----------------------------------------------------------------------------------------
def layer_ops(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> list[Op]:
    """Forward compute ops of one layer on one rank; causal attention on half the score rectangle."""
    eb, H, d = setup.element_size, model.hidden, model.head_dim
    _, t = token_counts(layout, setup)
    q = model.heads // layout.n * d // layout.m
    kv = kv_heads_per_group(model, layout.n) * d // layout.m
    call = inner_call(model, layout, setup)
    keys = call.batch * setup.seq  # the full sequence after Ulysses' all-to-all
    scores = keys * setup.seq / 2 * call.local_heads / layout.m  # this rank's rows (1/m of them), causal half
    att_bytes = (2 * t * q + 2 * keys * call.local_kv_heads * d) * eb
    il = model.intermediate // layout.tp
    n_in = 2 if model.gated else 1
    return [Op("qkv_proj", 2 * t * H * (q + 2 * kv), (H * (q + 2 * kv) + t * H + t * (q + 2 * kv)) * eb),
            Op("attention", 4 * scores * d + 5 * scores, att_bytes),
            Op("o_proj", 2 * t * q * H, (q * H + t * q + t * H) * eb),
            Op("mlp_in", 2 * t * H * il * n_in, (n_in * H * il + t * H + n_in * t * il) * eb),
            Op("mlp_out", 2 * t * il * H, (il * H + t * il + t * H) * eb)]


def head_op(model: ModelConfig, layout: TrainLayout, setup: TrainSetup) -> Op:
    """The LM head's forward on one rank (its logits)."""
    head_in, logits = loss_elements(model, layout, setup)
    tokens = head_in / model.hidden
    vocab = logits / tokens
    return Op("lm_head", 2 * tokens * model.hidden * vocab,
              (model.hidden * vocab + head_in) * setup.element_size + logits * LOGIT_BYTES)


# -- one layout -------------------------------------------------------------------------------------
def predict_train(model: ModelConfig, layout: TrainLayout, setup: TrainSetup,
                  hw: HardwareProfile = H100_SXM) -> TrainPrediction:
    """Predicted memory, traffic and time of one training step of ``model`` on ``layout``.

    Example:
        >>> p = predict_train(PRESETS["llama-3-8b"], TrainLayout(1, 16, 1, 1), TrainSetup(1, 131072))
        >>> p.time, p.comm_bytes, p.memory.total
    """
    problem = layout_problem(model, layout, setup)
    if problem:
        raise ValueError(f"{layout.label} cannot train {model.name}: {problem}")
    eb = setup.element_size
    sums = max(eb, setup.reduce_size) if setup.reduce_size else eb
    passes = 3 + (1 if setup.checkpointing else 0)  # forward, backward (2x), recompute
    ops, head = layer_ops(model, layout, setup), head_op(model, layout, setup)
    compute = model.layers * passes * sum(o.time(hw) for o in ops) + 3 * head.time(hw)
    flops = model.layers * passes * sum(o.flops for o in ops) + 3 * head.flops
    cols = step_collectives(model, layout, setup)
    by_axis: dict[str, float] = {}
    for c in cols:
        axis = "tp" if c.axis in ("tp", "n", "kv_rep") else c.axis
        by_axis[axis] = by_axis.get(axis, 0.0) + collective_bytes(c, eb, sums)
    mem = memory(model, layout, setup)
    updated = mem.optimizer / ADAM_BYTES  # parameters this rank's optimizer updates
    adam = updated * (ADAM_BYTES + 2 * eb) * 2 / hw.mem_bandwidth  # state, gradient, weight: read + write
    return TrainPrediction(layout=layout, memory=mem, flops=flops, compute_time=compute,
                           comm_time=sum(collective_time(c, layout, hw, eb, sums) for c in cols),
                           optimizer_time=adam, comm_bytes=sum(by_axis.values()), bytes_by_axis=by_axis,
                           tokens=setup.tokens)
