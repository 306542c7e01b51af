"""MLP activations by name (what ``TwoLevelMLP(activation=...)`` and the dense reference accept), and the
gated MLP's tail ``(act(gate) * up) @ W_down^T`` that keeps ``gate`` and ``up`` for backward and
recomputes the elementwise part there (no matmul is recomputed)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class _GatedDown(torch.autograd.Function):
    """forward: ``(act(gate) * up) @ weight^T``, keeping ``gate``, ``up`` and ``weight``; backward:
    recompute ``act(gate)`` (elementwise), then the gradients the unfused expression's autograd computes,
    in its order, each temporary freed as soon as it is used."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up, weight)
        return F.linear(act(gate) * up, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            g = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            activated = ctx.act(g)  # (..., I/p)
        a = activated.detach()
        grad_weight = None
        if ctx.needs_input_grad[2]:  # (H, I/p), as linear's backward gives it; the product is freed at once
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm((a * up).reshape(-1, a.shape[-1]))
        grad_inner = grad.matmul(weight)  # (..., I/p)
        grad_up = grad_inner * a if ctx.needs_input_grad[1] else None  # mul's backward, in autograd's order
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_inner = grad_inner * up  # the gradient of act(gate)
            (grad_gate,) = torch.autograd.grad(activated, g, grad_inner)
        return grad_gate, grad_up, grad_weight, None


class GatedDownProj(torch.nn.Linear):
    """The gated MLP's row-parallel ``down_proj``: ``down_proj(inner)`` is a plain linear layer;
    ``down_proj(gate, up, act)`` computes ``(act(gate) * up) @ W^T`` keeping only ``gate`` and ``up``
    ((b, s, I/p) each) for backward, where the unfused expression keeps act(gate) and the product too.
    A module call, so hooks on the projection (ZeRO-3's parameter gathering) see it.

    Example:
        >>> down = GatedDownProj(1024, 256, bias=False)
        >>> y = down(gate_proj(x), up_proj(x), F.silu)   # (b, s, 256)
    """

    def forward(self, x: torch.Tensor, up: torch.Tensor | None = None,
                act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        if up is None:
            return super().forward(x)
        if self.bias is not None:
            raise ValueError("GatedDownProj(gate, up, act) takes no bias: add it after the sum over ranks")
        if not torch.is_grad_enabled() or not (x.requires_grad or up.requires_grad or self.weight.requires_grad):
            return F.linear(act(x) * up, self.weight)
        return _GatedDown.apply(x, up, self.weight, act)
