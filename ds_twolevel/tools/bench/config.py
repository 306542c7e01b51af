"""What the bench runs: shapes, repeats, and the attention strategies it iterates."""
from __future__ import annotations

from dataclasses import dataclass

HEADWISE_STRATEGY = "qk_allgather"
"""The strategy name of the m = 1 rows: at m = 1 no strategy issues segment collectives, so every
strategy is the same head-wise TP layer; the rows use the one that keeps fused SDPA."""


def bench_strategies() -> tuple[str, ...]:
    """The attention strategies the bench iterates over: the registry's universal ones (those that run
    every call of the layout benchmark: masks, training, a dimension-layout cache).

    Example:
        >>> "score_allreduce" in bench_strategies()
        True
    """
    from ds_twolevel.strategies import registry

    return registry.universal()


def prefill_strategies() -> tuple[str, ...]:
    """The registry's prefill-only strategies that read a dimension-layout cache (seq_rows): the bench
    times their prefill shards beside the universal ones (a decode would fall back to "cost_model")."""
    from ds_twolevel.strategies import registry

    return tuple(n for n in registry.names() if getattr(registry.get(n), "PREFILL_ONLY", False)
                 and "segments" in registry.layouts(registry.get(n)))


def decode_strategies() -> tuple[str, ...]:
    """The registry's strategies that read only a KV cache held by sequence position (kv_shard): the
    cache, not the layer, selects them, so the bench times their decode shards with a cache in that
    layout beside the universal strategies' dimension-layout ones.

    Example:
        >>> decode_strategies()
        ('kv_shard',)
    """
    from ds_twolevel.strategies import registry

    return tuple(n for n in registry.cache_layout_strategies() if "kv_shard" in registry.layouts(registry.get(n))
                 and not getattr(registry.get(n), "PREFILL_ONLY", False))


def strategies_for(m: int) -> tuple[str, ...]:
    """The strategies a layout with ``m`` segments is benchmarked with (one at m = 1: they coincide)."""
    return (HEADWISE_STRATEGY,) if m == 1 else bench_strategies()


def layout_rows(m: int) -> tuple[tuple[str, str], ...]:
    """(layer strategy, KV-cache layout) of the layout benchmark's rows at ``m`` segments: every universal
    strategy on the dimension-layout cache, each prefill-only one (its decode falls back to "cost_model"),
    and "cost_model" on the cache layout of each strategy the cache selects (kv_shard: its prefill is
    whatever "cost_model" runs).

    Example:
        >>> layout_rows(2)[-1]
        ('cost_model', 'kv_shard')
    """
    from ds_twolevel.strategies import registry

    if m == 1:
        return ((HEADWISE_STRATEGY, "segments"),)
    return (tuple((st, "segments") for st in bench_strategies() + prefill_strategies())
            + tuple((registry.AUTO, registry.layouts(registry.get(st))[0]) for st in decode_strategies()))


DECODE_PHASES = ("decode", "long_decode")
"""the layout benchmark's decode shapes: a short cache, and a long one where reading the KV cache dominates."""


def decode_shapes(cfg: "BenchConfig") -> dict[str, tuple[int, int]]:
    """Phase -> (batch, cached positions) of the layout benchmark's decode steps."""
    return {"decode": (cfg.decode_batch, cfg.decode_seq), "long_decode": cfg.long_decode}


@dataclass(frozen=True)
class BenchConfig:
    """Shapes, repeats and what to run."""

    ranks: int = 4
    """gloo ranks of the layout benchmark (one thread each)."""
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    """g < ranks, so head-wise TP over all ranks needs KV replication."""
    head_dim: int = 64
    intermediate: int = 1024
    layers: int = 2
    vocab: int = 256
    prefill_batch: int = 1
    prefill_seq: int = 256
    decode_batch: int = 4
    decode_seq: int = 1024
    """KV-cache length before the timed decode step."""
    long_decode: tuple[int, int] = (8, 16384)
    """(batch, KV length) of the long-context decode step, where the KV read dominates."""
    generate_new_tokens: int = 64
    """new tokens of the generate() call whose cache layout the cost model picks (the default decode step)."""
    repeats: int = 9
    warmup: int = 2
    autotp: bool = True
    """include DeepSpeed AutoTP (imports deepspeed in every rank, ~20 s)."""
    shard_hidden: int = 1024
    shard_heads: int = 8
    shard_head_dim: int = 128
    """paper-like heads of 128 dims (MHA), narrower model so that one CPU thread can time it."""
    shard_seqs: tuple[int, ...] = (1024, 2048)
    shard_decode: tuple[int, int] = (8, 4096)
    """(batch, KV length) of the decode per-shard measurement."""
    shard_repeats: int = 5
    shard_decode_repeats: int = 15
    """rounds of the decode shards: a step takes milliseconds, so more rounds cost little and the fastest
    is less disturbed by other load on a shared CPU."""
    overhead_seq: int = 1024
    overhead_repeats: int = 30
    seed: int = 0

    @classmethod
    def quick(cls) -> "BenchConfig":
        """Tiny shapes for tests: seconds, not minutes."""
        return cls(ranks=2, hidden=64, heads=4, kv_heads=1, head_dim=16, intermediate=128, layers=1, vocab=32,
                   prefill_seq=16, decode_batch=2, decode_seq=16, long_decode=(2, 64), repeats=2, warmup=1, autotp=False,
                   shard_hidden=64, shard_heads=4, shard_head_dim=16, shard_seqs=(32,), shard_decode=(2, 32),
                   shard_repeats=2, shard_decode_repeats=2, overhead_seq=32, overhead_repeats=3)

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           head_dim=self.head_dim, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                           vocab_size=self.vocab, attn_implementation="sdpa")
