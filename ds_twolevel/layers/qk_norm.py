"""RMSNorm of q and k on one partition: per head (Qwen3, Gemma3) or over the whole projection (OLMo2).

Rank (i, j) holds hl heads x dl dims of q (gl x dl of k). The mean of squares a norm needs spans more:

* ``scope="head"``: the d dims of each head, i.e. the m segments of head group i. The partial sums
  of squares, (b, hl, s, 1), are all-reduced over the segment axis. The weight (d,) is shared by
  every head: each rank holds its segment's dims, and their gradients are summed over head groups.
* ``scope="projection"``: all h*d features of a token, i.e. every rank of the layer. The partial
  sums, (b, 1, s, 1), are all-reduced over the tensor-parallel axis. With KV heads replicated on
  n/g head groups every k feature is held n/g times, so k's partial sum is divided by n/g first.
  The weight (h*d,) is sliced exactly like the projection's rows (head group, segment): each q
  slice has one owner, each k slice its n/g copies (gradients summed over them).

Weight formula and rounding are data (:class:`QKNorm`): ``w*x`` or ``(1+w)*x`` (Gemma), and whether
the weight multiplies the fp32 normalised value before the cast back (OLMo2, Gemma) or after it
(Llama, Qwen3): identical in fp32, different roundings in bf16/fp16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ds_twolevel.parallel.collectives import all_reduce_both, copy_to_axis
from ds_twolevel.parallel.layout import AxisGroup

NORM_SCOPES = ("head", "projection")


@dataclass(frozen=True)
class QKNorm:
    """How q and k are RMS-normalised (before RoPE).

    Example:
        >>> QKNorm(eps=1e-6, scope="projection", weight_in_float=True)   # OLMo2
    """

    eps: float
    """epsilon added to the mean of squares."""
    scope: Literal["head", "projection"] = "head"
    """"head": over each head's d dims; "projection": over the whole h*d (or g*d) projection."""
    offset: float = 0.0
    """the weight multiplies as ``(offset + w)``: 0 for ``w*x``, 1 for Gemma's ``(1+w)*x``."""
    weight_in_float: bool = False
    """multiply by the (fp32) weight before casting back to the input dtype (OLMo2, Gemma);
    False: cast, then multiply (Llama, Qwen3)."""

    def __post_init__(self) -> None:
        if self.scope not in NORM_SCOPES:
            raise ValueError(f"QKNorm.scope must be one of {NORM_SCOPES}, got {self.scope!r}")
        if not isinstance(self.eps, float) or self.eps < 0:
            raise ValueError(f"QKNorm.eps must be a float >= 0, got {self.eps!r}")


def rms_norm_partition(x: torch.Tensor, weight: torch.Tensor, norm: QKNorm, *, sumsq_axis: AxisGroup,
                       weight_axis: AxisGroup, features: int, copies: int, tag: str) -> torch.Tensor:
    """RMSNorm of this rank's slice ``x`` (b, heads, s, dl), exact w.r.t. the dense norm.

    Args:
        weight: this rank's weight slice, (dl,) per head or (heads * dl,) for the projection.
        sumsq_axis: the ranks holding the rest of the normalised features (segments, or the tp axis).
        weight_axis: the ranks holding copies of this weight slice (their gradients are summed).
        features: features normalised together (d, or h*d / g*d).
        copies: ranks of ``sumsq_axis`` holding each feature (n/g for replicated KV heads, else 1).
        tag: "q" or "k" (collective tags ``{tag}_sumsq``, ``{tag}_norm_weight``).
    """
    dtype = x.dtype
    x32 = x.float()
    dims = (-1,) if norm.scope == "head" else (1, 3)
    partial = x32.pow(2).sum(dims, keepdim=True)  # (b, heads, s, 1) or (b, 1, s, 1)
    if copies > 1:
        partial = partial / copies
    sumsq = all_reduce_both(partial, sumsq_axis, f"{tag}_sumsq")
    x32 = x32 * torch.rsqrt(sumsq / features + norm.eps)
    weight = copy_to_axis(weight, weight_axis, f"{tag}_norm_weight")
    if norm.scope == "projection":
        weight = weight.view(x.shape[1], 1, x.shape[-1])  # (heads, 1, dl): features head-major
    if norm.weight_in_float:
        return (x32 * (weight.float() + norm.offset)).to(dtype)
    return (weight + norm.offset if norm.offset else weight) * x32.to(dtype)
