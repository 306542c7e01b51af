"""Additive masks for only the query rows (seq_rows) or only the cached positions (kv_shard) a rank
computes - never the whole (s_q, s_kv) mask of the layer.

The raw ``attention_mask`` is what the layer receives: None, 2-D padding (b, s_kv) with 1 = attend,
or 4-D (b, 1|h|h/n, s_q, s_kv), boolean (True = attend) or additive float (used as given, causality
included). Masked entries get ``finfo.min`` (as :func:`ds_twolevel.layers.masks.additive_mask` and Hugging
Face do), so a query row that sees nothing gets uniform weights instead of NaN, like the dense layer.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _heads(mask: torch.Tensor, q_heads: Sequence[int], local_heads: int) -> torch.Tensor:
    """A 4-D mask given for all h heads -> this head group's; (b, 1|hl, ., .) masks as they are."""
    if mask.shape[1] in (1, local_heads):
        return mask
    return mask[:, list(q_heads)]


def _additive(keep_or_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask -> 0 / finfo.min in ``dtype`` (one output tensor, no inverted temporary);
    an additive float mask as given."""
    if keep_or_mask.dtype == torch.bool:
        device = keep_or_mask.device
        zero, low = torch.zeros((), dtype=dtype, device=device), torch.full((), torch.finfo(dtype).min, dtype=dtype,
                                                                             device=device)
        return torch.where(keep_or_mask, zero, low)
    return keep_or_mask.to(dtype)


def check_kv_len(mask: torch.Tensor | None, batch: int, kv_len: int) -> None:
    """ValueError naming the shapes when a mask does not cover (batch, kv_len)."""
    if mask is None:
        return
    if mask.dim() not in (2, 4) or mask.shape[0] != batch or mask.shape[-1] != kv_len:
        raise ValueError(f"attention_mask must be (batch, kv_len) = ({batch}, {kv_len}) or 4-D (batch, 1|heads, "
                         f"q_len, {kv_len}); got {tuple(mask.shape)}")


def row_mask(mask: torch.Tensor | None, *, rows: tuple[int, int], q_len: int, kv_len: int, causal: bool,
             q_heads: Sequence[int], local_heads: int, dtype: torch.dtype,
             device: torch.device | None = None) -> torch.Tensor | None:
    """Additive mask (b|1, 1|hl, R, kv_len) of query rows [start, stop) (padded numbering: rows >= q_len
    are padding and see every key), or None when nothing is masked.

    Example:
        >>> row_mask(torch.ones(2, 8), rows=(4, 8), q_len=8, kv_len=8, causal=True, q_heads=[0], local_heads=1,
        ...          dtype=torch.float32).shape
        torch.Size([2, 1, 4, 8])
    """
    start, stop = rows
    real = max(0, min(stop, q_len) - start)
    if mask is not None and mask.dim() == 4:
        out = _additive(_heads(mask, q_heads, local_heads)[:, :, start:start + real], dtype)
        return F.pad(out, (0, 0, 0, stop - start - real))  # padding rows: 0 = attend all
    if mask is None and not causal:
        return None
    device = mask.device if mask is not None else device
    row = torch.arange(start, stop, device=device).unsqueeze(1)  # (R, 1)
    keep = torch.ones(stop - start, kv_len, dtype=torch.bool, device=device)
    if causal:  # query row r is position kv_len - q_len + r
        keep = torch.arange(kv_len, device=device).unsqueeze(0) <= row + (kv_len - q_len)
    keep = (keep | (row >= q_len)).view(1, 1, stop - start, kv_len)
    if mask is not None:
        keep = keep & mask.to(torch.bool).view(mask.shape[0], 1, 1, kv_len)
    return _additive(keep, dtype)


def position_mask(mask: torch.Tensor | None, *, positions: torch.Tensor, q_len: int, kv_len: int, causal: bool,
                  q_heads: Sequence[int], local_heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask (b|1, 1|hl, q_len, P) of the q_len new queries (positions kv_len - q_len ...) over
    the cached ``positions`` (P,) this rank owns, or None when nothing is masked."""
    if mask is not None and mask.dim() == 4:
        cols = positions.to(mask.device)
        return _additive(_heads(mask, q_heads, local_heads).index_select(-1, cols), dtype)
    keep = None
    if causal and q_len > 1:  # a single new query sees every cached key
        q_pos = torch.arange(kv_len - q_len, kv_len, device=positions.device).unsqueeze(1)
        keep = (positions.unsqueeze(0) <= q_pos).view(1, 1, q_len, -1)
    if mask is not None:
        pad = mask.to(torch.bool).index_select(-1, positions.to(mask.device)).view(mask.shape[0], 1, 1, -1)
        keep = pad if keep is None else keep & pad
    return None if keep is None else _additive(keep, dtype)
