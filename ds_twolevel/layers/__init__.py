"""The partitioned layers: attention, MLP, block, RoPE, masks, KV caches."""
