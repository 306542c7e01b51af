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
    """The keys of one layer's dropout masks.

    Each forward's key waits, under its input's fingerprint, for the recompute that repeats it (first
    in, first out: a pipeline schedule may run several forwards of the same input before their
    backwards). A recompute whose fingerprint no forward left - its input differs from every forward's,
    e.g. a non-deterministic kernel upstream - cannot know which mask to draw: it is refused rather
    than computed with a mask the forward did not use.
    """

    def __init__(self) -> None:
        self.step = 0
        self.pending: dict[tuple, list[int]] = {}
        self.last: dict[tuple, int] = {}

    def key(self, hidden_states: torch.Tensor) -> int:
        """The key of this call: a new one, or in a recompute the key of the forward it repeats."""
        fp = fingerprint(hidden_states)
        if in_backward():
            return self._recompute_key(fp)
        key, self.step = self.step, self.step + 1
        self.pending.setdefault(fp, []).append(key)
        while sum(map(len, self.pending.values())) > MAX_KEYS:  # forwards never recomputed
            oldest = next(iter(self.pending))
            self.pending[oldest].pop(0)
            if not self.pending[oldest]:
                del self.pending[oldest]
        return key

    def _recompute_key(self, fp: tuple) -> int:
        if self.pending.get(fp):
            self.last[fp] = self.pending[fp].pop(0)
            if not self.pending[fp]:
                del self.pending[fp]
            return self.last[fp]
        if fp in self.last:  # the same graph recomputed again (backward with retain_graph)
            return self.last[fp]
        raise RuntimeError(
            "attention dropout: a forward run inside the backward pass (activation checkpointing's recompute) "
            "has an input no earlier forward of this layer had, so the dropout mask it must repeat is unknown; "
            "make the recomputed inputs bit-identical (deterministic kernels), or train this layer with "
            "dropout=0 or without checkpointing it")

    def reset(self) -> None:
        self.step = 0
        self.pending.clear()
        self.last.clear()


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
