"""Partitioned layers that stand in for Hugging Face modules (same forward signature and outputs).

:class:`HFTwoLevelAttention` is a :class:`~ds_twolevel.TwoLevelAttention` whose ``forward``
accepts the HF attention module's arguments (bound by name from the spec's ``signature``) and
returns ``(attn_output, None)``; the KV cache it is given (HF ``DynamicCache`` or any object with
``update(k, v, layer_idx)``) stores this rank's (b, g/n, s, d/m) slice only.
:class:`HFTwoLevelMLP` is a :class:`~ds_twolevel.TwoLevelMLP` that applies the HF module's own
activation (bit-identical GELU/SiLU variant) and optional trailing dropout.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ds_twolevel.layers.attention import TwoLevelAttention, tag_parallel
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelAxes, TwoLevelMesh
from ds_twolevel.layers.mlp import TwoLevelMLP
from ds_twolevel.sharding.partition import AttentionSpec

from hf_integration.specs import DEFAULT_CACHE_ARGS
from hf_integration.weights import TensorMap, dense_numel

CACHE_ARGS = DEFAULT_CACHE_ARGS
"""the default ``AttentionLayout.cache_args`` (a layer reads its spec's: :meth:`HFTwoLevelAttention.bound_cache`)."""


def _self_attention_cache(cache: Any) -> Any:
    """The self-attention half of an EncoderDecoderCache; any other cache as is."""
    return getattr(cache, "self_attention_cache", cache)


class HFTwoLevelAttention(TwoLevelAttention):
    """Partition (i, j) of a Hugging Face attention module.

    Args (beyond :class:`TwoLevelAttention`'s):
        signature: positional parameters of the HF forward after ``hidden_states``.
        post_dropout: the HF module's output dropout (applied after the all-reduce), or None.
        tensor_maps: where each core tensor lives in the HF checkpoint (relative to ``owner_class``).
        owner_class: name of the HF class this layer replaced (reports).
        target: path of this layer inside the replaced HF module ("" = it is the module).
        sliding_window: this layer's sliding window (None: full attention). The window arrives
            through HF's mask; a call without a mask whose keys the window would cut is refused.
        cache_args: names of the HF forward's KV-cache argument (``AttentionLayout.cache_args``).
        sinks: the layer has attention sinks (GPT-OSS): a (h/n,) parameter ``sinks`` holds this head
            group's sink logits (replicated over segments), passed to the strategy's softmax.

    Example:
        >>> out, _ = layer(hidden_states, position_embeddings=(cos, sin), attention_mask=mask)
    """

    def __init__(self, hidden_size: int, spec: AttentionSpec, axes: TwoLevelAxes | TwoLevelMesh, *,
                 signature: tuple[str, ...],
                 post_dropout: nn.Module | None, tensor_maps: dict[str, TensorMap], owner_class: str,
                 target: str = "", sliding_window: int | None = None,
                 cache_args: tuple[str, ...] = DEFAULT_CACHE_ARGS, sinks: bool = False, **kwargs: Any) -> None:
        super().__init__(hidden_size, spec, axes, **kwargs)
        self.sequence_mask: torch.Tensor | None = None
        """with ``sequence_parallel``: the (b, s) padding mask of the whole sequence (None: none), set by
        the patched model per call (:mod:`hf_integration.sequence_parallel`); HF's mask, built from
        local shapes, is not used."""
        self.signature, self.post_dropout, self.tensor_maps = signature, post_dropout, tensor_maps
        self.owner_class, self.target, self.sliding_window = owner_class, target, sliding_window
        self.cache_args = cache_args
        self.sinks = None
        if sinks and self.axes.sp.size > 1:
            raise ValueError(f"{owner_class}: attention sinks are not supported with Ulysses (sp={self.axes.sp.size}); "
                             f"train with sequence_parallel_size 1")
        if sinks:
            weight = self.q_proj.weight
            self.sinks = nn.Parameter(torch.zeros(self.part.local_heads, device=weight.device, dtype=weight.dtype))
            tag_parallel(self.sinks, sharded=self.axes.j == 0, partition_dim=0)  # replicated over segments

    def shard_index(self, tp_rank: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
        """:meth:`TwoLevelAttention.shard_index`, plus the sinks of this head group's query heads."""
        out = super().shard_index(tp_rank)
        if self.sinks is not None:
            i = self.axes.i if tp_rank is None else tp_rank // self.axes.m
            out["sinks"] = (torch.tensor(list(self.part.q_heads(i))), 0)
        return out

    def attention_call(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: Any,
                       kv_len: int | None = None):
        """The layer's :class:`AttentionCall`, marked ``sinks`` when it has them (fused strategies refuse)."""
        call = super().attention_call(hidden_states, attention_mask, kv_cache, kv_len)
        return call if self.sinks is None else dataclasses.replace(call, sinks=True)

    def _context(self, call: Any, store: Any, key: int | None) -> Any:
        ctx = super()._context(call, store, key)
        return ctx if self.sinks is None else dataclasses.replace(ctx, sinks=self.sinks)

    def bound_cache(self, bound: dict[str, Any]) -> Any:
        """The KV cache among the bound forward arguments (the first of ``cache_args`` not None), or None."""
        return next((bound[name] for name in self.cache_args if bound.get(name) is not None), None)

    def replicated_tensors(self) -> dict[str, str]:
        """Core name -> attribute of tensors every rank holds whole."""
        return {"o_bias": "o_bias"} if self.o_bias is not None else {}

    def dense_numel(self) -> int:
        """Parameters of the dense layer this partition came from."""
        return dense_numel(self.tensor_maps)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """HF calling convention in, ``(attn_output (b, s, H), None)`` out (no attention weights)."""
        bound = dict(zip(self.signature, args))
        bound.update(kwargs)
        if bound.get("encoder_hidden_states") is not None:
            raise ValueError(f"{self.owner_class}: cross-attention is not partitioned; patch the model "
                             f"with strict=False to keep cross-attention layers dense")
        cache = self.bound_cache(bound)
        mask = bound.get("attention_mask")
        if (self.sequence_parallel and self.axes.tp.size > 1) or (self.ulysses and self.axes.sp.size > 1):
            return self._sequence_parallel_forward(hidden_states, bound), None
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(f"{self.owner_class}: attention_mask of type {type(mask).__name__} is not supported; "
                             f"use attn_implementation='sdpa' or 'eager'")
        rope = bound.get("position_embeddings") if self.spec.rot_dim else None
        if rope is not None and self.spec.rope_style == "half" and rope[0].shape[-1] * 2 == self.spec.rot_dim:
            rope = tuple(torch.cat((t, t), dim=-1) for t in rope)  # GPT-OSS passes the r/2 frequencies once
        if mask is None and self.sliding_window is not None:
            self._check_window(bound.get("hidden_states", hidden_states).shape[1], cache)
        out = TwoLevelAttention.forward(self, hidden_states, position_embeddings=rope, attention_mask=mask,
                                        kv_cache=None if cache is None else _self_attention_cache(cache))
        if self.post_dropout is not None:
            out = self.post_dropout(out)
        return out, None

    def _sequence_parallel_forward(self, hidden_states: torch.Tensor, bound: dict[str, Any]) -> torch.Tensor:
        """(b, s/p, H) local tokens -> (b, s/p, H), with the whole sequence's padding mask (p = n*m, or sp
        under Ulysses)."""
        whole = hidden_states.shape[1] * (self.axes.sp.size if self.ulysses else self.axes.tp.size)
        if self.sliding_window is not None and whole > self.sliding_window:
            raise ValueError(f"{self.owner_class}: sequence_parallel does not apply a sliding window "
                             f"({self.sliding_window} < {whole} positions); train this model with sequence_parallel "
                             f"off, or on sequences of at most {self.sliding_window} tokens")
        rope = bound.get("position_embeddings") if self.spec.rot_dim else None
        out = TwoLevelAttention.forward(self, hidden_states, position_embeddings=rope,
                                        attention_mask=self.sequence_mask)
        return out if self.post_dropout is None else self.post_dropout(out)

    def _check_window(self, q_len: int, cache: Any) -> None:
        """Without a mask this layer attends causally to every key: refuse if the window cuts some."""
        past = 0 if cache is None else int(_self_attention_cache(cache).get_seq_length(self.layer_idx))
        if past + q_len > self.sliding_window:
            raise ValueError(
                f"{self.owner_class}: sliding window {self.sliding_window} < {past + q_len} keys but no attention "
                f"mask was passed (the window would be ignored); use attn_implementation='sdpa' or 'eager', whose "
                f"masks carry the window")


class HFTwoLevelMLP(TwoLevelMLP):
    """Column/row-parallel MLP with the HF module's own activation (and optional output dropout).

    Example:
        >>> mlp = HFTwoLevelMLP(64, 256, mesh.axes.tp, gated=True, bias=False, act_fn=nn.SiLU(), ...)
    """

    def __init__(self, hidden_size: int, intermediate_size: int, tp: AxisGroup, *, gated: bool, bias: bool,
                 act_fn: Any, dropout: nn.Module | None, tensor_maps: dict[str, TensorMap], owner_class: str,
                 target: str = "", reduce_dtype: Any = torch.float32, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden_size, intermediate_size, tp, gated=gated, activation=act_fn, bias=bias,
                         reduce_dtype=reduce_dtype, device=device, dtype=dtype)
        self.dropout, self.tensor_maps = dropout, tensor_maps
        self.owner_class, self.target = owner_class, target

    def replicated_tensors(self) -> dict[str, str]:
        """Core name -> attribute of tensors every rank holds whole."""
        return {"down_proj.bias": "down_bias"} if self.down_bias is not None else {}

    def dense_numel(self) -> int:
        """Parameters of the dense MLP this partition came from."""
        return dense_numel(self.tensor_maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, H) replicated -> (b, s, H) replicated (with ``sequence_parallel``: (b, s/p, H) local
        tokens), then the HF module's output dropout."""
        y = super().forward(x)
        return y if self.dropout is None else self.dropout(y)
