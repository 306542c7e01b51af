"""The rows of the layout benchmark: one built model each (dense HF, ours, AutoTP), with its decode
cache filled, its bytes counted and its error against the dense model measured."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ds_twolevel.layers.cache import KVCache
from ds_twolevel.parallel.collectives import CommCounter
from ds_twolevel.tools.bench.config import BenchConfig
from ds_twolevel.tools.bench.model import TwoLevelLlama, cache_bytes, crop_cache


@dataclass
class VariantResult:
    """One row of the layout benchmark (rank 0's view)."""

    name: str
    kind: str
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    prefill_bytes_per_layer: int = 0
    decode_bytes_per_layer: int = 0
    param_bytes: int = 0
    """per rank, transformer layers only."""
    kv_cache_bytes: int = 0
    """per rank, after the decode prompt."""
    max_error: float = 0.0
    """largest |output - dense| over prefill and decode."""
    prefill_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)


@dataclass
class Variant:
    """A built model of the layout benchmark: its result row and one prefill / decode step each."""

    result: VariantResult
    prefill: Callable[[], Any]
    decode: Callable[[], Any]
    """one decode step; restores the KV cache to its prompt length afterwards."""
    alone: bool = False
    """only rank 0 runs it (the dense single-device baseline); the others wait at the barrier."""


def bench_inputs(cfg: BenchConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids = lambda b, s: torch.randint(0, cfg.vocab, (b, s), generator=gen)
    return {"prefill": ids(cfg.prefill_batch, cfg.prefill_seq), "prompt": ids(cfg.decode_batch, cfg.decode_seq),
            "next": ids(cfg.decode_batch, 1)}


def dense_reference(hf_model: nn.Module, inp: dict) -> dict[str, torch.Tensor]:
    """Dense outputs of the prefill and of the decode step (after the prompt)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    hf_model.model(input_ids=inp["prompt"], cache=cache, use_cache=True)
    return {"prefill": hf_model.model(input_ids=inp["prefill"]).last_hidden_state,
            "decode": hf_model.model(input_ids=inp["next"], cache=cache, use_cache=True).last_hidden_state}


def hf_variant(model: nn.Module, inp: dict, cfg: BenchConfig, res: VariantResult, ref: dict | None,
                alone: bool = False) -> Variant:
    """An HF LlamaModel (dense or AutoTP-sharded) with its decode cache filled; error against ``ref``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=inp["prompt"], cache=cache, use_cache=True)
    res.kv_cache_bytes = cache_bytes(cache)
    if ref is not None:
        out = model(input_ids=inp["next"], cache=cache, use_cache=True).last_hidden_state
        crop_cache(cache, cfg.decode_seq)
        res.max_error = max(float((model(input_ids=inp["prefill"]).last_hidden_state - ref["prefill"]).abs().max()),
                            float((out - ref["decode"]).abs().max()))
    decode = lambda: (model(input_ids=inp["next"], cache=cache, use_cache=True), crop_cache(cache, cfg.decode_seq))
    return Variant(res, lambda: model(input_ids=inp["prefill"]), decode, alone)


def ours_variant(model: TwoLevelLlama, inp: dict, cfg: BenchConfig, res: VariantResult, ref: dict) -> Variant:
    """A TwoLevelLlama with its decode cache filled; bytes counted, error against ``ref``."""
    with CommCounter() as comm:
        out = model(inp["prefill"])
    res.prefill_bytes_per_layer = comm.bytes_sent() // cfg.layers
    res.max_error = float((out - ref["prefill"]).abs().max())
    cache = KVCache()
    model(inp["prompt"], cache)
    res.kv_cache_bytes = cache.nbytes()
    with CommCounter() as comm:
        out = model(inp["next"], cache, cfg.decode_seq)
    crop_cache(cache, cfg.decode_seq)
    res.decode_bytes_per_layer = comm.bytes_sent() // cfg.layers
    res.max_error = max(res.max_error, float((out - ref["decode"]).abs().max()))
    decode = lambda: (model(inp["next"], cache, cfg.decode_seq), crop_cache(cache, cfg.decode_seq))
    return Variant(res, lambda: model(inp["prefill"]), decode)
