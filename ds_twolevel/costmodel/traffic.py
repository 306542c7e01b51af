"""Communication model of the partitioned layers: which collectives a call issues, how big.

The functions here predict, from shapes alone, the exact list of collectives that
:class:`~ds_twolevel.layers.attention.TwoLevelAttention` and :class:`~ds_twolevel.layers.mlp.TwoLevelMLP`
issue; tests check them against what the layers count at run time. The ``"auto"`` strategy
picks the score strategy that moves fewer bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_twolevel.parallel.collectives import ring_bytes

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
