"""The attention strategies by name, and :func:`plan_call`: the one place that decides which strategy
runs a call - for :class:`~ds_twolevel.layers.attention.TwoLevelAttention` and for the cost model.

A strategy is a module with the interface of :class:`~ds_twolevel.strategies.base.Strategy`. Adding
one is one file plus one :func:`register` line (below, or in your own code); the config, the policy,
the CLI, the cost model, the planner, the bench and the tests iterate :func:`names`.

Optional module attributes read here: ``AUTO`` ("auto" may pick it), ``UNIVERSAL`` (it computes every
call with a dimension-layout cache, mask, dropout and gradient included: the parity tests run it
everywhere), ``LAYOUTS`` (KV-cache layouts it reads, default ``("segments",)``), ``PREFILL_ONLY`` (a
request falls back to "auto" for decode's single row), ``BACKWARD`` (False: inference only) and
``TIE_RANK`` (lower wins a tie in "auto"; default 1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

from ds_twolevel.strategies import kv_shard, qk_allgather, score_allreduce, seq_rows
from ds_twolevel.strategies.base import AttentionCall, Strategy

AUTO = "auto"
_REGISTRY: dict[str, ModuleType] = {}


def register(strategy: ModuleType | Strategy, *, replace: bool = False) -> None:
    """Add a strategy module under its ``NAME``."""
    name = strategy.NAME
    if name == AUTO or (name in _REGISTRY and not replace):
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
    """What ``strategy=`` accepts: "auto" and every registered name."""
    return (AUTO, *_REGISTRY)


def get(name: str) -> ModuleType:
    """The strategy registered as ``name`` (ValueError naming the choices otherwise)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"strategy must be one of {choices()}, got {name!r}") from None


def check_name(name: str) -> str:
    """``name`` if it is "auto" or a registered strategy, else a ValueError naming the choices."""
    if name != AUTO:
        get(name)
    return name


def layer_choices() -> tuple[str, ...]:
    """What a layer's (or patch_model's) ``strategy=`` accepts: "auto" and every strategy that reads a
    dimension-layout cache (a strategy of another cache layout is chosen by the cache itself)."""
    return (AUTO, *(n for n, s in _REGISTRY.items() if "segments" in layouts(s)))


def check_layer_strategy(name: str) -> str:
    """``name`` if a layer may default to it (see :func:`layer_choices`), else ValueError naming them."""
    check_name(name)
    if name not in layer_choices():
        raise ValueError(f"strategy {name!r} is chosen by the KV cache (a cache built with layout="
                         f"{layouts(_REGISTRY[name])[0]!r}), not set on the layer; the layer's strategy must be "
                         f"one of {layer_choices()}")
    return name


def layouts(strategy: ModuleType) -> tuple[str, ...]:
    return getattr(strategy, "LAYOUTS", ("segments",))


@dataclass(frozen=True)
class Plan:
    """The strategy that runs one call."""

    name: str
    strategy: ModuleType


def bytes_sent(call: AttentionCall, name: str, element_size: int) -> int:
    """Forward bytes the strategy's own collectives send for ``call``."""
    return sum(col.bytes_sent(element_size) for col in get(name).collectives(call))


def auto_choice(call: AttentionCall, element_size: int | None = None) -> str:
    """"auto": of the ``AUTO`` strategies that can compute the call, the one that sends the fewest
    bytes (ties: the lower ``TIE_RANK``, then registration order)."""
    eb = call.element_size if element_size is None else element_size
    able = [(n, s) for n, s in _REGISTRY.items()
            if getattr(s, "AUTO", False) and call.cache_layout in layouts(s) and s.why_not(call) is None]
    if not able:
        raise ValueError(f"no strategy can compute this call: {call}")
    order = {n: i for i, n in enumerate(_REGISTRY)}
    return min(able, key=lambda ns: (bytes_sent(call, ns[0], eb), getattr(ns[1], "TIE_RANK", 1), order[ns[0]]))[0]


def _for_layout(call: AttentionCall, requested: str) -> Plan:
    """A cache that is not in the dimension layout admits only the strategies that read it."""
    able = {n: s for n, s in _REGISTRY.items() if call.cache_layout in layouts(s)}
    reasons = {n: s.why_not(call) for n, s in able.items()}
    if requested in able and reasons[requested] is None:
        return Plan(requested, able[requested])
    for n, reason in reasons.items():
        if reason is None:
            return Plan(n, able[n])
    why = "; ".join(f"{n}: {r}" for n, r in reasons.items())
    raise ValueError(f"no strategy reads a {call.cache_layout!r} cache for this call - {why}")


def plan_call(call: AttentionCall, requested: str = AUTO) -> Plan:
    """The strategy that runs ``call`` when ``requested`` ("auto" or a name) is asked for.

    A named strategy that cannot compute the call raises ValueError with its reason (before any
    collective); a prefill-only one falls back to "auto" for decode; a cache in another layout than
    the dimension split picks among the strategies that read it.
    """
    check_name(requested)
    if call.cache_layout != "segments":
        return _for_layout(call, requested)
    if requested == AUTO:
        name = auto_choice(call)
        return Plan(name, _REGISTRY[name])
    strategy = _REGISTRY[requested]
    reason = strategy.why_not(call)
    if reason is None:
        return Plan(requested, strategy)
    if getattr(strategy, "PREFILL_ONLY", False) and call.q_len < 2:
        return plan_call(call, AUTO)
    raise ValueError(reason)


for _strategy in (score_allreduce, qk_allgather, seq_rows, kv_shard):
    register(_strategy)
