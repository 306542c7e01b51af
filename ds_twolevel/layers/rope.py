"""Rotary position embeddings: the dense form (reference) and the per-segment form."""
from __future__ import annotations

import torch

from ds_twolevel.sharding.partition import AttentionSpec


def rope_cos_sin(
    positions: torch.Tensor, spec: AttentionSpec, *, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, r), one value per rotated dim, HF convention.

    "half": dims t and t + r/2 share a frequency (``cat(freqs, freqs)``); "interleaved": dims
    2t and 2t+1 do (``repeat_interleave(freqs, 2)``); "interleaved_half": dims 2t and 2t+1 rotate, but the
    table is the half layout (``cat(freqs, freqs)``, as GLM4 and Helium receive it).
    """
    r = spec.rot_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, device=positions.device, dtype=torch.float32) / r))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., s, r/2)
    if spec.rope_style == "interleaved":
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., s, r)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    if style in ("interleaved", "interleaved_half"):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_dense(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """RoPE on (b, heads, s, d) with cos/sin (b, s, r): the first r dims rotate, the rest pass."""
    r = spec.rot_dim
    if spec.rope_style == "interleaved_half":  # HF GLM4: the half table's r/2 frequencies, each twice
        cos, sin = (t[..., : r // 2].repeat_interleave(2, dim=-1) for t in (cos, sin))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (b, 1, s, r)
    x_rot, x_pass = x[..., :r], x[..., r:]
    x_rot = x_rot * cos + _rotate(x_rot, spec.rope_style) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


def segment_cos_sin(
    cos: torch.Tensor, sin: torch.Tensor, cos_index: torch.Tensor, sign: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment's (cos, sign*sin), (b, s, d/m): non-rotated dims get cos 1, sin 0."""
    cos_pad = torch.nn.functional.pad(cos, (0, 1), value=1.0)  # (b, s, r+1)
    sin_pad = torch.nn.functional.pad(sin, (0, 1), value=0.0)
    cos_index = cos_index.to(cos.device)  # no-op unless the layer's buffers sit elsewhere (meta init)
    return cos_pad[..., cos_index], sin_pad[..., cos_index] * sign.to(device=sin.device, dtype=sin.dtype)


def apply_rope_segment(
    x: torch.Tensor, cos_seg: torch.Tensor, signed_sin_seg: torch.Tensor, partner: torch.Tensor
) -> torch.Tensor:
    """RoPE on a segment (b, heads, s, d/m): ``x*cos + x[partner]*sign*sin``, exact per dim."""
    return x * cos_seg.unsqueeze(1) + x[..., partner.to(x.device)] * signed_sin_seg.unsqueeze(1)
