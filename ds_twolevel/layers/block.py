"""A whole pre-norm transformer block on the layout: replicated norms, partitioned attention/MLP."""
from __future__ import annotations

import copy

from torch import nn

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.parallel.layout import TwoLevelAxes, TwoLevelMesh
from ds_twolevel.layers.mlp import TwoLevelMLP
from ds_twolevel.parallel.sequence import sum_replicated_grads


class TwoLevelBlock(nn.Module):
    """Partition of a :class:`~ds_twolevel.testing.reference.DenseBlock`; same forward signature."""

    def __init__(self, attn_norm: nn.Module, attn: TwoLevelAttention, mlp_norm: nn.Module, mlp: TwoLevelMLP) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    @classmethod
    def from_dense(cls, dense, mesh: TwoLevelMesh | TwoLevelAxes, *, sequence_parallel: bool = False,
                   **attn_overrides) -> "TwoLevelBlock":
        """This rank's partition of ``dense``. ``sequence_parallel``: the block takes and returns this
        rank's (b, s/p, H) tokens; the norms act on them and their weight gradients are summed over tp."""
        tp = mesh.axes.tp if isinstance(mesh, TwoLevelMesh) else mesh.tp
        block = cls(copy.deepcopy(dense.attn_norm), TwoLevelAttention.from_dense(dense.attn, mesh, **attn_overrides),
                    copy.deepcopy(dense.mlp_norm), TwoLevelMLP.from_dense(dense.mlp, tp))
        if sequence_parallel:
            block.attn.sequence_parallel = block.mlp.sequence_parallel = True
            sum_replicated_grads([*block.attn_norm.parameters(), *block.mlp_norm.parameters()], tp)
        return block

    def forward(self, x, *, position_embeddings=None, attention_mask=None, kv_cache=None, strategy=None):
        x = x + self.attn(self.attn_norm(x), position_embeddings=position_embeddings,
                          attention_mask=attention_mask, kv_cache=kv_cache, strategy=strategy)
        return x + self.mlp(self.mlp_norm(x))
