"""Sequence-sharded strategies (seq_rows, kv_shard) and the preallocated KV cache vs the dense layers.

Pure tests first (row / position math, the cache buffers, the fused kernels, the cost functions,
refusals, an allocation account), then ONE 8-rank gloo launch that runs every distributed case:
layouts n x m in {1x2, 2x2, 1x4, 2x4} (dp = 8 / (n m), each replica on its own batch) x attention
configurations; every case compares with :class:`ds_twolevel.testing.reference.DenseAttention` (or the
unpatched Hugging Face model) on the same weights and inputs and records the collectives it counted
next to the ones the strategy registry models. The tests below only compare.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.layers.cache import KVCache
from ds_twolevel.parallel.collectives import CommCounter, all_gather_dim
from ds_twolevel.costmodel import ModelConfig
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelAxes, TwoLevelLayout
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.testing.reference import DenseAttention
from ds_twolevel.layers.rope import rope_cos_sin
from ds_twolevel.costmodel import attention_collectives as layer_collectives
from ds_twolevel.layers.attention import SeqShardAttention
from ds_twolevel.layers.seq_cache import GrowingKV, PositionShardedKV, SeqShardCache
from ds_twolevel.strategies import fused, kv_shard, seq_rows
from ds_twolevel.strategies.base import AttentionCall as SeqCall
from ds_twolevel.strategies.rows import first_owned, owned_count, plan_rows
from ds_twolevel.testing import rel_err, run_distributed

WORLD = 8
TOL = 1e-5
HIDDEN = 32
BATCH = 3
LAYOUTS = [(1, 2), (2, 2), (1, 4), (2, 4)]  # (n, m); dp = 8 / (n m)
HF_ARCHS = ("llama", "qwen3", "gpt_neox")
HF_CASES = [((2, 2), arch) for arch in HF_ARCHS] + [((1, 4), "llama")]
"""(layout, architecture) of the Hugging Face cases (each generates 6 times: the launch's largest cost)."""
CONTEXTS = (256, 1024, 4096)
"""s_kv of the decode byte-count cases (kv_shard traffic must not depend on it)."""


@dataclass(frozen=True)
class Attn:
    """One attention configuration of the matrix."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int = 16
    rope: str = "half"
    rotary_dim: int | None = None
    qk_norm: bool = False
    bias: bool = False
    causal: bool = True
    padding: bool = False
    v_head_dim: int | None = None
    seq: int = 16
    """prefill rows: 16 divides into 2m blocks for every m of the matrix; 7 and 10 need padding rows."""

    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.heads, self.kv_heads, self.head_dim, v_head_dim=self.v_head_dim,
                             rope_style=self.rope, rotary_dim=self.rotary_dim, name=self.name)

    def dense(self) -> DenseAttention:
        torch.manual_seed(1234)
        dense = DenseAttention(HIDDEN, self.spec(), qkv_bias=self.bias, o_bias=self.bias, causal=self.causal,
                               qk_norm_eps=1e-6 if self.qk_norm else None)
        with torch.no_grad():  # non-trivial norm weights so that their gradients are checked for real
            for p in dense.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        return dense


ATTNS = [
    Attn("mha_rope", 8, 8),
    Attn("gqa_rope", 8, 2),
    Attn("gqa_qknorm_bias_norope", 8, 2, rope="none", qk_norm=True, bias=True),
    Attn("mqa_interleaved_padded_kvrep", 8, 1, rope="interleaved", padding=True),  # n = 2 > g = 1: KV replicated
    Attn("mha_partial_rotary_vdim", 8, 8, rotary_dim=8, v_head_dim=8),
    Attn("gqa_uneven_rows", 8, 2, seq=7),  # 7 rows: padded to 2m blocks
    Attn("gqa_padded_uneven", 8, 4, padding=True, seq=10),
    Attn("bidirectional_padded", 8, 4, rope="none", causal=False, padding=True, bias=True),
]


# ==================================================================================================
# pure tests (no process group)
# ==================================================================================================
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("q_len", [1, 7, 16, 33, 64])
def test_zigzag_plan_covers_every_row_once_with_equal_work(m, q_len):
    plan = plan_rows(m, q_len, q_len, causal=True)
    rows = sorted(r for rank in range(m) for b in plan.blocks(rank) for r in range(b.start, b.start + b.rows))
    assert rows == list(range(plan.padded_len)) and plan.padded_len - q_len < plan.num_blocks
    # visible (query, key) pairs per rank under the lower-right causal mask of each block
    work = [sum(b.rows * b.key_stop - b.rows * (b.rows - 1) // 2 for b in plan.blocks(rank)) for rank in range(m)]
    assert len(set(work)) == 1, work
    assert sorted(plan.order) == list(range(plan.num_blocks))


def test_masked_plan_is_contiguous_rows():
    plan = plan_rows(4, 10, 10, causal=False)
    assert plan.padded_len == 12 and plan.padded_kv_len == 10
    assert [(b.start, b.rows, b.key_stop) for r in range(4) for b in plan.blocks(r)] == \
        [(0, 3, 10), (3, 3, 10), (6, 3, 10), (9, 3, 10)]


def test_position_ownership_is_round_robin():
    assert [owned_count(10, j, 4) for j in range(4)] == [3, 3, 2, 2]
    assert [first_owned(10, j, 4) for j in range(4)] == [2, 3, 0, 1]
    store = PositionShardedKV(m=4, rank=1, chunk=4)
    k = torch.arange(10.0).view(1, 1, 10, 1)
    store.append_positions(k, k)  # positions 0..9 -> keeps 1, 5, 9
    store.append_positions(torch.tensor([[[[10.0]]]]), torch.tensor([[[[10.0]]]]))  # 10: rank 2's
    store.append_positions(torch.tensor([[[[11.0], [12.0]]]]), torch.tensor([[[[11.0], [12.0]]]]))
    assert store.keys.flatten().tolist() == [1.0, 5.0, 9.0] and store.global_length == 13
    assert store.positions().tolist() == [1, 5, 9]
    store.crop(6)
    assert store.keys.flatten().tolist() == [1.0, 5.0] and store.global_length == 6


def test_growing_cache_appends_in_place_and_matches_concatenation():
    store, ref_k, ptrs = GrowingKV(chunk=8), None, set()
    gen = torch.Generator().manual_seed(0)
    for step in range(100):
        k = torch.randn(2, 3, 5 if step == 0 else 1, 4, generator=gen)
        keys, values = store.append(k, 2 * k)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], 2)
        ptrs.add(store._k.data_ptr())
        assert torch.equal(keys, ref_k) and torch.equal(values, 2 * ref_k)
    assert len(ptrs) <= 5, f"{len(ptrs)} reallocations for 104 positions (capacity doubles from 8)"
    assert store.capacity >= store.length == 104 and store.nbytes() == 2 * ref_k.numel() * 4
    store.select_batch(torch.tensor([1, 1, 0]))
    assert torch.equal(store.keys, ref_k[[1, 1, 0]])
    store.repeat_batch(2)
    assert torch.equal(store.keys, ref_k[[1, 1, 0]].repeat_interleave(2, 0))
    store.crop(50)
    assert store.keys.shape[-2] == 50 and store.append(store.keys[:, :, :1], store.values[:, :, :1])[0].shape[-2] == 51
    with pytest.raises(ValueError, match="reset the cache"):
        store.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


def _reference_causal_rows(q, k, v, rows):
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.25)
    return torch.cat([full[:, :, a:z] for a, z in rows], 2)


@pytest.mark.parametrize("path", ["cpu_flash", "public"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_blocks_kernel_matches_sdpa_forward_and_backward(monkeypatch, path, dtype):
    if path == "public":  # the path accelerators take: causal_lower_right per block
        monkeypatch.setattr(fused, "cpu_flash_available", lambda t: False)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 32, 16, generator=gen, dtype=dtype) for h in (4, 2, 2))  # GQA 4 / 2
    blocks = [(0, 4), (28, 32), (8, 12), (20, 24)]  # zigzag blocks of ranks 0 and 2 of m = 4
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    q_rows = torch.cat([leaves[0][:, :, a:z] for a, z in blocks], 2)
    out = fused.causal_blocks_attention(q_rows, leaves[1], leaves[2], (4,) * 4, tuple(z for _, z in blocks),
                                        scale=0.25)
    ref = _reference_causal_rows(refs[0], refs[1], refs[2], blocks)
    grad = torch.randn_like(ref)
    out.backward(grad), ref.backward(grad)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, refs)]:
        assert rel_err(got, want) <= tol


@pytest.mark.parametrize("explicit", [False, True])
def test_partial_attention_and_combine_are_exact(monkeypatch, explicit):
    if explicit:
        monkeypatch.setattr(fused, "cpu_flash_available", lambda t: False)
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    mask = torch.zeros(2, 1, 1, 9)
    mask[1, ..., :3] = torch.finfo(torch.float32).min
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
    parts = [fused.partial_attention(q, k[:, :, j::3], v[:, :, j::3], mask[..., j::3], scale=0.3) for j in range(3)]
    weights = torch.softmax(torch.stack([lse for _, lse in parts]), 0)
    got = sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts))
    assert rel_err(got, want) <= 1e-6
    empty = fused.partial_attention(q, k[:, :, :0], v[:, :, :0], None, scale=0.3)
    assert torch.equal(empty[0], torch.zeros_like(q)) and bool(torch.isinf(empty[1]).all())


def test_lse_rides_exactly_in_16_bit_payloads():
    lse = torch.tensor([[1.2345678, -3.75e4, float("-inf")]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cols = kv_shard._lse_payload(lse, dtype)
        assert cols.dtype == dtype and cols.shape[-1] == kv_shard.lse_columns(cols.element_size())
        assert torch.equal(kv_shard._lse_from_payload(cols), lse)


def _call(**kw) -> SeqCall:
    base = dict(batch=2, q_len=2048, kv_len=2048, hidden=4096, local_heads=16, local_kv_heads=4, head_dim=128, m=2,
                n=2, causal_blocks=True, plain_causal=True)
    base.update(kw)
    return SeqCall(**base)


def test_seq_rows_traffic_formula():
    c = _call()
    sent = sum(col.bytes_sent(1) for col in seq_rows.collectives(c))  # elements (1 byte each)
    m, b, s, hl, gl, d = c.m, c.batch, c.q_len, c.local_heads, c.local_kv_heads, c.head_dim
    # (m-1)/m of: the q and output all-to-alls (b hl s (d + dv)/m) and the full-width k, v gathers
    assert sent == (m - 1) * b * s * (hl * 2 * d // m + gl * 2 * d) // m
    assert seq_rows.collectives(_call(m=1)) == []
    padded = seq_rows.collectives(_call(q_len=2047, kv_len=2047))  # rows padded to 2m blocks, keys as many
    assert {col.tag: col.numel for col in padded}["k"] == 2 * 4 * 2048 * 128


def test_kv_shard_traffic_does_not_depend_on_context():
    cols = {kv: kv_shard.collectives(_call(q_len=1, kv_len=kv, cache_layout="kv_shard", cached=kv - 1, m=4))
            for kv in (4097, 131073)}
    assert cols[4097] == cols[131073]
    bf16 = kv_shard.collectives(_call(q_len=1, kv_len=99, cache_layout="kv_shard", cached=98, m=4, element_size=2))
    assert {c.tag: c.numel for c in bf16}["partial_out"] == 4 * 2 * 16 * (128 // 4 + 2)


def test_applies_and_refusals():
    assert seq_rows.applies(_call()) and not seq_rows.applies(_call(q_len=1, kv_len=9))
    assert "dropout" in seq_rows.why_not(_call(dropout=True))
    assert not seq_rows.applies(_call(cache_layout="kv_shard", cached=5, kv_len=2053))
    assert seq_rows.applies(_call(cache_layout="kv_shard", cached=0))
    decode = _call(q_len=1, kv_len=10, cache_layout="kv_shard", cached=9)
    assert kv_shard.applies(decode) and not kv_shard.applies(_call(q_len=1, kv_len=10, cached=9))
    assert "inference only" in kv_shard.why_not(_call(q_len=1, kv_len=10, cache_layout="kv_shard", cached=9, grad=True))


def test_activation_memory_has_no_quadratic_term():
    model = ModelConfig("m", hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=128, layers=1)

    def act(s: int, **kw) -> float:
        return seq_rows.activation_bytes(model, _call(q_len=s, kv_len=s, local_heads=16, local_kv_heads=4, **kw), 2)

    assert act(65536) < 2.01 * act(32768)  # linear in s (the fused kernel keeps no (s, s) tensor)
    masked = act(8192, causal_blocks=False, plain_causal=False) - act(8192)
    assert masked == 2 * 4096 * 8192 * 2  # a padding mask costs this rank's rows of it only: b x s/m x s_kv


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op creates (the allocation account of a forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("padding", [False, True])
def test_seq_rows_shard_creates_no_score_sized_tensor(padding):
    """One rank's shard (m = 4, simulated segment axis) at s = 1024: the largest tensor any op creates is
    the gathered full-width K (b g s d) - or, with a padding mask, this rank's rows of the additive mask
    (b x 256 x 1024) - never the rank's scores (b h 256 x 1024)."""
    s, m, spec = 1024, 4, AttentionSpec(4, 2, 32, rope_style="half")
    axes = TwoLevelAxes(seg=AxisGroup("m", m, 1), heads=AxisGroup("n", 1, 0), tp=AxisGroup("tp", m, 1))
    layer = SeqShardAttention(64, spec, axes).eval()
    x = torch.randn(1, s, 64)
    mask = torch.ones(1, s, dtype=torch.long) if padding else None
    if padding:
        mask[0, :5] = 0
    with torch.no_grad(), _LargestTensor() as account:
        layer(x, position_embeddings=rope_cos_sin(torch.arange(s)[None], spec), attention_mask=mask)
    rows_x_keys = (s // m) * s
    assert account.largest == (rows_x_keys if padding else s * spec.num_kv_heads * spec.head_dim), account.largest
    assert account.largest < spec.num_heads * rows_x_keys


def test_refusals_before_any_collective():
    spec = AttentionSpec(4, 2, 8, rope_style="half")
    layer = SeqShardAttention(16, spec, TwoLevelAxes.single(), dropout=0.1).train()
    x, rope = torch.randn(1, 6, 16), rope_cos_sin(torch.arange(6)[None], spec)
    with pytest.raises(ValueError, match="dropout"):
        layer(x, position_embeddings=rope)
    layer.dropout = 0.0
    cache = SeqShardCache(layout="kv_shard")
    with torch.no_grad():
        layer(x, position_embeddings=rope, kv_cache=cache)
    with pytest.raises(ValueError, match="inference only"):  # a decode step under autograd
        layer(x[:, :1], position_embeddings=rope_cos_sin(torch.tensor([[6]]), spec), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_shard"):
        cache.update(x, x, 0)


def test_hf_cache_layers_follow_generate_contract():
    from hf_integration.seqshard import TwoLevelCache

    cache = TwoLevelCache(chunk=4)
    k = torch.randn(3, 2, 5, 4)
    keys, _ = cache.update(k, k, 0)
    cache.update(k[:, :, :1], k[:, :, :1], 1)
    assert cache.get_seq_length() == 5 and cache.get_mask_sizes(1, 0) == (6, 0) and torch.equal(keys, k)
    cache.update(k[:, :, :2], k[:, :, :2], 0)
    cache.crop(-2)
    assert cache.get_seq_length() == 5 and torch.equal(cache.layers[0].keys, k)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.layers[0].keys, k[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([True, False, True]))
    assert torch.equal(cache.layers[0].keys, k[[2, 1]])
    sharded = TwoLevelCache(layout="kv_shard")
    store = sharded.position_store(0, 2, 1)
    store.append_positions(k, k)
    assert sharded.get_seq_length() == 5 and sharded.layers[0].keys.shape[-2] == 2
    with pytest.raises(ValueError, match="use_seqshard"):
        sharded.update(k, k, 1)
    with pytest.raises(ValueError, match="segment rank"):
        sharded.position_store(0, 2, 0)


# ==================================================================================================
# the 8-rank launch
# ==================================================================================================
def _key(r) -> tuple:
    return (r.op, r.axis, r.tag, int(r.numel), int(r.ranks), bool(r.backward))


def _modelled(attn: Attn, mesh, strategy: str, *, q_len: int, kv_len: int, cached: int, masked: bool,
              backward: bool, layout: str = "segments") -> list[tuple]:
    """The collectives modelled for a call, from the configuration's numbers (not from the layer)."""
    n, m, g = mesh.axes.n, mesh.axes.m, attn.kv_heads
    call = SeqCall(batch=BATCH, q_len=q_len, kv_len=kv_len, hidden=HIDDEN, local_heads=attn.heads // n,
                   local_kv_heads=max(g // n, 1), head_dim=attn.head_dim, m=m, n=n, qk_norm=attn.qk_norm, kv_rep=max(n // g, 1), qkv_bias=attn.bias, v_head_dim=attn.v_head_dim,
                   causal_blocks=attn.causal and not masked and cached == 0, plain_causal=attn.causal and not masked,
                   cache_layout=layout, cached=cached)
    return sorted(_key(c) for c in layer_collectives(call, strategy, backward=backward))


def _inputs(attn: Attn, seed: int, q_len: int, start: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, q_len, HIDDEN, generator=gen)
    spec = attn.spec()
    rope = rope_cos_sin(torch.arange(start, start + q_len).expand(BATCH, -1), spec) if spec.rot_dim else None
    mask = None
    if attn.padding:
        mask = torch.ones(BATCH, start + q_len, dtype=torch.long)
        mask[1, :2] = 0  # left padding, as batched generation does
        mask[2, :1] = 0
    return x, rope, mask


def _grad_errors(layer, dense: DenseAttention) -> dict[str, float]:
    """Every gradient shard vs the slice of the dense gradient (denominators floored at 1e-3 of the
    layer's largest gradient: the key bias's true gradient is zero, see test_core_distributed)."""
    grads = dense.grad_state()
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    out = {f"grad:{name}": rel_err(layer.get_parameter(name).grad, grads[name].index_select(dim, index),
                                   floor=1e-3 * scale) for name, (index, dim) in layer.shard_index().items()}
    if layer.o_bias is not None:
        out["grad:o_bias"] = rel_err(layer.o_bias.grad, dense.o_proj.bias.grad)
    return out


def _seq_rows_case(mesh, attn: Attn) -> dict:
    dense = attn.dense()
    layer = SeqShardAttention.from_dense(dense, mesh, kv_replication=mesh.axes.n > attn.kv_heads)
    x, rope, mask = _inputs(attn, 100 + mesh.axes.dp.rank, attn.seq)
    weight = torch.linspace(-1, 1, HIDDEN) * (1.0 if mask is None else mask.unsqueeze(-1))  # padded rows: no loss
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    (dense(x_ref, position_embeddings=rope, attention_mask=mask) * weight).sum().backward()
    with CommCounter() as comm:
        y = layer(x_par, position_embeddings=rope, attention_mask=mask)
        (y * weight).sum().backward()
    y_ref = dense(x, position_embeddings=rope, attention_mask=mask)
    errors = {"output": rel_err(y, y_ref), "input_grad": rel_err(x_par.grad, x_ref.grad), **_grad_errors(layer, dense)}
    with torch.no_grad():
        errors["output_no_grad"] = rel_err(layer(x, position_embeddings=rope, attention_mask=mask), y_ref)
    modelled = _modelled(attn, mesh, "seq_rows", q_len=attn.seq, kv_len=attn.seq, cached=0, masked=mask is not None,
                         backward=True)
    return {"errors": errors, "counted": sorted(_key(r) for r in comm.records), "modelled": modelled}


def _kv_shard_case(mesh, attn: Attn, *, convert_from: str | None = None) -> dict:
    """Prefill (seq_rows into a kv_shard cache, or ``convert_from`` strategy into a dimension-layout
    cache converted once), then decode steps with kv_shard (1 token, a chunk of 3, 1 token); the
    counted bytes of the last step."""
    dense = attn.dense()
    layer = SeqShardAttention.from_dense(dense, mesh, kv_replication=mesh.axes.n > attn.kv_heads).eval()
    cache_ref, cache = KVCache(), SeqShardCache(layout="kv_shard", chunk=4)
    errors, seq, counted, modelled = {}, attn.seq, [], []
    steps = [(seq, 0), (1, seq), (3, seq + 1), (1, seq + 4)]  # prefill, decode, a chunk of 3, decode
    with torch.no_grad():
        for step, (q_len, start) in enumerate(steps):
            x, rope, mask = _inputs(attn, 200 + 10 * mesh.axes.dp.rank + step, q_len, start)
            y_ref = dense(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache_ref)
            with CommCounter() as comm:
                if step == 0 and convert_from:
                    dims = SeqShardCache(layout="segments")
                    y = TwoLevelAttention.forward(layer, x, position_embeddings=rope, attention_mask=mask,
                                                  kv_cache=dims, strategy=convert_from)
                    kv_shard.convert_segments_cache(dims, cache, layer.axes.seg, [layer.layer_idx])
                else:
                    y = layer(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache)
            errors[f"step{step}"] = rel_err(y, y_ref)
            counted = sorted(_key(r) for r in comm.records)
            if step:
                modelled = _modelled(attn, mesh, "kv_shard", q_len=1, kv_len=start + 1, cached=start,
                                     masked=mask is not None, backward=False, layout="kv_shard")
    store, part = cache.position_store(0, mesh.axes.m, mesh.axes.j), layer.part
    owned = owned_count(seq + 5, mesh.axes.j, mesh.axes.m)  # its positions at full width: 1/m of the group's
    expected = owned * BATCH * part.local_kv_heads * (attn.head_dim + attn.spec().dv) * 4
    errors["cache_bytes_mismatch"] = float(cache.nbytes() != expected)
    errors["global_length_mismatch"] = float(store.global_length != seq + 5)
    return {"errors": errors, "counted": counted, "modelled": modelled}


def _qk_allgather_write_case(mesh, attn: Attn) -> dict:
    """A qk_allgather-style prefill (keys gathered at full d, values in segments) written straight into
    the kv_shard layout, then decoded with kv_shard."""
    dense = attn.dense()
    layer = SeqShardAttention.from_dense(dense, mesh, kv_replication=mesh.axes.n > attn.kv_heads).eval()
    cache_ref, cache, seg = KVCache(), SeqShardCache(layout="kv_shard"), layer.axes.seg
    with torch.no_grad():
        x, rope, mask = _inputs(attn, 300 + mesh.axes.dp.rank, attn.seq)
        dense(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache_ref)
        dims = SeqShardCache(layout="segments")
        TwoLevelAttention.forward(layer, x, position_embeddings=rope, attention_mask=mask, kv_cache=dims,
                                  strategy="qk_allgather")
        k_full = all_gather_dim(dims.stores[0].keys, seg, -1, "k")  # what qk_allgather gathers
        kv_shard.write_prefill_qk_allgather(cache.position_store(0, seg.size, seg.rank), k_full,
                                            dims.stores[0].values, seg)
        x, rope, mask = _inputs(attn, 310 + mesh.axes.dp.rank, 1, attn.seq)
        y_ref = dense(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache_ref)
        y = layer(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache)
    return {"errors": {"decode": rel_err(y, y_ref)}}


def _segments_cache_case(mesh, attn: Attn, strategy: str) -> dict:
    """The preallocated cache in the dimension layout under an existing strategy (no layer change)."""
    dense = attn.dense()
    layer = TwoLevelAttention.from_dense(dense, mesh, strategy=strategy, kv_replication=mesh.axes.n > attn.kv_heads)
    cache_ref, cache, errors = KVCache(), SeqShardCache(layout="segments", chunk=4), {}
    with torch.no_grad():
        for step in range(4):
            q_len, start = (attn.seq, 0) if step == 0 else (1, attn.seq + step - 1)
            x, rope, mask = _inputs(attn, 400 + mesh.axes.dp.rank + step, q_len, start)
            y_ref = dense(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache_ref)
            errors[f"step{step}"] = rel_err(layer(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache), y_ref)
    return {"errors": errors}


def _context_bytes_case(mesh, s_kv: int) -> dict:
    """Counted bytes of one kv_shard decode step after a prefill of s_kv - 1 positions."""
    attn = Attn("ctx", 8, 2)
    layer = SeqShardAttention.from_dense(attn.dense(), mesh).eval()
    cache = SeqShardCache(layout="kv_shard")
    spec = attn.spec()
    with torch.no_grad():
        x = torch.randn(1, s_kv - 1, HIDDEN)
        layer(x, position_embeddings=rope_cos_sin(torch.arange(s_kv - 1)[None], spec), kv_cache=cache)
        with CommCounter() as comm:
            layer(x[:, :1], position_embeddings=rope_cos_sin(torch.tensor([[s_kv - 1]]), spec), kv_cache=cache)
    return {"counted": sorted(_key(r) for r in comm.records), "bytes": comm.bytes_sent()}


BF16_LAYOUTS = [(2, 2), (1, 4)]
BF16_STRATEGIES = ("score_allreduce", "qk_allgather", "seq_rows")
BF16_MAX_RATIO = 1.2
"""A strategy's bf16 error against the fp32 model is at most 1.2x HF's own bf16 error."""


def _bf16_case(mesh) -> dict:
    """One HF LlamaAttention (H = 256, 8 heads x 32, 2 KV heads, s = 256, plain causal) in bf16: HF's own
    and ours (every prefill strategy, each ``reduce_dtype``) against its fp32 output on the same weights
    and input; and the bytes counted next to the bytes modelled from the configuration's numbers."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from ds_twolevel.strategies.base import SUMS, sum_size

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = LlamaAttention(cfg, 0).eval()
    spec, seq, n, m = AttentionSpec(8, 2, 32, rope_style="half"), 256, mesh.axes.n, mesh.axes.m
    x = torch.randn(2, seq, 256, generator=torch.Generator().manual_seed(1))
    rope = LlamaRotaryEmbedding(cfg)(x, torch.arange(seq)[None])
    dense_state = {f"{p}.weight": getattr(hf, p).weight.detach() for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    out: dict = {}
    with torch.no_grad():
        want = hf(x, rope, None)[0]
        hf16 = copy.deepcopy(hf).to(torch.bfloat16)
        out["hf_bf16"] = rel_err(hf16(x.bfloat16(), tuple(t.bfloat16() for t in rope), None)[0], want)
        for strategy, reduce in itertools.product(BF16_STRATEGIES, ("fp32", "input")):
            ours = SeqShardAttention(256, spec, mesh, dtype=torch.bfloat16, strategy=strategy, reduce_dtype=reduce)
            ours.load_dense_state(dense_state)
            with CommCounter() as comm:
                y = ours.eval()(x.bfloat16(), position_embeddings=rope)
            call = SeqCall(batch=2, q_len=seq, kv_len=seq, hidden=256, local_heads=8 // n, local_kv_heads=2 // n,
                           head_dim=32, n=n, m=m, causal_blocks=True, plain_causal=True, element_size=2,
                           reduce_size=4 if reduce == "fp32" else 0)
            modelled = sum(c.bytes_sent(2, sum_size(call)) for c in layer_collectives(call, strategy))
            out[strategy, reduce] = {"err": rel_err(y, want), "counted_bytes": comm.bytes_sent(),
                                     "modelled_bytes": modelled,
                                     "sum_sizes": sorted({r.element_size for r in comm.records if r.op in SUMS}),
                                     "other_sizes": sorted({r.element_size for r in comm.records if r.op not in SUMS})}
    return out


class _CacheConcats(torch.overrides.TorchFunctionMode):
    """Counts ``torch.cat`` calls that append to a 4-D (b, heads, positions, dim) tensor already holding at
    least the prompt's positions: what Hugging Face's DynamicCache does to every layer's keys and values
    at every decode step (a prefill's concatenation of row blocks holds fewer)."""

    def __init__(self, prompt_len: int) -> None:
        super().__init__()
        self.prompt_len, self.count = prompt_len, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat:
            tensors, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if (len(tensors) == 2 and tensors[0].dim() == 4 and dim in (2, -2)
                    and tensors[0].shape[2] >= self.prompt_len):
                self.count += 1
        return func(*args, **kwargs)


def _default_generate_case(model, dense, args: dict, gen: dict) -> dict:
    """generate() with no cache argument (the default path), with ``kv_layout`` forced both ways, and with
    HF's ``cache_implementation="dynamic"``: tokens vs the unpatched model, the cache each built, and the
    cache-growing concatenations each made."""
    want, out = dense.generate(**args, **gen), {}
    for label, kw in (("default", {}), ("kv_shard", {"kv_layout": "kv_shard"}),
                      ("segments", {"kv_layout": "segments"}), ("dynamic", {"cache_implementation": "dynamic"})):
        with _CacheConcats(args["input_ids"].shape[1]) as concats:
            got = model.generate(**args, **gen, **kw, return_dict_in_generate=True)
        out[label] = {"same": bool(torch.equal(got.sequences, want)), "cache": type(got.cache).__name__,
                      "layout": getattr(got.cache, "kv_layout", None), "concats": concats.count}
    return out


def _hf_case(mesh, arch: str) -> dict:
    """Unpatched vs patched + use_seqshard: logits and every gradient (seq_rows prefill, padded batch),
    greedy generate with the kv_shard cache (single and left-padded batch), beam search, greedy
    generate of a plain patched model with the preallocated "segments" cache, and plain
    ``generate()`` (no cache argument) of the patched model: its default and forced layouts."""
    from hf_integration import patch_model
    from hf_integration.seqshard import TwoLevelCache, use_seqshard
    from hf_integration.testing import sample_batch, shard_grad_errors, tiny_model

    dense = tiny_model(arch, 0)
    model, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    patch_model(model, mesh), patch_model(plain, mesh)
    use_seqshard(model)
    ids, mask = sample_batch(1)
    keep, out = mask.bool(), {}
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out["logits_err"] = rel_err(model(input_ids=ids, attention_mask=mask).logits[keep],
                                    dense(input_ids=ids, attention_mask=mask).logits[keep])
        single, beams = ids[1:, :6], dict(gen, num_beams=2)
        for name, mdl, layout, kw in (("kv_shard", model, "kv_shard", gen), ("segments", plain, "segments", gen),
                                      ("kv_shard_beam", model, "kv_shard", beams)):
            for label, args in (("single", dict(input_ids=single)), ("batch", dict(input_ids=ids, attention_mask=mask))):
                got = mdl.generate(**args, cache=TwoLevelCache.for_model(mdl, layout=layout, chunk=4), **kw)
                out[f"{name}_{label}"] = bool(torch.equal(got, dense.generate(**args, **kw)))
        for label, args in (("single", dict(input_ids=single)), ("batch", dict(input_ids=ids, attention_mask=mask))):
            out[f"default_path_{label}"] = _default_generate_case(plain, dense, args, gen)
        if mesh.layout.m == 4:  # a long-context batch, where the cost model predicts kv_shard is faster
            from hf_integration.generation import choose_kv_layout

            long_ids = torch.randint(1, dense.config.vocab_size, (8, 1024), generator=torch.Generator().manual_seed(3))
            out["long_choice"] = choose_kv_layout(plain, batch=8, prompt=1024, new_tokens=8)
            want = dense.generate(input_ids=long_ids, **dict(gen, max_new_tokens=8))
            got = plain.generate(input_ids=long_ids, **dict(gen, max_new_tokens=8), return_dict_in_generate=True)
            out["long_default"] = (got.cache.kv_layout, bool(torch.equal(got.sequences, want)))
    dense.train(), model.train()
    for mdl in (dense, model):
        logits = mdl(input_ids=ids, attention_mask=mask).logits
        pairs = mask[:, :-1].bool() & mask[:, 1:].bool()
        F.cross_entropy(logits[:, :-1][pairs], ids[:, 1:][pairs]).backward()
    out["grad_err"] = shard_grad_errors(dense, model)
    return out


def _all_cases_on_rank() -> dict:
    results: dict = {}
    for n, m in LAYOUTS:
        mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=n, m=m).build()
        for attn in ATTNS:
            results[("seq_rows", n, m, attn.name)] = _seq_rows_case(mesh, attn)
            if attn.causal:
                results[("kv_shard", n, m, attn.name)] = _kv_shard_case(mesh, attn)
        gqa = ATTNS[1]
        results[("convert", n, m, "score_allreduce")] = _kv_shard_case(mesh, gqa, convert_from="score_allreduce")
        results[("convert", n, m, "qk_allgather_padded")] = _kv_shard_case(mesh, ATTNS[6], convert_from="qk_allgather")
        results[("qk_write", n, m, gqa.name)] = _qk_allgather_write_case(mesh, gqa)
        for strategy in ("score_allreduce", "qk_allgather"):
            results[("segments", n, m, strategy)] = _segments_cache_case(mesh, ATTNS[3], strategy)
        if m in (2, 4) and n == 1:
            for s_kv in CONTEXTS:
                results[("context", n, m, s_kv)] = _context_bytes_case(mesh, s_kv)
        for arch in [a for layout, a in HF_CASES if layout == (n, m)]:
            results[("hf", n, m, arch)] = _hf_case(mesh, arch)
        if (n, m) in BF16_LAYOUTS:
            results[("bf16", n, m)] = _bf16_case(mesh)
    return results


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    return run_distributed(_all_cases_on_rank, WORLD, timeout=1500)


def _worst(rank_results, key) -> dict[str, tuple[float, int]]:
    worst: dict[str, tuple[float, int]] = {}
    for rank, res in enumerate(rank_results):
        for name, err in res[key]["errors"].items():
            if err > worst.get(name, (-1.0, 0))[0]:
                worst[name] = (err, rank)
    return worst


def _assert_exact(rank_results, key) -> None:
    bad = {k: v for k, v in _worst(rank_results, key).items() if not v[0] <= TOL}
    assert not bad, f"relative errors above {TOL} (error, rank): {bad}"


CASE_IDS = [(n, m, a) for (n, m), a in itertools.product(LAYOUTS, ATTNS)]


def _id(case) -> str:
    n, m, attn = case
    return f"n{n}m{m}-{attn.name}"


@pytest.mark.parametrize("case", CASE_IDS, ids=_id)
def test_seq_rows_matches_dense(rank_results, case):
    n, m, attn = case
    _assert_exact(rank_results, ("seq_rows", n, m, attn.name))


@pytest.mark.parametrize("case", CASE_IDS, ids=_id)
def test_seq_rows_counted_equals_modelled(rank_results, case):
    n, m, attn = case
    for rank, res in enumerate(rank_results):
        got = res[("seq_rows", n, m, attn.name)]
        assert got["counted"] == got["modelled"], f"rank {rank}"
    tags = {r[2] for r in rank_results[0][("seq_rows", n, m, attn.name)]["counted"]}
    assert {"q_rows", "k", "v", "attn_rows"} <= tags  # the segment axis is exercised


@pytest.mark.parametrize("case", [c for c in CASE_IDS if c[2].causal], ids=_id)
def test_kv_shard_decode_matches_dense(rank_results, case):
    n, m, attn = case
    _assert_exact(rank_results, ("kv_shard", n, m, attn.name))


@pytest.mark.parametrize("case", [c for c in CASE_IDS if c[2].causal], ids=_id)
def test_kv_shard_counted_equals_modelled(rank_results, case):
    n, m, attn = case
    for rank, res in enumerate(rank_results):
        got = res[("kv_shard", n, m, attn.name)]
        assert got["counted"] == got["modelled"] and got["counted"], f"rank {rank}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"n{l[0]}m{l[1]}")
def test_dimension_layout_cache_converts_once(rank_results, layout):
    for what in ("score_allreduce", "qk_allgather_padded"):
        _assert_exact(rank_results, ("convert", *layout, what))
    _assert_exact(rank_results, ("qk_write", *layout, ATTNS[1].name))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"n{l[0]}m{l[1]}")
@pytest.mark.parametrize("strategy", ["score_allreduce", "qk_allgather"])
def test_preallocated_cache_serves_existing_strategies(rank_results, layout, strategy):
    _assert_exact(rank_results, ("segments", *layout, strategy))


@pytest.mark.parametrize("m", [2, 4])
def test_kv_shard_decode_bytes_do_not_depend_on_context(rank_results, m):
    for res in rank_results:
        counted = [res[("context", 1, m, s)]["counted"] for s in CONTEXTS]
        assert counted[0] == counted[1] == counted[2] and res[("context", 1, m, CONTEXTS[0])]["bytes"] > 0


@pytest.mark.parametrize("layout,arch", HF_CASES, ids=lambda c: str(c))
def test_hf_generate_identical_with_kv_shard_and_preallocated_cache(rank_results, layout, arch):
    for rank, res in enumerate(rank_results):
        case = res[("hf", *layout, arch)]
        flags = {k: v for k, v in case.items() if isinstance(v, bool)}
        assert len(flags) == 6 and all(flags.values()), f"rank {rank}: {flags}"
        assert case["logits_err"] <= TOL and case["grad_err"] <= TOL, f"rank {rank}: {case}"


@pytest.mark.parametrize("layout,arch", HF_CASES, ids=lambda c: str(c))
def test_plain_generate_runs_on_the_preallocated_cache(rank_results, layout, arch):
    """``generate()`` with no cache argument: a TwoLevelCache (no per-step concatenation of the cache, which
    HF's DynamicCache, asked for with cache_implementation="dynamic", makes at every step), in the layout
    the cost model picks (short prompts: "segments") or the one ``kv_layout=`` forces; tokens identical to
    the unpatched model's, single prompt and left-padded batch."""
    for rank, res in enumerate(rank_results):
        for label in ("single", "batch"):
            runs = res[("hf", *layout, arch)][f"default_path_{label}"]
            assert all(r["same"] for r in runs.values()), f"rank {rank} {label}: {runs}"
            for name, want in (("default", "segments"), ("kv_shard", "kv_shard"), ("segments", "segments")):
                assert (runs[name]["cache"], runs[name]["layout"], runs[name]["concats"]) == \
                    ("TwoLevelCache", want, 0), f"rank {rank} {label} {name}: {runs[name]}"
            assert runs["dynamic"]["cache"] == "DynamicCache" and runs["dynamic"]["concats"] > 0, runs["dynamic"]
        if layout[1] == 4:
            case = res[("hf", *layout, arch)]
            assert case["long_choice"] == "kv_shard" and case["long_default"] == ("kv_shard", True), case


@pytest.mark.parametrize("layout", BF16_LAYOUTS, ids=lambda l: f"n{l[0]}m{l[1]}")
def test_bf16_error_within_hf_bf16_with_sums_in_fp32(rank_results, layout):
    """bf16: with the default reduce_dtype (fp32) every strategy's error is within 1.2x of HF's own bf16
    (1.13x at 2 x 2, 1.02x at 1 x 4 when written); the sums over ranks run at 4 bytes, everything else at 2,
    and the counted bytes are the modelled ones. In bf16 ("input") the output all-reduce's rounding shows
    (1.24x, 1.91x): the test also shows that the option changes what it says."""
    for rank, res in enumerate(rank_results):
        case = res[("bf16", *layout)]
        hf = case["hf_bf16"]
        for strategy in BF16_STRATEGIES:
            wide, narrow = case[strategy, "fp32"], case[strategy, "input"]
            assert wide["err"] <= BF16_MAX_RATIO * hf, f"rank {rank} {strategy}: {wide['err']} vs HF {hf}"
            assert wide["err"] < narrow["err"], f"rank {rank} {strategy}: fp32 sums {wide} vs bf16 sums {narrow}"
            assert wide["sum_sizes"] == [4] and narrow["sum_sizes"] == [2], (wide, narrow)
            assert wide["other_sizes"] in ([], [2]) and narrow["other_sizes"] == wide["other_sizes"]
            for got in (wide, narrow):
                assert got["counted_bytes"] == got["modelled_bytes"] > 0, f"rank {rank} {strategy}: {got}"
            assert wide["counted_bytes"] > narrow["counted_bytes"]
