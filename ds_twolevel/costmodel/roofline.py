"""Performance model: FLOPs, bytes, memory and time of a whole model on a layout (roofline)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ds_twolevel.costmodel.traffic import block_collectives, resolve
from ds_twolevel.strategies import registry
from ds_twolevel.strategies.base import AttentionCall, Collective, ModelConfig, Op, comm_time, sum_size  # noqa: F401 (re-exported)

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
                   causal: bool = True, reduce_size: int = 4) -> AttentionCall:
    """The :class:`AttentionCall` of one rank of an (n, m) layout (KV replicated when n > g).

    ``causal``: a decoder's plain causal mask (no padding); a prefill (q_len == kv_len > 1) then
    takes the blocked causal score path. ``reduce_size``: bytes per element of the sums over ranks
    (4: the layers' default ``reduce_dtype=torch.float32``; 0: in the activations' dtype).
    """
    return AttentionCall(batch=batch, q_len=q_len, kv_len=kv_len, hidden=model.hidden, local_heads=model.heads // n,
                         local_kv_heads=max(model.kv_heads // n, 1), head_dim=model.head_dim, n=n, m=m,
                         qk_norm=model.qk_norm, kv_rep=max(n // model.kv_heads, 1),
                         causal_blocks=causal and q_len == kv_len > 1, plain_causal=causal,
                         cached=kv_len - q_len, qk_norm_scope=model.qk_norm_scope, reduce_size=reduce_size)


def attention_ops(model: ModelConfig, call: AttentionCall, strategy: str, eb: int) -> list[Op]:
    """Compute ops of one attention layer on one rank (``eb`` bytes per element): the strategy's own."""
    return registry.get(strategy).ops(model, call, eb)


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
    """strategy used by the attention layers (after "cost_model")."""
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
    """Largest set of live activations of one layer on one rank (inference): the strategy's own count."""
    return registry.get(strategy).activation_bytes(model, call, eb)


def strategy_call(call: AttentionCall, strategy: str, eb: int) -> AttentionCall:
    """``call`` as ``strategy`` sees it: ``eb``-byte elements, and the KV-cache layout the strategy reads
    (a kv_shard request models a cache held by position: its prefill runs seq_rows, its decode kv_shard)."""
    call = dataclasses.replace(call, element_size=eb)
    if registry.canonical(strategy) != registry.AUTO:
        layouts = registry.layouts(registry.get(strategy))
        if call.cache_layout not in layouts:
            call = dataclasses.replace(call, cache_layout=layouts[0])
    return call


def predict(model: ModelConfig, n: int, m: int, phase: Phase, hw, *, dp: int = 1, strategy: str = registry.AUTO,
            element_size: int | None = None, reduce_size: int = 4) -> Prediction:
    """Predicted cost of one inference step of ``model`` on a dp x n x m layout.

    The global batch ``phase.batch`` is split over the dp replicas (it must divide). ``strategy="cost_model"``
    plans as the layer does (the least predicted time on ``hw``, within the memory bound) and also picks
    the KV-cache layout (m > 1): where a strategy of another layout (kv_shard) predicts less time, that is the
    answer (build the cache with that layout: ``TwoLevelCache.for_model(model, layout="kv_shard")``).
    ``reduce_size``: bytes per element of the layers' sums over ranks (4: their default
    ``reduce_dtype=torch.float32``; 0: ``reduce_dtype="input"``, sums in the activations' dtype).

    Example:
        >>> p = predict(model, n=4, m=2, phase=Phase("decode", 8, 4096), hw=H100_SXM)
        >>> p.time, p.comm_bytes, p.kv_cache_bytes
    """
    if phase.batch % dp:
        raise ValueError(f"batch ({phase.batch}) is not divisible by dp={dp}; use a batch that is a multiple of {dp}")
    eb = element_size or hw.dtype_bytes
    strategy = registry.canonical(strategy)
    if strategy != registry.AUTO:
        return _predict(model, n, m, phase, hw, dp, strategy, eb, reduce_size)
    options = [_predict(model, n, m, phase, hw, dp, registry.AUTO, eb, reduce_size)]
    for name in registry.cache_layout_strategies() if m > 1 else ():  # m = 1: no segment axis to hold positions over
        try:
            options.append(_predict(model, n, m, phase, hw, dp, name, eb, reduce_size))
        except ValueError:  # it cannot compute this step (e.g. a prefill-only layout rule)
            continue
    return min(options, key=lambda p: p.time)  # ties: the dimension-layout cache


def _predict(model: ModelConfig, n: int, m: int, phase: Phase, hw, dp: int, strategy: str, eb: int,
             reduce_size: int = 4) -> Prediction:
    """:func:`predict` with one strategy request and one cache layout."""
    b = phase.batch // dp
    call = attention_call(model, n, m, b, phase.q_len, phase.kv_len, reduce_size=reduce_size)
    call = strategy_call(call, strategy, eb)
    chosen = resolve(call, strategy, eb, hw)
    cols, sums = block_collectives(call, chosen), sum_size(call, eb)
    ops = attention_ops(model, call, chosen, eb) + mlp_ops(model, b * phase.q_len, n * m, eb)
    L = model.layers
    return Prediction(
        n=n, m=m, dp=dp, strategy=chosen, batch_per_replica=b,
        flops=L * sum(o.flops for o in ops), collectives=tuple(cols),
        comm_bytes=L * sum(c.bytes_sent(eb, sums) for c in cols),
        param_bytes=param_bytes(model, n, m, eb),
        kv_cache_bytes=kv_cache_bytes(model, n, b, phase.kv_len, m, eb),
        activation_bytes=activation_bytes(model, call, chosen, eb),
        compute_time=L * sum(o.time(hw) for o in ops),
        comm_time=L * comm_time(cols, hw, eb, m, n, sums),
        tokens=phase.tokens,
    )
