"""The rows of the layout benchmark: one built model each (dense HF, ours, Helix-style, AutoTP), with its
decode caches filled from the shared dense cache state, its bytes counted and its error against the dense
model measured."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ds_twolevel.parallel.collectives import CommCounter
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.tools.bench.config import DECODE_PHASES, BenchConfig, decode_shapes
from ds_twolevel.tools.bench.kvfill import dense_kv, hf_cache, two_level_cache
from ds_twolevel.tools.bench.model import TwoLevelLlama, cache_bytes, crop_cache

Step = Callable[[], Any]


@dataclass
class VariantResult:
    """One row of the layout benchmark (rank 0's view). ``long_decode``: the long-context decode shape."""

    name: str
    kind: str
    cache_layout: str = ""
    """our rows' KV layout ("segments" or "kv_shard"); "" for Hugging Face's DynamicCache."""
    prefill_strategy: str = ""
    decode_strategy: str = ""
    long_decode_strategy: str = ""
    """the strategy that ran each phase (the layer's, or the one "cost_model" or the cache picked)."""
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    long_decode_ms: float = 0.0
    prefill_bytes_per_layer: int = 0
    decode_bytes_per_layer: int = 0
    long_decode_bytes_per_layer: int = 0
    param_bytes: int = 0
    """per rank, transformer layers only."""
    kv_cache_bytes: int = 0
    long_kv_cache_bytes: int = 0
    """per rank, the cache a decode step reads (decode and long-context decode shapes)."""
    max_error: float = 0.0
    """largest |output - dense| over prefill and both decode shapes."""
    default: bool = False
    """the decode layout the cost model picks for a generate() at the long-context shape."""
    prefill_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)
    long_decode_times: list[float] = field(default_factory=list)


@dataclass
class Variant:
    """A built model of the layout benchmark: its result row and one step per phase it runs."""

    result: VariantResult
    steps: dict[str, Step]
    """phase -> one step; a decode step restores its KV cache to the shape's length afterwards."""
    alone: bool = False
    """only rank 0 runs it (the dense single-device baseline); the others wait at the barrier."""


def bench_inputs(cfg: BenchConfig, spec: AttentionSpec) -> dict[str, Any]:
    """Prefill ids, and per decode shape the new token ids and the dense cache state."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    out: dict[str, Any] = {"prefill": torch.randint(0, cfg.vocab, (cfg.prefill_batch, cfg.prefill_seq), generator=gen)}
    for k, (phase, (b, s)) in enumerate(decode_shapes(cfg).items()):
        out[phase] = {"next": torch.randint(0, cfg.vocab, (b, 1), generator=gen), "seq": s,
                      "kv": dense_kv(spec, cfg.layers, b, s, cfg.seed + 2 + k)}
    return out


def dense_reference(hf_model: nn.Module, inp: dict) -> dict[str, torch.Tensor]:
    """Dense outputs of the prefill and of each decode step (against the dense cache state)."""
    ref = {"prefill": hf_model.model(input_ids=inp["prefill"]).last_hidden_state}
    for phase in DECODE_PHASES:
        cache = hf_cache(hf_model.config, inp[phase]["kv"])
        ref[phase] = hf_model.model(input_ids=inp[phase]["next"], cache=cache, use_cache=True).last_hidden_state
    return ref


def _error(out: torch.Tensor, want: torch.Tensor | None) -> float:
    return 0.0 if want is None else float((out - want).abs().max())


def _hf_decode(model: nn.Module, ids: torch.Tensor, cache: Any, seq: int) -> Step:
    return lambda: (model(input_ids=ids, cache=cache, use_cache=True), crop_cache(cache, seq))


def hf_variant(model: nn.Module, inp: dict, res: VariantResult, ref: dict | None, *, alone: bool = False,
               heads: list[int] | None = None) -> Variant:
    """An HF LlamaModel (dense or AutoTP-sharded) with a DynamicCache per decode shape holding ``heads``
    (None: all); error against ``ref`` (None: it is the reference). ``alone``: other ranks build nothing."""
    import torch.distributed as dist

    ids = inp["prefill"]
    steps: dict[str, Step] = {"prefill": lambda: model(input_ids=ids)}
    if alone and dist.get_rank() != 0:  # the phases' barriers only
        return Variant(res, {phase: lambda: None for phase in ("prefill", *DECODE_PHASES)}, alone)
    if ref is not None:
        res.max_error = _error(model(input_ids=ids).last_hidden_state, ref["prefill"])
    for phase in DECODE_PHASES:
        d = inp[phase]
        cache = hf_cache(model.config, d["kv"], heads)
        setattr(res, f"{'long_' if phase.startswith('long') else ''}kv_cache_bytes", cache_bytes(cache))
        out = model(input_ids=d["next"], cache=cache, use_cache=True).last_hidden_state
        crop_cache(cache, d["seq"])
        res.max_error = max(res.max_error, _error(out, None if ref is None else ref[phase]))
        steps[phase] = _hf_decode(model, d["next"], cache, d["seq"])
    return Variant(res, steps, alone)


def _decode(model: TwoLevelLlama, ids: torch.Tensor, cache: Any, seq: int) -> Step:
    return lambda: (model(ids, cache, seq), crop_cache(cache, seq))


def ours_variant(model: TwoLevelLlama, inp: dict, cfg: BenchConfig, res: VariantResult, ref: dict, *,
                 layout: str = "segments", prefill: bool = True) -> Variant:
    """A TwoLevelLlama (or the Helix-style one: ``prefill=False``) with a preallocated cache in ``layout``
    per decode shape; bytes counted, the strategy of each phase recorded, error against ``ref``."""
    steps: dict[str, Step] = {}
    res.cache_layout = layout
    if prefill:
        ids = inp["prefill"]
        res.prefill_strategy = model.strategy_for(ids, None)
        with CommCounter() as comm:
            out = model(ids)
        res.prefill_bytes_per_layer = comm.bytes_sent() // cfg.layers
        res.max_error = _error(out, ref["prefill"])
        steps["prefill"] = lambda: model(ids)
    for phase in DECODE_PHASES:
        d, long = inp[phase], "long_" if phase.startswith("long") else ""
        cache = two_level_cache([b.attn for b in model.blocks], d["kv"], layout)
        setattr(res, f"{phase}_strategy", model.strategy_for(d["next"], cache))
        with CommCounter() as comm:
            out = model(d["next"], cache, d["seq"])
        crop_cache(cache, d["seq"])
        setattr(res, f"{phase}_bytes_per_layer", comm.bytes_sent() // cfg.layers)
        setattr(res, f"{long}kv_cache_bytes", cache.nbytes())
        res.max_error = max(res.max_error, _error(out, ref[phase]))
        steps[phase] = _decode(model, d["next"], cache, d["seq"])
    return Variant(res, steps)
