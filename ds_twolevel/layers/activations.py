"""MLP activations by name (what ``TwoLevelMLP(activation=...)`` and the dense reference accept), and the
gated product ``act(gate) * up`` that keeps two tensors for backward instead of three."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class _GatedProduct(torch.autograd.Function):
    """forward: ``act(gate) * up``, keeping ``gate`` and ``up`` only; backward: recompute ``act(gate)``
    and differentiate the same operations autograd would have recorded (bit-identical gradients)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            g = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            u = up.detach().requires_grad_(ctx.needs_input_grad[1])
            out = ctx.act(g) * u
        wanted = [t for t in (g, u) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (next(grads) if g.requires_grad else None), (next(grads) if u.requires_grad else None), None


def gated_product(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` whose backward recomputes ``act(gate)`` instead of storing it: the MLP keeps
    ``gate`` and ``up`` ((b, s, I/p) each) for backward, not a third tensor of that size. The values and
    gradients are those of the plain expression, bit for bit.

    Example:
        >>> inner = gated_product(F.silu, gate_proj(x), up_proj(x))   # (b, s, I/p)
    """
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return act(gate) * up
    return _GatedProduct.apply(gate, up, act)
