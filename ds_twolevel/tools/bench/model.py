"""The bench's model: HF Llama blocks rebuilt as TwoLevelBlocks, the HF -> DenseBlock weight mapper,
and the KV-cache helpers the timed decode steps use."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.layers.block import TwoLevelBlock
from ds_twolevel.layers.cache import KVCache
from ds_twolevel.layers.seq_cache import SeqShardCache
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.testing.reference import DenseBlock


class TwoLevelLlama(nn.Module):
    """A Llama model whose blocks are TwoLevelBlocks (embeddings, norm and RoPE from HF, replicated)."""

    def __init__(self, hf_model: nn.Module, mesh, *, strategy: str) -> None:
        super().__init__()
        base, cfg = hf_model.model, hf_model.config
        self.embed, self.norm, self.rotary = copy.deepcopy(base.embed_tokens), copy.deepcopy(base.norm), base.rotary_emb
        spec = AttentionSpec(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, rope_style="half")
        n = mesh.layout.n
        self.blocks = nn.ModuleList(
            TwoLevelBlock.from_dense(dense_block_from_hf(layer, spec, cfg), mesh, strategy=strategy, layer_idx=idx,
                                     kv_replication=n > cfg.num_key_value_heads)
            for idx, layer in enumerate(base.layers))

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = self.embed(ids)  # (b, s, H)
        pos = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        rope = self.rotary(x, pos)
        for block in self.blocks:
            x = block(x, position_embeddings=rope, kv_cache=cache)
        return self.norm(x)

    def strategy_for(self, ids: torch.Tensor, cache: Any = None) -> str:
        """The strategy the first layer runs for ``ids`` against ``cache`` (what "cost_model", a prefill-only
        strategy's fallback or the cache layout resolve to); "helix" for the Helix-style layer."""
        layer = self.blocks[0].attn
        if not isinstance(layer, TwoLevelAttention):
            return "helix"
        hidden = torch.empty(*ids.shape, layer.hidden_size, device="meta")  # shapes only
        return layer.resolve_strategy(layer.attention_call(hidden, None, cache), None, ids.device)


def dense_block_from_hf(layer: nn.Module, spec: AttentionSpec, cfg) -> DenseBlock:
    """A DenseBlock holding the weights of an HF LlamaDecoderLayer."""
    block = DenseBlock(cfg.hidden_size, spec, cfg.intermediate_size, norm_eps=cfg.rms_norm_eps)
    src = layer.state_dict()
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}
    names.update({f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"})
    names.update({f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")})
    block.load_state_dict({ours: src[theirs] for ours, theirs in names.items()})
    return block


def crop_cache(cache: Any, length: int) -> None:
    """Drop what a timed decode step appended (ours, preallocated or not, or a HF DynamicCache)."""
    if isinstance(cache, SeqShardCache):  # O(1): the buffers stay
        for store in cache.stores.values():
            store.crop(length)
    elif isinstance(cache, KVCache):
        for store in (cache.keys, cache.values):
            for idx, t in store.items():
                store[idx] = t[..., :length, :]
    else:  # HF DynamicCache; sliced directly: AutoTP ranks without KV heads report length 0
        for layer in cache.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


def cache_bytes(cache: Any) -> int:
    if isinstance(cache, (KVCache, SeqShardCache)):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def layer_param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
