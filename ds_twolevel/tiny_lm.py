"""A tiny decoder LM made of :class:`~ds_twolevel.reference.DenseBlock`: the engine tests' model.

It has what matters for DeepSpeed integration — replicated embeddings, norms and LM head around
partitioned attention/MLP, RoPE, optional Q/K norms (parameters sharded over segments but
replicated over head groups) — without depending on ``transformers``. Its injection policy
(:func:`patch_tiny_lm`) and dense export (:func:`tiny_lm_dense_state`) sit beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import TwoLevelAttention
from .block import TwoLevelBlock
from .gather import gather_dense_state
from .layout import TwoLevelMesh
from .mlp import TwoLevelMLP
from .partition import AttentionSpec
from .reference import DenseBlock, RMSNorm
from .rope import rope_cos_sin


@dataclass(frozen=True)
class TinyLMConfig:
    """Shapes of the tiny LM."""

    vocab: int = 64
    """vocabulary size."""
    hidden: int = 32
    """model width H."""
    layers: int = 2
    """transformer blocks."""
    heads: int = 4
    """query heads h."""
    kv_heads: int = 2
    """key/value heads g."""
    head_dim: int = 8
    """d per head."""
    intermediate: int = 64
    """MLP width."""
    qk_norm: bool = True
    """Qwen3-style per-head RMSNorm of q and k."""
    seed: int = 0
    """weights are drawn from this seed."""


class TinyLM(nn.Module):
    """Embedding -> DenseBlocks -> RMSNorm -> LM head; ``forward(ids, labels)`` -> mean CE loss."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.spec = AttentionSpec(cfg.heads, cfg.kv_heads, cfg.head_dim, rope_style="half", name="TinyLM")
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(
            DenseBlock(cfg.hidden, self.spec, cfg.intermediate, qk_norm_eps=1e-6 if cfg.qk_norm else None,
                       layer_idx=i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        x = self.embed(ids)  # (b, s, H)
        pos = torch.arange(s, device=ids.device).expand(b, -1)  # (b, s)
        cos_sin = rope_cos_sin(pos, self.spec, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, position_embeddings=cos_sin)
        return self.lm_head(self.norm(x))  # (b, s, vocab)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token loss of ``labels`` (defaults to ``ids``) if given as a causal LM would."""
        logits = self.logits(ids)
        labels = ids if labels is None else labels
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def patch_tiny_lm(model: TinyLM, mesh: TwoLevelMesh, *, strategy: str = "auto", kv_replication: bool = False) -> int:
    """Replace every DenseBlock by its TwoLevelBlock partition in place; return the count.

    The norms are reused (not copied), so ZeRO-3 partitioned norm weights stay what they are.
    The dense attention/MLP weights must be readable (gathered) while this runs.
    """
    count = 0
    for idx, block in enumerate(model.blocks):
        if isinstance(block, DenseBlock):
            model.blocks[idx] = TwoLevelBlock(
                block.attn_norm,
                TwoLevelAttention.from_dense(block.attn, mesh.axes, strategy=strategy, kv_replication=kv_replication),
                block.mlp_norm, TwoLevelMLP.from_dense(block.mlp, mesh.axes.tp))
            count += 1
    return count


def tiny_lm_dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense state dict (names of the unpatched TinyLM) on every rank; collective over tp."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_children():
        if name != "blocks":
            out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    rename = {"o_bias": "o_proj.bias", "q_norm_weight": "q_norm.weight", "k_norm_weight": "k_norm.weight"}
    for idx, block in enumerate(model.blocks):
        prefix = f"blocks.{idx}"
        if isinstance(block, DenseBlock):
            out.update({f"{prefix}.{k}": v.detach().clone() for k, v in block.state_dict().items()})
            continue
        for norm in ("attn_norm", "mlp_norm"):
            out[f"{prefix}.{norm}.weight"] = getattr(block, norm).weight.detach().clone()
        for k, v in gather_dense_state(block.attn).items():
            out[f"{prefix}.attn.{rename.get(k, k)}"] = v
        for k, v in gather_dense_state(block.mlp).items():
            out[f"{prefix}.mlp.{k}"] = v
    return out
