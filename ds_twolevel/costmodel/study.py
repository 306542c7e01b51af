"""Decode against context length: every layout family on one cost model.

For each model, ranks per layer P, batch b and KV-cache length s_kv this module predicts one decode
step (one new token per sequence) of four families, all from the same
:class:`~ds_twolevel.costmodel.Collective` / :class:`~ds_twolevel.costmodel.roofline.Op` records and
the same roofline and bus-bandwidth model as :func:`~ds_twolevel.costmodel.predict`:

* **two-level**: every n x m layout (m > 1) of P with every two-level strategy
  (:func:`two_level_strategies`) and ``auto``, by :func:`~ds_twolevel.costmodel.predict`;
* **head-wise TP + KV replication**: n = P, m = 1 (each KV head copied on P/g ranks when P > g), by
  :func:`~ds_twolevel.costmodel.predict` as the planner does;
* **DeepSpeed AutoTP** at tp = P: q/k/v/o split in whole KV-head groups, so with P > g ranks 0..g-1
  hold h/g query heads and one KV head and the other ranks no attention (their MLP share only; see
  docs/performance.md section 3); the busiest rank sets the step time; two all-reduces over P;
* **Helix** (arXiv 2507.07120): n <= g head groups (tensor parallel over KV heads), and over the
  kvp = P/n ranks of a group the KV cache is sharded by sequence while W_q, W_k, W_v are replicated
  (each rank projects the new token itself, so no all-gather); partial outputs and log-sum-exps are
  combined by one all-to-all over the kvp ranks (the exchange of ``kv_shard``), after which W_o is
  split over all P ranks as in the paper; then the o_proj and MLP all-reduces over P.

Like for like, every family adds its all-reduces in the model's dtype (:data:`REDUCE_SIZE`): AutoTP and
Helix do, and so do this library's layers with ``reduce_dtype="input"``. Their default (fp32 sums) doubles
the bytes of those sums: ``predict`` models it, ``ds-twolevel plan`` shows it.

Pure: no ranks, no torch tensors, nothing from the integration layer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ds_twolevel.costmodel import Collective, ModelConfig, Phase, predict
from ds_twolevel.costmodel.hardware import HardwareProfile
from ds_twolevel.strategies import registry
from ds_twolevel.costmodel.planner import PRESETS, infeasibility, layout_kind
from ds_twolevel.costmodel.roofline import (Op, attention_call, attention_ops, block_collectives, comm_time,
                                            kv_cache_bytes, mlp_ops, param_bytes)

LLAMA_3_70B = PRESETS["llama-3-70b"]
MODELS: dict[str, ModelConfig] = {"llama-3-8b": PRESETS["llama-3-8b"], "llama-3-70b": LLAMA_3_70B}
DEVICES = (16, 32)
BATCHES = (1, 16, 64)
CONTEXTS = tuple(2**k for k in range(12, 18))  # 4K .. 128K
REDUCE_SIZE = 0
"""sums over ranks in the model's dtype for every family (``predict``'s ``reduce_size``)."""
FAMILIES = ("two-level", "head-wise TP + KV replication", "DeepSpeed AutoTP", "Helix")
BASELINE = "qk_allgather"
"""the attention of the head-wise baselines (m = 1: fused attention, no segment collectives)."""
"""The sequence-sharded strategies, listed by :func:`two_level_strategies` once ``predict`` accepts them."""


@dataclass(frozen=True)
class StudyPoint:
    """One layout's modelled decode step on one rank (the busiest one).

    Example:
        >>> p = headwise_point(MODELS["llama-3-8b"], 16, Phase("decode", 64, 4096), H100_SXM)
        >>> p.time, p.traffic_bytes, p.kv_bytes, p.weight_bytes
    """

    family: str
    layout: str
    """"n x m" (two-level, head-wise), "tp=P" (AutoTP) or "n x kvp" (Helix)."""
    strategy: str
    """two-level strategy as asked ("cost_model" keeps its name; ``chosen`` says what it ran)."""
    chosen: str
    time: float
    """seconds per step: compute + communication, not overlapped."""
    compute_time: float
    comm_time: float
    traffic_bytes: float
    """bytes this rank sends per step, all layers."""
    kv_bytes: float
    """this rank's KV cache after the step."""
    weight_bytes: float
    """this rank's parameters (layers, norms, replicated embeddings)."""


def _accepts(strategy: str) -> bool:
    """Whether ``predict`` knows ``strategy`` (at decode or prefill of a tiny two-level call)."""
    model = PRESETS["llama-3-8b"]
    for kind in ("decode", "prefill"):
        try:
            predict(model, 4, 2, Phase(kind, 1, 256), HardwareProfile("probe", 1e12, 1e12, 1e11, 1e10, 8, 1e-5, 8e10),
                    strategy=strategy)
            return True
        except (ValueError, KeyError, NotImplementedError):
            continue
    return False


def two_level_strategies() -> tuple[str, ...]:
    """The two-level strategies the study compares: the cost model's, plus the sequence-sharded ones once predicted.

    The ONE place the study takes them from: every registered strategy ``predict`` accepts.

    Example:
        >>> two_level_strategies()[:2]
        ('score_allreduce', 'qk_allgather')
    """
    return tuple(s for s in registry.names() if _accepts(s))


def _from_prediction(family: str, layout: str, strategy: str, pred) -> StudyPoint:
    return StudyPoint(family, layout, strategy, pred.strategy, pred.time, pred.compute_time, pred.comm_time,
                      pred.comm_bytes, pred.kv_cache_bytes, pred.param_bytes)


def two_level_points(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile,
                     notes: list[str]) -> list[StudyPoint]:
    """Every feasible n x m (m > 1) layout of ``devices`` with every strategy and ``cost_model``.

    A strategy ``predict`` refuses for a point is skipped and a line is added to ``notes``.
    """
    out = []
    for m in (d for d in range(2, devices + 1) if devices % d == 0):
        n = devices // m
        if infeasibility(model, 1, n, m, phase):
            continue
        for strategy in two_level_strategies() + (registry.AUTO,):
            try:
                pred = predict(model, n, m, phase, hw, strategy=strategy, reduce_size=REDUCE_SIZE)
            except (ValueError, KeyError, NotImplementedError) as err:
                notes.append(f"{model.name} {n} x {m} {strategy}: skipped ({str(err).splitlines()[0]})")
                continue
            out.append(_from_prediction("two-level", f"{n} x {m}", strategy, pred))
    return out


def headwise_point(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile) -> StudyPoint | None:
    """Head-wise TP over all ``devices`` (n = P, m = 1; KV heads replicated when P > g), as the planner has it."""
    if infeasibility(model, 1, devices, 1, phase):
        return None
    pred = predict(model, devices, 1, phase, hw, strategy=BASELINE,  # m = 1: no segment collectives
                   reduce_size=REDUCE_SIZE)
    return replace(_from_prediction(FAMILIES[1], f"{devices} x 1", "-", pred), chosen="-")


def _mlp_param_bytes(model: ModelConfig, tp: int, eb: int) -> float:
    """One layer's MLP weights on one of ``tp`` ranks."""
    return (3 if model.gated else 2) * model.hidden * model.intermediate // tp * eb


def _time_and_traffic(ops: list[Op], cols: list[Collective], hw: HardwareProfile, eb: int, m: int, n: int,
                      layers: int) -> tuple[float, float, float]:
    """(compute s, comm s, bytes sent) of a whole step from one layer's ops and collectives."""
    return (layers * sum(o.time(hw) for o in ops), layers * comm_time(cols, hw, eb, m, n),
            layers * sum(c.bytes_sent(eb) for c in cols))


def autotp_point(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile) -> StudyPoint:
    """DeepSpeed AutoTP at tp = ``devices``: attention in whole KV-head groups (busiest rank: n = min(P, g)
    head groups' share), MLP over all P, o_proj and down_proj all-reduced over P."""
    eb, b, L = hw.dtype_bytes, phase.batch, model.layers
    na = min(devices, model.kv_heads)
    attn = attention_call(model, na, 1, b, phase.q_len, phase.kv_len)
    ops = attention_ops(model, attn, BASELINE, eb) + mlp_ops(model, b * phase.q_len, devices, eb)
    cols = block_collectives(attention_call(model, devices, 1, b, phase.q_len, phase.kv_len), BASELINE)
    comp, comm, sent = _time_and_traffic(ops, cols, hw, eb, 1, devices, L)
    weights = param_bytes(model, na, 1, eb) + L * (_mlp_param_bytes(model, devices, eb) - _mlp_param_bytes(model, na, eb))
    return StudyPoint(FAMILIES[2], f"tp={devices}", "-", "-", comp + comm, comp, comm, sent,
                      kv_cache_bytes(model, na, b, phase.kv_len, 1, eb), weights)


def helix_collectives(model: ModelConfig, n: int, kvp: int, batch: int, q_len: int, kv_len: int,
                      eb: int) -> list[Collective]:
    """One Helix layer's decode collectives: the (o, lse) all-to-all over the kvp ranks of a head group
    (each rank sends every other its d_v/kvp columns of the h/n heads' partial output plus one fp32
    log-sum-exp, as ``kv_shard``'s "partial_out"), then the o_proj and MLP all-reduces over all n * kvp."""
    hl, dv = model.heads // n, model.head_dim
    cols = dv // kvp + max(1, 4 // eb)
    combine = Collective("all_to_all", "m", "partial_out", kvp * batch * hl * q_len * cols, kvp)
    frame = block_collectives(attention_call(model, n, kvp, batch, q_len, kv_len), BASELINE)
    return [combine] + [c for c in frame if c.axis == "tp"]


def helix_ops(model: ModelConfig, n: int, kvp: int, batch: int, q_len: int, kv_len: int, eb: int) -> list[Op]:
    """One Helix rank's decode ops: q/k/v projection at full d (replicated weights), fused attention over
    its 1/kvp of the positions, the (o, lse) combine, o_proj on 1/(n kvp) of W_o, the MLP over n kvp."""
    own = -(-kv_len // kvp)
    local = attention_ops(model, attention_call(model, n, 1, batch, q_len, own), "qk_allgather", eb)
    o_proj = [o for o in attention_ops(model, attention_call(model, n, kvp, batch, q_len, kv_len), BASELINE, eb)
              if o.name == "o_proj"]
    t, hl, dv = batch * q_len, model.heads // n, model.head_dim
    combine = Op("combine", 4 * t * hl * dv, 2 * kvp * t * hl * (dv // kvp + 1) * eb)
    return [o for o in local if o.name != "o_proj"] + [combine] + o_proj + mlp_ops(model, t, n * kvp, eb)


def helix_point(model: ModelConfig, n: int, kvp: int, phase: Phase, hw: HardwareProfile) -> StudyPoint:
    """Helix with n head groups (n | g) times kvp sequence shards."""
    eb, b, L = hw.dtype_bytes, phase.batch, model.layers
    ops = helix_ops(model, n, kvp, b, phase.q_len, phase.kv_len, eb)
    cols = helix_collectives(model, n, kvp, b, phase.q_len, phase.kv_len, eb)
    comp, comm, sent = _time_and_traffic(ops, cols, hw, eb, kvp, n, L)
    hl, gl, d = model.heads // n, model.kv_heads // n, model.head_dim
    replicated_qkv = L * model.hidden * (hl + 2 * gl) * (d - d // kvp) * eb  # W_q, W_k, W_v at full d
    return StudyPoint(FAMILIES[3], f"{n} x {kvp}", "-", "-", comp + comm, comp, comm, sent,
                      kv_cache_bytes(model, n, b, -(-phase.kv_len // kvp), 1, eb),
                      param_bytes(model, n, kvp, eb) + replicated_qkv)


def helix_points(model: ModelConfig, devices: int, phase: Phase, hw: HardwareProfile) -> list[StudyPoint]:
    """Every Helix split of ``devices``: n head groups dividing g (and h), kvp = P / n >= 2 shards."""
    return [helix_point(model, n, devices // n, phase, hw) for n in range(1, model.kv_heads + 1)
            if model.kv_heads % n == 0 and model.heads % n == 0 and devices % n == 0 and devices // n >= 2]


def points(model: ModelConfig, devices: int, batch: int, s_kv: int, hw: HardwareProfile,
           notes: list[str] | None = None) -> list[StudyPoint]:
    """Every family's layouts for one decode step of ``batch`` sequences against ``s_kv`` cached positions."""
    phase = Phase("decode", batch, s_kv)
    out = two_level_points(model, devices, phase, hw, notes if notes is not None else [])
    head = headwise_point(model, devices, phase, hw)
    return out + ([head] if head else []) + [autotp_point(model, devices, phase, hw)] + helix_points(
        model, devices, phase, hw)


def best_of(pts: list[StudyPoint], family: str) -> StudyPoint | None:
    """The fastest point of ``family`` (ties: fewer bytes sent, then the layout's name, a fixed strategy
    before ``auto``, which ties with the strategy it chose)."""
    fam = [p for p in pts if p.family == family]
    return min(fam, key=lambda p: (p.time, p.traffic_bytes, p.layout, p.strategy == registry.AUTO, p.strategy)) if fam else None


@dataclass(frozen=True)
class GridCase:
    """The points of one (model, ranks per layer, batch, s_kv) case of the grid."""

    model: str
    devices: int
    batch: int
    s_kv: int
    points: tuple[StudyPoint, ...]

    def best(self, family: str) -> StudyPoint | None:
        return best_of(list(self.points), family)


def grid(hw: HardwareProfile, *, models: dict[str, ModelConfig] = MODELS, devices: tuple[int, ...] = DEVICES,
         batches: tuple[int, ...] = BATCHES, contexts: tuple[int, ...] = CONTEXTS,
         notes: list[str] | None = None) -> list[GridCase]:
    """Every case of the study, in a fixed order (model, devices, batch, s_kv).

    Example:
        >>> cases = grid(H100_SXM)
        >>> cases[0].best("Helix").time
    """
    return [GridCase(name, p, b, s, tuple(points(model, p, b, s, hw, notes)))
            for name, model in models.items() for p in devices for b in batches for s in contexts]


@dataclass(frozen=True)
class Crossover:
    """Where ``family`` overtakes ``other`` as s_kv grows (one model, ranks per layer, batch)."""

    model: str
    devices: int
    batch: int
    family: str
    other: str
    s_kv: int | None
    """the smallest s_kv (to the integer) from which ``family`` is faster up to the grid's end;
    None when it is not faster at the grid's end."""
    at_start: bool
    """``family`` is already faster at the grid's first s_kv."""

    def describe(self, contexts: tuple[int, ...] = CONTEXTS) -> str:
        if self.s_kv is None:
            return f"never up to {contexts[-1]:,}"
        if self.at_start:
            return f"already at {contexts[0]:,}"
        return f"at s_kv = {self.s_kv:,}"


def _margin(model: ModelConfig, devices: int, batch: int, s_kv: int, hw: HardwareProfile, family: str,
            other: str) -> float:
    """other's best time minus family's best (> 0: family is faster); -inf when family has no point."""
    pts = points(model, devices, batch, s_kv, hw)
    a, b = best_of(pts, family), best_of(pts, other)
    if a is None or b is None:
        return float("-inf")
    return b.time - a.time


def crossover(model: ModelConfig, devices: int, batch: int, hw: HardwareProfile, *, family: str = FAMILIES[0],
              other: str = FAMILIES[1], contexts: tuple[int, ...] = CONTEXTS) -> Crossover:
    """The s_kv from which ``family``'s best layout beats ``other``'s up to the last context, bisected
    to the integer between the last grid point where it loses and the next.

    Example:
        >>> crossover(MODELS["llama-3-8b"], 16, 64, H100_SXM).describe()
    """
    wins = [_margin(model, devices, batch, s, hw, family, other) > 0 for s in contexts]
    make = lambda s, start: Crossover(model.name, devices, batch, family, other, s, start)
    if not wins[-1]:
        return make(None, False)
    k = len(wins) - 1
    while k > 0 and wins[k - 1]:
        k -= 1
    if k == 0:
        return make(contexts[0], True)
    lo, hi = contexts[k - 1], contexts[k]  # loses at lo, wins at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _margin(model, devices, batch, mid, hw, family, other) > 0 else (mid, hi)
    return make(hi, False)


def crossovers(hw: HardwareProfile, *, family: str = FAMILIES[0], other: str = FAMILIES[1],
               models: dict[str, ModelConfig] = MODELS, devices: tuple[int, ...] = DEVICES,
               batches: tuple[int, ...] = BATCHES, contexts: tuple[int, ...] = CONTEXTS) -> list[Crossover]:
    """:func:`crossover` for every model, ranks per layer and batch of the grid."""
    return [crossover(model, p, b, hw, family=family, other=other, contexts=contexts)
            for model in models.values() for p in devices for b in batches]


@dataclass(frozen=True)
class HelixGap:
    """The best two-level layout against the best Helix layout at one grid case."""

    model: str
    devices: int
    batch: int
    s_kv: int
    two_level: StudyPoint
    helix: StudyPoint
    layers: int
    latency: float
    """seconds per collective on the profile."""

    @property
    def ratio(self) -> float:
        """two-level's step time / Helix's."""
        return self.two_level.time / self.helix.time

    @property
    def latencies(self) -> float:
        """The gap (two-level minus Helix) in collective latencies per layer: kv_shard issues one collective
        more per layer than Helix (the all-gather of the new token's q/k/v dimension segments, which Helix
        skips by replicating W_q, W_k, W_v over its KV shards)."""
        return (self.two_level.time - self.helix.time) / (self.layers * self.latency)


def helix_gaps(cases: list[GridCase], hw: HardwareProfile, models: dict[str, ModelConfig] = MODELS) -> list[HelixGap]:
    """:class:`HelixGap` of every case of the grid."""
    return [HelixGap(c.model, c.devices, c.batch, c.s_kv, c.best(FAMILIES[0]), c.best(FAMILIES[3]),
                     models[c.model].layers, hw.collective_latency) for c in cases]
