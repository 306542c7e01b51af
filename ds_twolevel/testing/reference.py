"""Dense reference layers: the computation every partitioned path is compared with.

Written independently of the partitioned code (full heads, full dims, rotate-half RoPE, explicit
softmax), sharing only the mask/dropout helpers so that both see the same mask and random stream.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_twolevel.layers.masks import additive_mask, dropout_keep_mask, zero_unattended_rows
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.layers.qk_norm import QKNorm
from ds_twolevel.layers.rope import apply_rope_dense

from ds_twolevel.layers.activations import ACTIVATIONS  # noqa: E402 (re-exported)


class RMSNorm(nn.Module):
    """Llama/Qwen RMSNorm (computed in fp32); ``offset=1`` gives Gemma's ``(1+w)*x``, and
    ``weight_in_float`` multiplies before the cast back (OLMo2, Gemma)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: float = 0.0, weight_in_float: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset, self.weight_in_float = eps, offset, weight_in_float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return (self.offset + self.weight) * x32.to(dtype)


class DenseAttention(nn.Module):
    """Plain multi-head attention (MHA/GQA/MQA, optional RoPE, Q/K norm, biases, dropout, cache)."""

    def __init__(
        self,
        hidden_size: int,
        spec: AttentionSpec,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        qk_norm: QKNorm | None = None,
        softcap: float | None = None,
        causal: bool = True,
        dropout: float = 0.0,
        dropout_seed: int = 0,
        scaling: float | None = None,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.hidden_size, self.spec = hidden_size, spec
        h, g, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dv
        self.q_proj = nn.Linear(hidden_size, h * d, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, g * d, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, g * dv, bias=qkv_bias)
        self.o_proj = nn.Linear(h * dv, hidden_size, bias=o_bias)
        if qk_norm is None and qk_norm_eps is not None:
            qk_norm = QKNorm(float(qk_norm_eps))
        self.q_norm = self.k_norm = None
        if qk_norm is not None:  # per head: over d; whole projection: over h*d (q) and g*d (k)
            whole = qk_norm.scope == "projection"
            kw = dict(offset=qk_norm.offset, weight_in_float=qk_norm.weight_in_float)
            self.q_norm = RMSNorm(h * d if whole else d, qk_norm.eps, **kw)
            self.k_norm = RMSNorm(g * d if whole else d, qk_norm.eps, **kw)
        self.qkv_bias, self.o_bias, self.qk_norm, self.softcap = qkv_bias, o_bias, qk_norm, softcap
        self.causal, self.dropout, self.dropout_seed, self._dropout_step = causal, dropout, dropout_seed, 0
        self.scaling = scaling if scaling is not None else 1.0 / math.sqrt(d)
        self.layer_idx = layer_idx

    def twolevel_kwargs(self) -> dict[str, Any]:
        """Constructor options a partitioned copy needs."""
        return dict(qkv_bias=self.qkv_bias, o_bias=self.o_bias, qk_norm=self.qk_norm, softcap=self.softcap,
                    causal=self.causal, dropout=self.dropout, dropout_seed=self.dropout_seed,
                    scaling=self.scaling, layer_idx=self.layer_idx)

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Weights under the names TwoLevelAttention.load_dense_state reads."""
        out = {f"{p}.{k}": v for p in ("q_proj", "k_proj", "v_proj") for k, v in getattr(self, p).state_dict().items()}
        out["o_proj.weight"] = self.o_proj.weight
        if self.o_bias:
            out["o_bias"] = self.o_proj.bias
        if self.q_norm is not None:
            out["q_norm_weight"], out["k_norm_weight"] = self.q_norm.weight, self.k_norm.weight
        return {k: v.detach() for k, v in out.items()}

    def grad_state(self) -> dict[str, torch.Tensor]:
        """Gradients under the same names as :meth:`dense_state`."""
        names = {"o_bias": self.o_proj.bias, "q_norm_weight": getattr(self.q_norm, "weight", None),
                 "k_norm_weight": getattr(self.k_norm, "weight", None)}
        out = {}
        for key in self.dense_state():
            param = names.get(key) if key in names else dict(self.named_parameters())[key]
            out[key] = param.grad
        return out

    def forward(self, hidden_states, *, position_embeddings=None, attention_mask=None, kv_cache=None, strategy=None):
        b, s, _ = hidden_states.shape
        h, g, d, dv = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim, self.spec.dv
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)  # (b, s, h*d), (b, s, g*d)
        whole = self.qk_norm is not None and self.qk_norm.scope == "projection"
        if whole:  # OLMo2: one norm over every head's features
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, h, d).transpose(1, 2)  # (b, h, s, d)
        k = k.view(b, s, g, d).transpose(1, 2)  # (b, g, s, d)
        v = self.v_proj(hidden_states).view(b, s, g, dv).transpose(1, 2)  # (b, g, s, dv)
        if self.q_norm is not None and not whole:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.spec.rot_dim:
            cos, sin = position_embeddings
            q, k = apply_rope_dense(q, cos, sin, self.spec), apply_rope_dense(k, cos, sin, self.spec)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx)
        k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)  # (b, h, skv, *)
        scores = q @ k.transpose(-1, -2) * self.scaling  # (b, h, s, skv)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        mask = additive_mask(attention_mask, batch=b, q_len=s, kv_len=k.shape[-2], causal=self.causal,
                             dtype=q.dtype, device=q.device)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if self.training and self.dropout > 0:
            keep = dropout_keep_mask(probs.shape, self.dropout, seed=self.dropout_seed,
                                     step=self._dropout_step, device=probs.device)
            self._dropout_step += 1
            probs = probs * keep / (1.0 - self.dropout)
        out = zero_unattended_rows(probs @ v, attention_mask, causal=self.causal)  # (b, h, s, dv)
        out = out.transpose(1, 2).reshape(b, s, h * dv)  # (b, s, h*dv)
        return self.o_proj(out)


class DenseMLP(nn.Module):
    """Gated (``down(act(gate(x)) * up(x))``, Llama) or plain (``down(act(up(x)))``, GPT/BERT) MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, gated: bool = True,
                 activation: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gated, self.activation, self.bias = gated, activation, bias
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        inner = act(self.gate_proj(x)) * self.up_proj(x) if self.gated else act(self.up_proj(x))
        return self.down_proj(inner)


class DenseBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, hidden_size: int, spec: AttentionSpec, intermediate_size: int, *,
                 gated: bool = True, activation: str = "silu", norm_eps: float = 1e-6,
                 rope_base: float = 10000.0, **attn_kwargs: Any) -> None:
        super().__init__()
        self.rope_base = rope_base
        self.attn_norm = RMSNorm(hidden_size, norm_eps)
        self.attn = DenseAttention(hidden_size, spec, **attn_kwargs)
        self.mlp_norm = RMSNorm(hidden_size, norm_eps)
        self.mlp = DenseMLP(hidden_size, intermediate_size, gated=gated, activation=activation)

    def forward(self, x, *, position_embeddings=None, attention_mask=None, kv_cache=None, strategy=None):
        x = x + self.attn(self.attn_norm(x), position_embeddings=position_embeddings,
                          attention_mask=attention_mask, kv_cache=kv_cache, strategy=strategy)
        return x + self.mlp(self.mlp_norm(x))
