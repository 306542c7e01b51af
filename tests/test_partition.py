"""Pure tests of the partition math (no process group): slicing, ownership, balance, errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ds_twolevel.sharding.partition import (
    AttentionPartition, AttentionSpec, check_partition, dim_atoms, feasible_layouts, shard_dim, unshard_dim,
)


@st.composite
def spec_and_layout(draw):
    g = draw(st.sampled_from([1, 2, 3, 4, 8]))
    h = g * draw(st.sampled_from([1, 2, 3, 4]))
    d = 2 * draw(st.integers(1, 24))
    style = draw(st.sampled_from(["none", "half", "interleaved", "interleaved_half"]))
    rotary = None if style == "none" else 2 * draw(st.integers(1, d // 2))
    dv = draw(st.sampled_from([None, d, 2 * d, 4]))
    spec = AttentionSpec(h, g, d, v_head_dim=dv, rope_style=style, rotary_dim=rotary)
    n = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    m = draw(st.sampled_from([1, 2, 3, 4, 8]))
    return spec, n, m, draw(st.booleans())


def _fits(spec, n, m, rep):
    try:
        check_partition(spec, n, m, kv_replication=rep)
        return True
    except ValueError:
        return False


@settings(max_examples=300, deadline=None)
@given(spec_and_layout())
def test_valid_partitions_own_everything_exactly_once(case):
    spec, n, m, rep = case
    if not _fits(spec, n, m, rep):
        with pytest.raises(ValueError):
            AttentionPartition(spec, n, m, kv_replication=rep)
        return
    part = AttentionPartition(spec, n, m, kv_replication=rep)
    h, g, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dv
    # every query head in exactly one group; every dim in exactly one segment; balanced
    heads = sorted(x for i in range(n) for x in part.q_heads(i))
    assert heads == list(range(h))
    for dims_of, size in ((part.qk_dims, d), (part.v_dims, dv)):
        segs = [dims_of(j) for j in range(m)]
        assert sorted(x for s in segs for x in s) == list(range(size))
        assert len({len(s) for s in segs}) == 1
    # RoPE atoms never straddle two segments
    seg_of = {t: j for j in range(m) for t in part.qk_dims(j)}
    for atom in dim_atoms(spec):
        assert len({seg_of[t] for t in atom}) == 1
    # query heads and the KV head they use sit in the same group
    for i in range(n):
        kv = set(part.kv_heads(i))
        assert {q // (h // g) for q in part.q_heads(i)} <= kv
    # slice then gather is the identity, for every weight
    H = 3
    for rows, size, dim in ((part.q_rows, h * d, 0), (part.k_rows, g * d, 0), (part.v_rows, g * dv, 0),
                            (part.o_cols, h * dv, 1)):
        w = torch.randn((size, H) if dim == 0 else (H, size))
        shards = [(rows(i, j), shard_dim(w, rows(i, j), dim)) for i, j in part.coordinates()]
        assert torch.equal(unshard_dim(shards, size, dim), w)
        owners = torch.cat([idx for idx, _ in shards])
        if not (part.replicated_kv and rows in (part.k_rows, part.v_rows)):
            assert sorted(owners.tolist()) == list(range(size))  # exactly once


@settings(max_examples=200, deadline=None)
@given(spec_and_layout())
def test_rope_tables_reproduce_rotation(case):
    spec, n, m, rep = case
    if spec.rope_style == "none" or not _fits(spec, n, m, rep):
        return
    part = AttentionPartition(spec, n, m, kv_replication=rep)
    from ds_twolevel.layers.rope import apply_rope_dense, apply_rope_segment, rope_cos_sin, segment_cos_sin
    x = torch.randn(1, 2, 3, spec.head_dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(3).unsqueeze(0), spec, dtype=torch.float64)
    full = apply_rope_dense(x, cos, sin, spec)
    for j in range(m):
        dims = torch.tensor(part.qk_dims(j))
        idx, partner, sign = part.rope_tables(j)
        c, s = segment_cos_sin(cos, sin, idx, sign)
        assert torch.equal(apply_rope_segment(x[..., dims], c, s, partner), full[..., dims])


def test_unshard_detects_gaps_and_conflicts():
    w = torch.arange(8.0)
    with pytest.raises(ValueError, match="unowned"):
        unshard_dim([(torch.tensor([0, 1]), w[:2])], 8, 0)
    with pytest.raises(ValueError, match="disagree"):
        unshard_dim([(torch.tensor([0, 1]), w[:2]), (torch.tensor([0, 1]), w[2:4])], 2, 0)


@pytest.mark.parametrize("spec,n,m,match", [
    (AttentionSpec(32, 8, 128, rope_style="half"), 16, 1, r"num_key_value_heads \(8\) is not divisible by n=16.*kv_replication.*n=8 x m=2"),
    (AttentionSpec(12, 12, 32, name="bert"), 5, 1, r"bert: num_heads \(12\) is not divisible by n=5"),
    (AttentionSpec(8, 8, 6, rope_style="half"), 1, 2, r"3 RoPE pairs .* m=2"),
    (AttentionSpec(8, 8, 16, rope_style="half", rotary_dim=4), 1, 4, r"2 RoPE pairs .* m=4.*layouts that fit 4 devices: n=4 x m=1, n=2 x m=2"),
    (AttentionSpec(8, 8, 16, v_head_dim=6), 1, 4, r"v_head_dim \(6\) is not divisible by m=4"),
    (AttentionSpec(6, 3, 8), 4, 1, r"num_heads \(6\) is not divisible by n=4"),
    (AttentionSpec(8, 8, 8), 0, 1, r"n must be an int >= 1, got 0"),
    (AttentionSpec(8, 8, 8), 1, -2, r"m must be an int >= 1, got -2"),
])
def test_invalid_partitions_name_numbers_and_fixes(spec, n, m, match):
    with pytest.raises(ValueError, match=match):
        check_partition(spec, n, m)


def test_kv_replication_is_explicit():
    spec = AttentionSpec(8, 2, 16, rope_style="half")
    with pytest.raises(ValueError, match="kv_replication=True"):
        AttentionPartition(spec, 4, 1)
    part = AttentionPartition(spec, 4, 1, kv_replication=True)
    assert [part.kv_heads(i) for i in range(4)] == [[0], [0], [1], [1]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=6, num_kv_heads=4, head_dim=8), r"num_heads \(6\) is not a multiple of num_kv_heads \(4\)"),
    (dict(num_heads=4, num_kv_heads=4, head_dim=8, rope_style="half", rotary_dim=5), r"rotary_dim \(5\) must be even"),
    (dict(num_heads=4, num_kv_heads=4, head_dim=8, rope_style="yarn"), r"rope_style must be one of"),
])
def test_invalid_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionSpec(**kwargs)


def test_feasible_layouts_prefers_head_wise_and_respects_rope():
    llama8b = AttentionSpec(32, 8, 128, rope_style="half")
    assert feasible_layouts(llama8b, 16) == [(8, 2), (4, 4), (2, 8), (1, 16)]
    assert (16, 1) in feasible_layouts(llama8b, 16, kv_replication=True)
    assert feasible_layouts(AttentionSpec(4, 4, 4, rope_style="half"), 8) == [(4, 2)]  # 2 RoPE pairs: m <= 2
