"""Keyed attention dropout: every rank of a layer draws the same mask, and a recompute draws it again.

The keep-mask of a call is :func:`~ds_twolevel.layers.masks.dropout_keep_mask` of (seed, key): the full
(b, h, s_q, s_kv) mask from one seeded stream, of which each rank keeps its heads and rows. Keys count
the layer's training forwards, so all ranks of the layer (same inputs, same calls) agree. Activation
checkpointing runs the forward again inside the backward pass; there a key is looked up by the
input's fingerprint instead of taken anew, so the recompute drops exactly what the forward dropped.
"""
from __future__ import annotations

from typing import Any

import torch

from ds_twolevel.layers.masks import dropout_keep_mask

MAX_KEYS = 256
"""forwards whose keys are remembered for a recompute (gradient accumulation, pipeline schedules)."""


def fingerprint(x: torch.Tensor) -> tuple:
    """Shape and two sums of a layer input: equal for a recompute of the same forward."""
    with torch.no_grad():
        flat = x.detach().reshape(-1).float()
        weights = torch.arange(1, 8, device=x.device, dtype=flat.dtype).repeat(-(-flat.numel() // 7))[:flat.numel()]
        sums = torch.stack([flat.sum(), (flat * weights).sum()]).tolist()
    return (tuple(x.shape), *sums)


def in_backward() -> bool:
    """Whether autograd is running a backward node now (where checkpointing recomputes)."""
    return torch._C._current_autograd_node() is not None  # private torch API (checked with torch 2.13)


class DropoutKeys:
    """The keys of one layer's dropout masks."""

    def __init__(self) -> None:
        self.step = 0
        self.by_input: dict[tuple, int] = {}

    def key(self, hidden_states: torch.Tensor) -> int:
        """The key of this call: a new one, or in a recompute the key of the forward it repeats."""
        fp = fingerprint(hidden_states)
        if in_backward() and fp in self.by_input:
            return self.by_input[fp]
        key, self.step = self.step, self.step + 1
        self.by_input[fp] = key
        while len(self.by_input) > MAX_KEYS:
            self.by_input.pop(next(iter(self.by_input)))
        return key

    def reset(self) -> None:
        self.step = 0
        self.by_input.clear()


def apply_dropout(layer: Any, probs: torch.Tensor, q_len: int | None = None, row0: int = 0, *,
                  key: int) -> torch.Tensor:
    """Dropout of ``probs`` (b, hl, rows, skv): rows [row0, row0 + rows) of the keep-mask of a call with
    ``q_len`` query rows (default: all of them), this head group's heads."""
    b, hl, rows, skv = probs.shape
    sq = rows if q_len is None else q_len
    keep = dropout_keep_mask((b, layer.spec.num_heads, sq, skv), layer.dropout, seed=layer.dropout_seed, step=key,
                             device=probs.device)
    keep = keep[:, layer.part.q_heads(layer.axes.i), row0:row0 + rows]  # (b, hl, rows, skv)
    return probs * keep / (1.0 - layer.dropout)
