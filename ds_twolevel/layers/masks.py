"""Attention masks as one additive float tensor (b, 1|heads, s_q, s_kv), and the rows they leave empty.

Fully masked query rows (a sequence whose attention mask is all zeros; left padding under a causal
mask) follow the mask's kind, as Hugging Face's two attention paths do:

- a *boolean* mask (a 2-D 0/1 padding mask, or the 4-D boolean mask transformers builds for
  ``attn_implementation="sdpa"``): a row that may attend to no key outputs **zeros** (and passes
  no gradient), as ``torch.nn.functional.scaled_dot_product_attention`` does since torch 2.5;
- an *additive* float mask (what transformers builds for ``"eager"``): used as given, so a row
  masked with ``finfo.min`` everywhere attends uniformly to every key, as HF's eager softmax does.
"""
from __future__ import annotations

import torch


def additive_mask(
    attention_mask: torch.Tensor | None,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Normalise a mask to additive form; None when nothing is masked.

    ``attention_mask`` may be None, a 2-D padding mask (b, s_kv) with 1 = attend, or a 4-D mask
    (b, 1|heads, s_q, s_kv), boolean (True = attend) or additive float (used as given; causality
    is then the caller's). Masked positions get ``finfo.min`` rather than -inf, as Hugging Face
    does, so fully padded query rows give finite (uniform) rows instead of NaN.
    """
    low = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.zeros((), dtype=dtype, device=device).masked_fill(~attention_mask, low)
        return attention_mask.to(dtype)
    keep = None
    if causal:
        # queries are the last q_len positions of the kv_len keys (KV cache)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
        keep = torch.arange(kv_len, device=device).unsqueeze(0) <= q_pos  # (s_q, s_kv)
        keep = keep.view(1, 1, q_len, kv_len)
    if attention_mask is not None:
        if attention_mask.shape != (batch, kv_len):
            raise ValueError(
                f"2-D attention_mask must be (batch, kv_len) = ({batch}, {kv_len}), "
                f"got {tuple(attention_mask.shape)}"
            )
        pad_keep = attention_mask.to(torch.bool).view(batch, 1, 1, kv_len)
        keep = pad_keep if keep is None else keep & pad_keep
    if keep is None:
        return None
    return torch.zeros((), dtype=dtype, device=device).masked_fill(~keep, low)


def dropout_keep_mask(
    shape: tuple[int, ...], p: float, *, seed: int, step: int, device: torch.device
) -> torch.Tensor:
    """Boolean keep-mask for attention dropout over all heads, drawn from one seeded stream.

    Every rank of a layer draws the same full (b, h, s_q, s_kv) mask and slices its own heads,
    so the m ranks of a segment group drop the same probabilities (training stays exact) and the
    dense reference drops the same ones too.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + step)
    return torch.rand(shape, generator=gen, device=device) >= p


def zero_unattended_rows(out: torch.Tensor, attention_mask: torch.Tensor | None, *, causal: bool,
                         heads: list[int] | None = None) -> torch.Tensor:
    """``out`` (b, hl, s_q, dv) with the query rows a boolean mask lets attend to no key set to 0.

    ``attention_mask`` is what :func:`additive_mask` accepted. Additive float masks and ``None``
    leave ``out`` unchanged (see the module docstring). ``heads``: this rank's heads, for a 4-D
    mask given per head for all h heads. No host synchronisation: one elementwise fill.

    Example:
        >>> out = zero_unattended_rows(out, torch.zeros(2, 5), causal=True)   # every row of both sequences -> 0
    """
    if attention_mask is None or (attention_mask.dim() == 4 and attention_mask.dtype != torch.bool):
        return out
    if attention_mask.dim() == 4:
        empty = ~attention_mask.any(dim=-1, keepdim=True)  # (b, 1|h, s_q, 1)
        if empty.shape[1] not in (1, out.shape[1]) and heads is not None:
            empty = empty[:, heads]
        return out.masked_fill(empty.to(out.device), 0)
    batch, kv_len = attention_mask.shape
    q_len = out.shape[-2]
    keep = attention_mask.to(device=out.device, dtype=torch.bool)  # (b, kv_len)
    if not causal:
        return out.masked_fill(~keep.any(dim=-1).view(batch, 1, 1, 1), 0)
    # causal: queries are the last q_len of the kv_len positions (KV cache); a query sees no key iff it
    # comes before the first kept key. O(b * (s_q + s_kv)) memory, never a (s_q, s_kv) tensor.
    first = torch.where(keep.any(dim=-1), keep.to(torch.uint8).argmax(dim=-1), kv_len)  # (b,) first kept key
    q_pos = torch.arange(kv_len - q_len, kv_len, device=out.device)
    return out.masked_fill((q_pos.view(1, q_len) < first.view(batch, 1)).view(batch, 1, q_len, 1), 0)
