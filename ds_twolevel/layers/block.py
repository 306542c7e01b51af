"""A whole pre-norm transformer block on the layout: replicated norms, partitioned attention/MLP."""
from __future__ import annotations

import copy

from torch import nn

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.parallel.layout import TwoLevelAxes, TwoLevelMesh
from ds_twolevel.layers.mlp import TwoLevelMLP


class TwoLevelBlock(nn.Module):
    """Partition of a :class:`~ds_twolevel.testing.reference.DenseBlock`; same forward signature."""

    def __init__(self, attn_norm: nn.Module, attn: TwoLevelAttention, mlp_norm: nn.Module, mlp: TwoLevelMLP) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    @classmethod
    def from_dense(cls, dense, mesh: TwoLevelMesh | TwoLevelAxes, **attn_overrides) -> "TwoLevelBlock":
        tp = mesh.axes.tp if isinstance(mesh, TwoLevelMesh) else mesh.tp
        return cls(copy.deepcopy(dense.attn_norm), TwoLevelAttention.from_dense(dense.attn, mesh, **attn_overrides),
                   copy.deepcopy(dense.mlp_norm), TwoLevelMLP.from_dense(dense.mlp, tp))

    def forward(self, x, *, position_embeddings=None, attention_mask=None, kv_cache=None, strategy=None):
        x = x + self.attn(self.attn_norm(x), position_embeddings=position_embeddings,
                          attention_mask=attention_mask, kv_cache=kv_cache, strategy=strategy)
        return x + self.mlp(self.mlp_norm(x))
