"""Fused attention kernels for rows and positions that are not the whole sequence.

Three jobs, each with a public-API path and, on CPU, one through the CPU flash kernel:

* :func:`causal_blocks_attention` - query blocks under a causal mask aligned to the block's *last*
  row (lower right: a block of rows [a, a+B) of a causal prefill sees keys [0, a+B)). On CUDA,
  ``torch.nn.attention.bias.causal_lower_right`` runs the flash / memory-efficient kernels, which
  are lower-right aligned natively. On CPU the same public call materialises the (B, keys) mask
  (bool, then an additive float copy: 80 MiB for one block at s = 8192, m = 2) and runs ~30 % slower,
  so there each block is computed as two fused calls without any mask - the prefix keys
  [0, a) unmasked and the diagonal tile [a, a+B) with ``is_causal`` (upper left = lower right on a
  square) - merged exactly by their log-sum-exps; the backward runs the kernel's own backward on
  each piece with the merged output and log-sum-exp, which is exactly the gradient of the merged
  softmax (the rule ring attention uses).
* :func:`masked_attention` - rows with an explicit additive mask (padding): public SDPA.
* :func:`partial_attention` - kv_shard's per-rank attention over its own positions, returning the
  normalised partial output and its log-sum-exp (fp32) for the exact combine.

Private API (to move to the compat module, version-commented): ``torch.ops.aten.
_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` (torch 2.13; present since 2.3).
They need equal q/k/v head dims (:func:`equal_head_dims` pads) and take GQA (fewer KV heads) natively.
When absent, the public paths run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

_ATEN = torch.ops.aten


def cpu_flash_available(t: torch.Tensor) -> bool:
    """The CPU flash kernel with log-sum-exp output can run on ``t``."""
    return t.device.type == "cpu" and hasattr(_ATEN, "_scaled_dot_product_flash_attention_for_cpu") \
        and hasattr(_ATEN, "_scaled_dot_product_flash_attention_for_cpu_backward")


def equal_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad q/k or v to one head dim (exact: zero dims add nothing to q.k, zero value columns
    are sliced off the output). CPU's fused kernels need d == dv; without it SDPA falls back to the
    math path and materialises the scores."""
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        return F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d)), v
    if dv < d:
        return q, k, F.pad(v, (0, d - dv))
    return q, k, v


def _flash(q, k, v, causal: bool, scale: float):
    """CPU flash forward: (out (b, h, L, dv), lse (b, h, L) fp32)."""
    return _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _pieces(block_rows: int, key_stop: int) -> list[tuple[int, int, bool]]:
    """(key start, key stop, causal) of the fused calls of one lower-right causal block."""
    first = key_stop - block_rows
    return ([(0, first, False)] if first > 0 else []) + [(first, key_stop, True)]


class _CausalBlocksCpu(torch.autograd.Function):
    """forward: lower-right causal attention of each row block (prefix + diagonal tile, merged by
    log-sum-exp); backward: the CPU flash backward of every piece with the merged out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, rows: tuple[int, ...], key_stops: tuple[int, ...], scale: float):
        outs, lses = [], []
        for (r0, r1), stop in zip(_bounds(rows), key_stops):
            parts = [_flash(q[:, :, r0:r1], k[:, :, a:z], v[:, :, a:z], causal, scale)
                     for a, z, causal in _pieces(r1 - r0, stop)]
            out, lse = parts[0] if len(parts) == 1 else _merge(parts)
            outs.append(out), lses.append(lse)
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)  # (b, hl, R, dv), (b, hl, R)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rows, ctx.key_stops, ctx.scale = rows, key_stops, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (r0, r1), stop in zip(_bounds(ctx.rows), ctx.key_stops):
            for a, z, causal in _pieces(r1 - r0, stop):
                gq, gk, gv = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad[:, :, r0:r1], q[:, :, r0:r1], k[:, :, a:z], v[:, :, a:z], out[:, :, r0:r1],
                    lse[:, :, r0:r1], 0.0, causal, scale=ctx.scale)
                dq[:, :, r0:r1] += gq
                dk[:, :, a:z] += gk
                dv[:, :, a:z] += gv
        return dq, dk, dv, None, None, None


def _bounds(rows: tuple[int, ...]) -> list[tuple[int, int]]:
    starts = [sum(rows[:i]) for i in range(len(rows))]
    return [(s, s + r) for s, r in zip(starts, rows)]


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of attention over disjoint key sets from (out, lse) pairs (fp32 weights)."""
    work = torch.promote_types(parts[0][0].dtype, torch.float32)
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)  # (b, h, L)
    out = sum(o.to(work) * (l - lse).exp().to(work).unsqueeze(-1) for o, l in parts)
    return out.to(parts[0][0].dtype), lse


def causal_blocks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[int, ...],
                            key_stops: tuple[int, ...], *, scale: float) -> torch.Tensor:
    """Lower-right causal attention of consecutive row blocks of ``q`` (b, hl, sum(rows), d) over keys
    (b, gl, K, d) / values (b, gl, K, d): block i sees keys [0, key_stops[i]). Fused, no mask tensor
    on CPU; GQA without copying K/V. q, k and v must share one head dim (:func:`equal_head_dims`)."""
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "pad the head dims first (equal_head_dims)"
    if cpu_flash_available(q):
        return _CausalBlocksCpu.apply(q, k, v, tuple(rows), tuple(key_stops), scale)
    outs = []
    for (r0, r1), stop in zip(_bounds(tuple(rows)), key_stops):
        qb, kb, vb = q[:, :, r0:r1], k[:, :, :stop], v[:, :, :stop]
        bias = None if stop == r1 - r0 else causal_lower_right(r1 - r0, stop)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, is_causal=bias is None, scale=scale,
                                                   enable_gqa=kb.shape[1] != qb.shape[1]))
    return torch.cat(outs, 2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                     scale: float) -> torch.Tensor:
    """Fused SDPA of q (b, hl, R, d) over every key with an additive mask (b|1, 1|hl, R, K) or none."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (b, hl, t, d) over this rank's keys (b, gl, P, d) and values (b, gl, P, dv) only:
    (normalised output (b, hl, t, dv), log-sum-exp (b, hl, t) fp32). P may be 0 (output 0, lse -inf).

    On CPU the flash kernel sums scores in fp32 and returns the log-sum-exp. Elsewhere an explicit path
    (scores (b, hl, t, P), small at decode): the matmul runs in the cache's dtype - no fp32 copy of the
    keys, which would triple a decode step's memory traffic - and the softmax in fp32; with 16-bit
    caches the scores are rounded once, as in an eager attention. (With an accelerator at hand, the
    flash / memory-efficient kernels' log-sum-exp outputs are the faster and more exact choice.)
    """
    b, hl, t, _ = q.shape
    dv = v.shape[-1]
    if k.shape[-2] == 0:
        return q.new_zeros(b, hl, t, dv), q.new_full((b, hl, t), float("-inf"), dtype=torch.float32)
    if cpu_flash_available(q) and q.shape[-1] == dv:
        mask = None if mask is None else mask.to(q.dtype).expand(b, -1, t, -1).contiguous()
        return _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    gl = k.shape[1]
    q_grouped = (q * scale).reshape(b, gl, (hl // gl) * t, -1)  # (b, gl, hl/gl*t, d): GQA, no K copy
    scores = (q_grouped @ k.transpose(-1, -2)).view(b, hl, t, -1).float()  # (b, hl, t, P)
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, -1)  # (b, hl, t)
    probs = (scores - lse.unsqueeze(-1)).exp().to(v.dtype).reshape(b, gl, (hl // gl) * t, -1)
    return (probs @ v).view(b, hl, t, dv), lse
