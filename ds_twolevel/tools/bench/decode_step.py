"""One rank's whole decode step of a model (every block: attention and MLP) on simulated axes, for each
layout the layout benchmark has (head-wise TP, two-level on both cache layouts with ``cost_model``, the
Helix-style layer), against the dense model's step on one device: the end-to-end decode of
``recipes/bench_gpu_shard.py``.

As in :mod:`~ds_twolevel.tools.bench.shard`, the collectives of simulated axes run local ops of the same
output shapes, so the time is exactly one rank's compute of a decode step (rank (0, 0): in the kv_shard and
Helix-style layouts it holds the most positions); the ideal is the dense step / (number of ranks). The
caches are preallocated and filled with random keys and values in each layout's shape (exactness is
the layout benchmark's part, on ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ds_twolevel.layers.block import TwoLevelBlock
from ds_twolevel.layers.seq_cache import SeqShardCache
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.strategies import registry
from ds_twolevel.testing.reference import DenseBlock
from ds_twolevel.tools.bench.helix import HelixAttention
from ds_twolevel.tools.bench.model import crop_cache
from ds_twolevel.tools.bench.shard import rounds_ms, simulated_axes


@dataclass(frozen=True)
class DecodeModel:
    """The model and shape of the end-to-end decode step."""

    hidden: int
    spec: AttentionSpec
    intermediate: int
    layers: int
    batch: int
    seq: int
    """cached positions before the step."""
    gated: bool = False
    """a plain MLP (the paper's experiment, as the cost model's paper section assumes) unless True."""
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


DecodeLayout = tuple[str, int, int, str]
"""(family, n, m, KV-cache layout): family "dense", "head-wise", "two-level" or "helix" (m = kvp)."""


def decode_layouts(ranks: int, spec: AttentionSpec) -> list[DecodeLayout]:
    """Every layout of ``ranks`` the step is timed on: head-wise TP (n = ranks), two-level at every m > 1 on
    both cache layouts, the Helix-style layer at every n | g with kvp = ranks / n >= 2.

    Example:
        >>> decode_layouts(4, AttentionSpec(8, 2, 64))[:2]
        [('dense', 1, 1, 'segments'), ('head-wise', 4, 1, 'segments')]
    """
    fits = lambda n, m: not (spec.num_heads % n or (spec.head_dim // 2) % m)  # noqa: E731
    out: list[DecodeLayout] = [("dense", 1, 1, "segments"), ("head-wise", ranks, 1, "segments")]
    for m in (m for m in range(2, ranks + 1) if ranks % m == 0 and fits(ranks // m, m)):
        n = ranks // m
        if spec.num_kv_heads % n == 0 or n % spec.num_kv_heads == 0:
            out += [("two-level", n, m, layout) for layout in ("segments", "kv_shard")]
    out += [("helix", n, ranks // n, "kv_shard") for n in range(1, spec.num_kv_heads + 1)
            if spec.num_kv_heads % n == 0 and spec.num_heads % n == 0 and ranks % n == 0 and ranks // n >= 2]
    return out


def _blocks(dense: list[DenseBlock], case: DecodeModel, family: str, n: int, m: int) -> nn.ModuleList:
    axes = simulated_axes(n, m)
    blocks = nn.ModuleList()
    for idx, block in enumerate(dense):
        shard = TwoLevelBlock.from_dense(block, axes, strategy=registry.AUTO, layer_idx=idx,
                                         kv_replication=n > case.spec.num_kv_heads)
        if family == "helix":
            shard.attn = HelixAttention(block.attn, case.spec, axes, layer_idx=idx)
        blocks.append(shard)
    return blocks.to(case.device, case.dtype).eval()


def random_cache(blocks: nn.ModuleList, case: DecodeModel, layout: str) -> SeqShardCache:
    """Rank (0, 0)'s preallocated cache of every block with random keys / values of ``case.seq`` positions."""
    m = blocks[0].attn.axes.seg.size
    own = -(-case.seq // m)
    cache = SeqShardCache(layout=layout, capacity=(case.seq if layout == "segments" else own) + 1)
    for idx, block in enumerate(blocks):
        attn = block.attn
        if isinstance(attn, HelixAttention):
            heads, dk, dv = len(attn.kv_heads), case.spec.head_dim, case.spec.dv
        else:
            heads, dk, dv = attn.part.local_kv_heads, attn.part.local_dim, attn.part.local_v_dim
            if layout != "segments":
                dk, dv = case.spec.head_dim, case.spec.dv
        rand = lambda w, s: torch.randn(case.batch, heads, s, w, device=case.device, dtype=case.dtype)  # noqa: E731
        if layout == "segments":
            cache.update(rand(dk, case.seq), rand(dv, case.seq), idx)
        else:
            store = cache.position_store(idx, m, attn.axes.seg.rank)
            store.append(rand(dk, own), rand(dv, own))
            store.global_length = case.seq
    return cache


def _step(blocks: nn.ModuleList, cache: SeqShardCache, x: torch.Tensor, rope, seq: int):
    def step() -> torch.Tensor:
        y = x
        for block in blocks:
            y = block(y, position_embeddings=rope, kv_cache=cache)
        crop_cache(cache, seq)
        return y
    return step


def _ran(blocks: nn.ModuleList, cache: SeqShardCache, x: torch.Tensor) -> str:
    attn = blocks[0].attn
    if isinstance(attn, HelixAttention):
        return "helix"
    return attn.resolve_strategy(attn.attention_call(x, None, cache), None, x.device)


def time_decode_steps(case: DecodeModel, layouts: list[DecodeLayout], repeats: int, seed: int = 0) -> list[dict]:
    """Fastest of ``repeats`` decode steps of each layout's rank (0, 0), built and timed one at a time (an
    accelerator holds one paper-sized cache at once); rows with the ratio to the dense step / (n m)."""
    from ds_twolevel.layers.rope import rope_cos_sin

    torch.manual_seed(seed)
    dense = [DenseBlock(case.hidden, case.spec, case.intermediate, gated=case.gated) for _ in range(case.layers)]
    device = torch.device(case.device)
    x = torch.randn(case.batch, 1, case.hidden, device=device, dtype=case.dtype)
    rope = rope_cos_sin(torch.full((case.batch, 1), case.seq, device=device), case.spec, dtype=case.dtype)
    rows = []
    with torch.no_grad():
        for family, n, m, layout in layouts:
            blocks = _blocks(dense, case, family, n, m)
            cache = random_cache(blocks, case, layout)
            ran = _ran(blocks, cache, x)
            ms = min(rounds_ms([_step(blocks, cache, x, rope, case.seq)], repeats, device)[0])
            rows.append({"family": family, "n": n, "m": m, "cache_layout": layout, "ran": ran, "batch": case.batch,
                         "seq": case.seq, "layers": case.layers, "ms": ms, "kv_bytes": cache.nbytes()})
            del blocks, cache
    dense_ms = rows[0]["ms"] if rows and rows[0]["family"] == "dense" else float("nan")
    for r in rows:
        r["dense_ms"], r["ratio_to_ideal"] = dense_ms, r["ms"] / (dense_ms / (r["n"] * r["m"]))
    return rows
