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


def score_strategy_collectives(call: AttentionCall, strategy: str) -> list[Collective]:
    """Forward collectives over the segment axis for the score computation."""
    c, m = call, call.m
    if m == 1:
        return []
    if strategy == "score_allreduce":
        return [Collective("all_reduce", "m", "scores", c.batch * c.local_heads * c.q_len * c.kv_len, m)]
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


_BACKWARD_OF = {"all_reduce": "all_reduce", "all_gather": "reduce_scatter"}


def attention_collectives(
    call: AttentionCall, strategy: str, *, backward: bool = False, input_grad: bool = True
) -> list[Collective]:
    """Every collective one TwoLevelAttention call issues (forward, plus backward if asked).

    ``input_grad``: whether the input needs a gradient (the backward input all-reduce).
    """
    c = call
    tp = c.m * c.n
    fwd: list[Collective] = []
    if c.qk_norm and c.m > 1:
        fwd += [
            Collective("all_reduce", "m", "q_sumsq", c.batch * c.q_len * c.local_heads, c.m),
            Collective("all_reduce", "m", "k_sumsq", c.batch * c.q_len * c.local_kv_heads, c.m),
        ]
    fwd += score_strategy_collectives(c, strategy)
    if tp > 1:
        fwd.append(Collective("all_reduce", "tp", "attn_out", c.batch * c.q_len * c.hidden, tp))
    if not backward:
        return fwd
    bwd = [
        Collective(_BACKWARD_OF[f.op], f.axis, f.tag, f.numel, f.ranks, True)
        for f in fwd if f.axis == "m"
    ]
    if c.qk_norm and c.n > 1:
        dl = c.head_dim // c.m
        bwd += [Collective("all_reduce", "n", "q_norm_weight", dl, c.n, True),
                Collective("all_reduce", "n", "k_norm_weight", dl, c.n, True)]
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
