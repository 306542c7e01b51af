"""Fast generation by default: a patched model's ``generate()`` runs on the preallocated
:class:`~hf_integration.seqshard.TwoLevelCache`, in the KV layout the cost model predicts is faster.

Hugging Face's default ``DynamicCache`` concatenates the whole cache at every step. A patched model
instead gets, when ``generate()`` is called without a cache of its own:

* ``kv_layout="cost_model"`` (default): the layout ("segments": this rank's (b, g/n, s, d/m) slice;
  "kv_shard": this segment rank's positions at full d) with the least predicted time for the whole call
  (prefill of the prompt + ``max_new_tokens`` decode steps) on each layer's hardware profile,
  summed over the partitioned attention layers (:func:`choose_kv_layout`);
* ``kv_layout="segments"`` or ``"kv_shard"``: that layout, forced;
* HF's own arguments keep their meaning: ``cache=`` (a cache object), ``cache_implementation=``
  ("dynamic", "static", ...) and ``use_cache=False`` bypass it.

``kv_layout`` is an attribute of the model's ``generation_config``, so ``generate(..., kv_layout=...)``
sets it per call through HF's own keyword handling (no extra call).

Example:
    >>> patch_model(model, mesh)
    >>> model.generate(ids, max_new_tokens=64)                      # preallocated, layout by the cost model
    >>> model.generate(ids, max_new_tokens=64, kv_layout="kv_shard")  # forced
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any, Iterator

import torch
from torch import nn

from ds_twolevel.costmodel.hardware import profile as hw_profile
from ds_twolevel.layers.attention import TwoLevelAttention, attention_call
from ds_twolevel.strategies import registry
from ds_twolevel.strategies.base import CACHE_LAYOUTS

from hf_integration.modules import HFTwoLevelAttention
from hf_integration.seqshard import TwoLevelCache

KV_LAYOUT_KEY = "kv_layout"
"""the ``generation_config`` attribute (and ``generate()`` keyword) that picks the cache layout."""
COST_MODEL = "cost_model"
KV_LAYOUTS = (COST_MODEL, *CACHE_LAYOUTS)


def _layers(model: nn.Module) -> list[HFTwoLevelAttention]:
    return [m for m in model.modules() if isinstance(m, HFTwoLevelAttention)]


def _call(layer: TwoLevelAttention, *, batch: int, q_len: int, cached: int, layout: str, masked: bool):
    """The :class:`AttentionCall` ``layer`` would see for one generate() forward (no tensor is allocated)."""
    hidden = torch.empty(batch, q_len, layer.hidden_size, device="meta", dtype=layer.q_proj.weight.dtype)
    mask = torch.empty(1, device="meta") if masked else None
    with torch.no_grad():
        call = attention_call(layer, hidden, mask, None, kv_len=cached + q_len)
    return dataclasses.replace(call, cache_layout=layout, cached=cached, grad=False, dropout=False)


def _layer_time(layer: TwoLevelAttention, layout: str, *, batch: int, prompt: int, new_tokens: int,
                masked: bool) -> float:
    """Predicted seconds of ``layer``'s attention over one generate() call with a ``layout`` cache:
    the prefill, then ``new_tokens - 1`` decode steps at the mean context length (ValueError: the layout
    cannot serve this layer)."""
    hw = layer.hardware if layer.hardware is not None else hw_profile(None, layer.q_proj.weight.device)
    steps = max(new_tokens - 1, 0)
    total = 0.0
    for q_len, cached, count in ((prompt, 0, 1), (1, prompt + steps // 2, steps)):
        if not count:
            continue
        call = _call(layer, batch=batch, q_len=q_len, cached=cached, layout=layout, masked=masked)
        name = registry.plan_call(call, layer.strategy, hw).name
        total += count * registry.predicted_time(call, name, hw)
    return total


def choose_kv_layout(model: nn.Module, *, batch: int, prompt: int, new_tokens: int, masked: bool = False) -> str:
    """The KV-cache layout with the least predicted attention time for one ``generate()`` call.

    "kv_shard" only where every partitioned layer can decode with it (m > 1, fused attention possible:
    no soft-capping) and it predicts less time summed over the layers; otherwise "segments" (ties too).

    Example:
        >>> choose_kv_layout(model, batch=8, prompt=16384, new_tokens=64)
        'kv_shard'
    """
    layers = _layers(model)
    if not layers or min(layer.axes.m for layer in layers) < 2:
        return "segments"
    kw = dict(batch=batch, prompt=prompt, new_tokens=new_tokens, masked=masked)
    try:
        sharded = predicted_generate_time(layers, "kv_shard", **kw)
    except ValueError:  # some layer cannot read a cache held by position (e.g. soft-capped scores)
        return "segments"
    segments = predicted_generate_time(layers, "segments", **kw)
    return "kv_shard" if sharded < segments else "segments"


def predicted_generate_time(layers: list[TwoLevelAttention], layout: str, *, batch: int, prompt: int,
                            new_tokens: int, masked: bool = False) -> float:
    """Predicted seconds of ``layers``' attention over one ``generate()`` call with a ``layout`` cache: the
    criterion of :func:`choose_kv_layout` (ValueError: the layout cannot serve a layer).

    Example:
        >>> predicted_generate_time(layers, "kv_shard", batch=8, prompt=16384, new_tokens=64)
    """
    kw = dict(batch=batch, prompt=prompt, new_tokens=new_tokens, masked=masked)
    return sum(_layer_time(layer, layout, **kw) for layer in layers)


def _generate_shape(generation_config: Any, model_kwargs: dict, batch: int,
                    max_cache_length: int) -> tuple[int, int, bool]:
    """(prompt length, new tokens, padded) of the generate() call being prepared."""
    mask = model_kwargs.get("attention_mask")
    new = generation_config.max_new_tokens
    if mask is not None:
        prompt = int(mask.shape[-1])
    elif new is not None:
        prompt = max(max_cache_length + 1 - new, 1)
    else:  # only max_length is known: count it all as prompt (the conservative, prefill-heavy guess)
        prompt = max_cache_length
    if new is None:
        new = max(max_cache_length + 1 - prompt, 1)
    masked = mask is not None and not bool(mask.all())
    return prompt, int(new), masked


def _prepare_cache_for_generation(self: nn.Module, generation_config: Any, model_kwargs: dict,
                                  generation_mode: Any, batch_size: int, max_cache_length: int) -> None:
    """HF's ``_prepare_cache_for_generation``, with a :class:`TwoLevelCache` where HF would build a
    ``DynamicCache`` by default (no cache, no ``cache_implementation``, ``use_cache`` not False)."""
    layout = getattr(generation_config, KV_LAYOUT_KEY, COST_MODEL)
    if layout not in KV_LAYOUTS:
        raise ValueError(f"generate(kv_layout={layout!r}): use one of {KV_LAYOUTS}")
    default = type(self)._prepare_cache_for_generation
    if (model_kwargs.get("cache") is not None or generation_config.use_cache is False
            or generation_config.cache_implementation is not None or self.config.is_encoder_decoder
            or not self._supports_default_dynamic_cache()):
        return default(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
    if layout == COST_MODEL:
        prompt, new, masked = _generate_shape(generation_config, model_kwargs, rows, max_cache_length)
        layout = choose_kv_layout(self, batch=rows, prompt=prompt, new_tokens=new, masked=masked)
    model_kwargs["cache"] = TwoLevelCache.for_model(self, layout=layout, capacity=max_cache_length + 1)


def install_fast_generation(model: nn.Module) -> None:
    """Make ``model.generate()`` use a preallocated :class:`TwoLevelCache` by default (in place; a model
    that cannot generate, or has no partitioned attention, is left as it is)."""
    config = getattr(model, "generation_config", None)
    if config is None or not _layers(model) or not hasattr(model, "_prepare_cache_for_generation"):
        return
    if getattr(config, KV_LAYOUT_KEY, None) is None:
        setattr(config, KV_LAYOUT_KEY, COST_MODEL)
    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


@contextlib.contextmanager
def plain_generation_config(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model.generation_config`` has no ``kv_layout`` (a dense checkpoint carries only
    Hugging Face's own keys)."""
    config = getattr(model, "generation_config", None)
    value = getattr(config, KV_LAYOUT_KEY, None)
    if value is not None:
        delattr(config, KV_LAYOUT_KEY)
    try:
        yield
    finally:
        if value is not None:
            setattr(config, KV_LAYOUT_KEY, value)


__all__ = ["KV_LAYOUTS", "choose_kv_layout", "install_fast_generation", "plain_generation_config"]
