"""The attention strategies by name, and :func:`plan_call`: the one place that decides which strategy
runs a call - for :class:`~ds_twolevel.layers.attention.TwoLevelAttention` and for the cost model.

A strategy is a module with the interface of :class:`~ds_twolevel.strategies.base.Strategy`. Adding
one is one file plus one :func:`register` line (below, or in your own code); the config, the policy,
the CLI, the cost model, the planner, the bench and the tests iterate :func:`names`.

Optional module attributes read here: ``AUTO`` ("cost_model" may pick it), ``UNIVERSAL`` (it computes
every call with a dimension-layout cache, mask, dropout and gradient included: the parity tests run it
everywhere), ``LAYOUTS`` (KV-cache layouts it reads, default ``("segments",)``), ``PREFILL_ONLY`` (a
request falls back to "cost_model" for decode's single row), ``BACKWARD`` (False: inference only) and
``TIE_RANK`` (lower wins a tie in "cost_model"; default 1). "cost_model" chooses by predicted time on a
hardware profile (:func:`auto_choice`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

from ds_twolevel.strategies import kv_shard, qk_allgather, score_allreduce, seq_rows
from ds_twolevel.strategies.base import AttentionCall, Strategy, comm_time, sum_size

AUTO = "cost_model"
"""the chooser: per call, the strategy with the least predicted time on a hardware profile."""
_ALIASES = {"auto": AUTO}
"""older spellings ``strategy=`` still takes from Python (not in :func:`choices`)."""
_REGISTRY: dict[str, ModuleType] = {}


def register(strategy: ModuleType | Strategy, *, replace: bool = False) -> None:
    """Add a strategy module under its ``NAME``."""
    name = strategy.NAME
    if name == AUTO or name in _ALIASES or (name in _REGISTRY and not replace):
        raise ValueError(f"strategy {name!r} is already registered (or reserved); pass replace=True to swap it")
    _REGISTRY[name] = strategy


def unregister(name: str) -> None:
    """Remove a strategy (tests that register a toy one)."""
    _REGISTRY.pop(name, None)


@contextlib.contextmanager
def registered(strategy: ModuleType | Strategy) -> Iterator[None]:
    """Register ``strategy`` for the duration of a ``with`` block (tests, experiments)."""
    register(strategy)
    try:
        yield
    finally:
        unregister(strategy.NAME)


def names() -> tuple[str, ...]:
    """Every registered strategy, in registration order."""
    return tuple(_REGISTRY)


def universal() -> tuple[str, ...]:
    """The strategies that compute every call with a dimension-layout cache (``UNIVERSAL``)."""
    return tuple(n for n, s in _REGISTRY.items() if getattr(s, "UNIVERSAL", False))


def choices() -> tuple[str, ...]:
    """What ``strategy=`` accepts: "cost_model" and every registered name."""
    return (AUTO, *_REGISTRY)


def get(name: str) -> ModuleType:
    """The strategy registered as ``name`` (ValueError naming the choices otherwise)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"strategy must be one of {choices()}, got {name!r}") from None


def canonical(name: str) -> str:
    """``name`` with an older spelling ("auto") replaced by its name ("cost_model")."""
    return _ALIASES.get(name, name) if isinstance(name, str) else name


def check_name(name: str) -> str:
    """``name`` (canonical) if it is "cost_model" or a registered strategy, else a ValueError naming the choices."""
    name = canonical(name)
    if name != AUTO:
        get(name)
    return name


def layer_choices() -> tuple[str, ...]:
    """What a layer's (or patch_model's) ``strategy=`` accepts: "cost_model" and every strategy that reads a
    dimension-layout cache (a strategy of another cache layout is chosen by the cache itself)."""
    return (AUTO, *(n for n, s in _REGISTRY.items() if "segments" in layouts(s)))


def check_layer_strategy(name: str) -> str:
    """``name`` (canonical) if a layer may default to it (see :func:`layer_choices`), else ValueError naming them."""
    name = check_name(name)
    if name not in layer_choices():
        raise ValueError(f"strategy {name!r} is chosen by the KV cache (a cache built with layout="
                         f"{layouts(_REGISTRY[name])[0]!r}), not set on the layer; the layer's strategy must be "
                         f"one of {layer_choices()}")
    return name


def cache_layout_strategies() -> tuple[str, ...]:
    """The strategies that read only a KV cache of another layout than the dimension split (kv_shard):
    the cache, not "cost_model", selects them at run time; "cost_model" weighs them too."""
    return tuple(n for n, s in _REGISTRY.items() if "segments" not in layouts(s))


def layouts(strategy: ModuleType) -> tuple[str, ...]:
    return getattr(strategy, "LAYOUTS", ("segments",))


@dataclass(frozen=True)
class Plan:
    """The strategy that runs one call."""

    name: str
    strategy: ModuleType


def bytes_sent(call: AttentionCall, name: str, element_size: int) -> int:
    """Forward bytes the strategy's own collectives send for ``call``."""
    return sum(col.bytes_sent(element_size, sum_size(call, element_size)) for col in get(name).collectives(call))


@dataclass(frozen=True)
class _AttentionShapes:
    """What a strategy's ``ops``/``activation_bytes`` read of the model when only the attention is
    compared (no MLP: the same for every strategy)."""

    hidden: int
    head_dim: int
    gated: bool = False
    intermediate: int = 0


def _shapes(call: AttentionCall) -> _AttentionShapes:
    return _AttentionShapes(hidden=call.hidden, head_dim=call.head_dim)


def _hardware(hw):
    if hw is None:  # lazy: the cost model imports this module
        from ds_twolevel.costmodel.hardware import default_profile

        return default_profile()
    return hw


def predicted_time(call: AttentionCall, name: str, hw=None, element_size: int | None = None) -> float:
    """Predicted seconds of the strategy's part of one call on ``hw`` (default: the CPU profile): its
    compute ops (roofline) plus its own collectives (latency + bytes / bus bandwidth). The frame every
    strategy shares (the output all-reduce, q/k-norm sums) is left out: it does not change the choice."""
    hw, eb = _hardware(hw), call.element_size if element_size is None else element_size
    strategy = get(name)
    compute = sum(op.time(hw) for op in strategy.ops(_shapes(call), call, eb))
    return compute + comm_time(strategy.collectives(call), hw, eb, call.m, call.n, sum_size(call, eb))


def predicted_activation(call: AttentionCall, name: str, element_size: int | None = None) -> float:
    """Predicted largest live activation set (bytes) of the strategy's attention for ``call``."""
    eb = call.element_size if element_size is None else element_size
    return get(name).activation_bytes(_shapes(call), call, eb)


MEMORY_FACTOR = 2.0
""""cost_model" leaves out a strategy whose predicted activations exceed the leanest able one's (a fused path)
by more than this factor; a user who names the strategy still gets it."""


def candidates(call: AttentionCall) -> list[str]:
    """The ``AUTO`` strategies that read the call's cache layout and can compute it."""
    return [n for n, s in _REGISTRY.items()
            if getattr(s, "AUTO", False) and call.cache_layout in layouts(s) and s.why_not(call) is None]


def auto_choice(call: AttentionCall, element_size: int | None = None, hw=None) -> str:
    """"cost_model": of the ``AUTO`` strategies that can compute the call and whose predicted activations stay
    within :data:`MEMORY_FACTOR` of the leanest one's, the one with the least predicted time on ``hw``
    (default: the CPU profile; the layer passes its device's). Ties: the lower ``TIE_RANK``, then
    registration order. Every rank decides alike: the choice reads shapes and the profile only."""
    eb = call.element_size if element_size is None else element_size
    able = candidates(call)
    if not able:
        raise ValueError(f"no strategy can compute this call: {call}")
    memory = {n: predicted_activation(call, n, eb) for n in able}
    lean = min(memory.values())
    fits = [n for n in able if memory[n] <= MEMORY_FACTOR * lean]
    order = {n: i for i, n in enumerate(_REGISTRY)}
    hw = _hardware(hw)
    return min(fits, key=lambda n: (predicted_time(call, n, hw, eb), getattr(_REGISTRY[n], "TIE_RANK", 1), order[n]))


def plan_call(call: AttentionCall, requested: str = AUTO, hw=None) -> Plan:
    """The strategy that runs ``call`` when ``requested`` ("cost_model" or a name) is asked for.

    "cost_model" is :func:`auto_choice` on ``hw`` (a :class:`~ds_twolevel.costmodel.hardware.HardwareProfile`;
    default: the CPU profile). A named strategy that cannot compute the call raises ValueError with its
    reason (before any collective); a prefill-only one falls back to "cost_model" for decode; with a cache
    in another layout than the dimension split, a strategy that does not read it falls back to "cost_model" among
    those that do (the cache chose the layout).
    """
    requested = check_name(requested)
    if requested != AUTO:
        strategy = _REGISTRY[requested]
        reason = strategy.why_not(call)
        if reason is None and call.cache_layout in layouts(strategy):
            return Plan(requested, strategy)
        fallback = call.cache_layout != "segments" or (getattr(strategy, "PREFILL_ONLY", False) and call.q_len < 2)
        if not fallback:
            raise ValueError(reason)
    if not candidates(call) and call.cache_layout != "segments":
        reasons = "; ".join(f"{n}: {s.why_not(call)}" for n, s in _REGISTRY.items() if call.cache_layout in layouts(s))
        raise ValueError(f"no strategy reads a {call.cache_layout!r} cache for this call - {reasons}")
    name = auto_choice(call, hw=hw)
    return Plan(name, _REGISTRY[name])


for _strategy in (score_allreduce, qk_allgather, seq_rows, kv_shard):
    register(_strategy)
