"""Communication model of the partitioned layers: which collectives a call issues, how big.

The functions here predict, from shapes alone, the exact list of collectives that
:class:`~ds_twolevel.layers.attention.TwoLevelAttention` and :class:`~ds_twolevel.layers.mlp.TwoLevelMLP`
issue; tests check them against what the layers count at run time. A strategy's own collectives come
from its registry entry (:mod:`ds_twolevel.strategies.registry`); this module adds the frame every
strategy shares (q/k-norm sums of squares, the output and input-gradient all-reduces, the gradient sums
of replicated weights) and the backward of each collective.
"""
from __future__ import annotations

import dataclasses

from ds_twolevel.strategies import registry
from ds_twolevel.strategies.base import AttentionCall, Collective
from ds_twolevel.strategies.causal_blocks import block_owner as causal_block_owner
from ds_twolevel.strategies.causal_blocks import block_rows as causal_block_rows
from ds_twolevel.strategies.causal_blocks import scores_numel as causal_block_numel
from ds_twolevel.strategies.score_allreduce import split_softmax, values_gathered

__all__ = ["AttentionCall", "Collective", "attention_collectives", "block_collectives", "causal_block_numel",
           "causal_block_owner", "causal_block_rows", "choose_strategy", "mlp_collectives", "replicated_grad_collectives", "resolve",
           "score_strategy_collectives", "split_softmax", "values_gathered"]

def score_strategy_collectives(call: AttentionCall, strategy: str) -> list[Collective]:
    """Forward collectives over the segment axis of ``strategy``'s attention (its registry entry)."""
    return registry.get(strategy).collectives(call)


def choose_strategy(call: AttentionCall, element_size: int = 4, hw=None) -> str:
    """The strategy "cost_model" picks for this call on ``hw`` (default: the CPU profile, what a layer on
    the CPU uses; :func:`~ds_twolevel.strategies.registry.auto_choice`)."""
    return registry.auto_choice(call, element_size, hw)


def resolve(call: AttentionCall, strategy: str, element_size: int, hw=None) -> str:
    """A fixed strategy, or the one "cost_model" picks on ``hw`` - what the layer runs
    (:func:`~ds_twolevel.strategies.registry.plan_call`)."""
    return registry.plan_call(dataclasses.replace(call, element_size=element_size), strategy, hw).name


_BACKWARD_OF = {"all_reduce": "all_reduce", "all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
                "all_to_all": "all_to_all"}


def attention_collectives(
    call: AttentionCall, strategy: str, *, backward: bool = False, input_grad: bool = True,
    sequence_parallel: bool = False,
) -> list[Collective]:
    """Every collective one TwoLevelAttention call issues (forward, plus backward if asked).

    ``input_grad``: whether the input needs a gradient (the backward input all-reduce).
    ``sequence_parallel``: the layer holds s/(n*m) tokens between sublayers
    (:mod:`ds_twolevel.parallel.sequence`): the input all-gather and output reduce-scatter along s
    replace the output all-reduce (and, backward, the input all-reduce); ``call.q_len`` is the whole
    sequence.
    """
    c = call
    if backward and not getattr(registry.get(strategy), "BACKWARD", True):
        raise ValueError(f"{strategy} is inference only: it has no backward collectives")
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
    stream = c.batch * c.q_len * c.hidden  # elements of the (b, s, H) residual stream
    if sequence_parallel and tp > 1:
        fwd.insert(0, Collective("all_gather", "tp", "attn_in", stream, tp))
    fwd += score_strategy_collectives(c, strategy)
    if tp > 1:
        fwd.append(Collective("reduce_scatter" if sequence_parallel else "all_reduce", "tp", "attn_out", stream, tp))
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
    if sequence_parallel and tp > 1:  # the output's all-gather; the input's reduce-scatter if it needs one
        bwd.insert(0, Collective("all_gather", "tp", "attn_out", stream, tp, True))
        if input_grad:
            bwd.append(Collective("reduce_scatter", "tp", "attn_in", stream, tp, True))
    elif tp > 1 and input_grad:
        bwd.append(Collective("all_reduce", "tp", "attn_in", stream, tp, True))
    return fwd + bwd


def mlp_collectives(
    *, batch: int, seq: int, hidden: int, tp: int, backward: bool = False, input_grad: bool = True,
    sequence_parallel: bool = False,
) -> list[Collective]:
    """Collectives of one TwoLevelMLP call: output all-reduce (+ input-gradient all-reduce); with
    ``sequence_parallel`` (``seq`` the whole sequence), input all-gather and output reduce-scatter
    along s (backward: the output's all-gather, the input's reduce-scatter)."""
    if tp == 1:
        return []
    stream = batch * seq * hidden
    if sequence_parallel:
        out = [Collective("all_gather", "tp", "mlp_in", stream, tp),
               Collective("reduce_scatter", "tp", "mlp_out", stream, tp)]
        if backward:
            out.append(Collective("all_gather", "tp", "mlp_out", stream, tp, True))
            if input_grad:
                out.append(Collective("reduce_scatter", "tp", "mlp_in", stream, tp, True))
        return out
    out = [Collective("all_reduce", "tp", "mlp_out", stream, tp)]
    if backward and input_grad:
        out.append(Collective("all_reduce", "tp", "mlp_in", stream, tp, True))
    return out


def block_collectives(call: AttentionCall, strategy: str, *, backward: bool = False,
                      sequence_parallel: bool = False) -> list[Collective]:
    """Collectives of one TwoLevelBlock call (attention then MLP; the block input needs a grad).
    With ``sequence_parallel`` the block's norms hold replicated weights that see this rank's tokens only:
    their gradients are summed over tp (:func:`replicated_grad_collectives`), counted apart."""
    out = attention_collectives(call, strategy, backward=backward, input_grad=True, sequence_parallel=sequence_parallel)
    return out + mlp_collectives(batch=call.batch, seq=call.q_len, hidden=call.hidden, tp=call.m * call.n,
                                 backward=backward, input_grad=True, sequence_parallel=sequence_parallel)


def replicated_grad_collectives(numels: list[int], tp: int) -> list[Collective]:
    """Backward all-reduces over tp of replicated parameters (norm weights, biases added after the
    reduce-scatter, a replicated embedding / LM head) under sequence parallelism: each rank's gradient
    covers its own tokens, so the ranks of a layer sum them (one per parameter, in elements)."""
    if tp == 1:
        return []
    return [Collective("all_reduce", "tp", "replicated_grad", numel, tp, True) for numel in numels]
