"""Partitioned attention / MLP / block vs the dense reference on 8 gloo ranks, in one launch.

Each layout (m, n) runs with dp = 8 / (m*n) replicas, every replica on its own batch, so the
dp axis is exercised too. Every case compares, on every rank: the output, the input gradient and
every parameter's gradient shard with the dense layer (fp32, max-abs relative error <= 1e-5), and
records the collectives issued in forward and backward.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.layers.block import TwoLevelBlock
from ds_twolevel.layers.cache import KVCache
from ds_twolevel.costmodel import block_collectives, replicated_grad_collectives
from ds_twolevel.parallel.collectives import CommCounter
from ds_twolevel.sharding.gather import gather_dense_state
from ds_twolevel.parallel.layout import TwoLevelLayout
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.layers.qk_norm import QKNorm
from ds_twolevel.testing.reference import DenseAttention, DenseBlock
from ds_twolevel.layers.rope import rope_cos_sin
from ds_twolevel.testing import rel_err, run_distributed

WORLD = 8
TOL = 1e-5
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (1, 4), (2, 4)]  # (m, n)
HIDDEN = 32
PREFILL_SEQ = 6
"""query rows of most prefill cases: divisible by m = 2 (split softmax), not by m = 4 (all-reduce),
not into 2m = 4 causal blocks at m = 2."""


@dataclass(frozen=True)
class Attn:
    """One attention configuration under test."""

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
    dropout: float = 0.0
    v_head_dim: int | None = None
    seq: int = PREFILL_SEQ
    """prefill query rows."""
    norm_scope: str = "head"
    """q/k norm over each head or over the whole projection (OLMo2)."""
    norm_offset: float = 0.0
    """1.0: Gemma's (1+w) q/k norm weight."""
    softcap: float | None = None
    """Gemma2's score soft-cap."""

    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.heads, self.kv_heads, self.head_dim, v_head_dim=self.v_head_dim,
                             rope_style=self.rope, rotary_dim=self.rotary_dim, name=self.name)

    def dense(self, **kwargs) -> DenseAttention:
        """The dense reference layer of this configuration."""
        norm = QKNorm(1e-6, scope=self.norm_scope, offset=self.norm_offset, weight_in_float=self.norm_offset > 0)
        return DenseAttention(HIDDEN, self.spec(), qkv_bias=self.bias, qk_norm=norm if self.qk_norm else None,
                              softcap=self.softcap, **kwargs)


ATTNS = [
    Attn("mha_rope", 8, 8),
    Attn("gqa_rope", 8, 2),
    Attn("gqa_qknorm_bias_norope", 8, 2, rope="none", qk_norm=True, bias=True),
    Attn("mqa_interleaved_padded", 8, 1, rope="interleaved", padding=True),
    Attn("mha_partial_rotary_vdim", 8, 8, rotary_dim=8, v_head_dim=8),
    Attn("bidirectional_padded", 8, 4, rope="none", causal=False, padding=True, bias=True),
    Attn("gqa_dropout", 8, 4, dropout=0.25),
    # 8 rows split into 2m blocks at m = 1, 2, 4: the causal score path that skips masked key blocks
    Attn("gqa_causal_blocks", 8, 2, seq=8),
    # 32 rows (>= LONG_SEQ): the split score paths gather V and all-to-all the output rows instead of
    # gathering the probabilities (fewer bytes) - causal blocks, padded/bidirectional, dropout, d_v != d
    Attn("gqa_causal_blocks_long", 8, 2, seq=32),
    Attn("bidirectional_padded_long", 8, 4, rope="none", causal=False, padding=True, seq=32),
    Attn("gqa_dropout_long", 8, 4, dropout=0.25, seq=32),
    Attn("mha_vdim_long", 8, 8, rotary_dim=8, v_head_dim=8, seq=32),
    # Gemma2/OLMo2/Gemma3 features at once: soft-capped scores (the qk_allgather path computes them
    # explicitly), a (1+w) q/k norm over the whole projection (sum of squares all-reduced over tp);
    # 8 rows: the causal block path at m = 2, 4
    Attn("gqa_softcap_projection_norm", 8, 2, qk_norm=True, norm_scope="projection", norm_offset=1.0, softcap=2.0,
         seq=8),
]
LONG_SEQ = 32
"""At 32 query rows and d = 16, every (m > 1, n) of the matrix sends fewer bytes gathering V
(b g/n 32 d_v + b h/n 32 d_v/m elements) than gathering the probabilities (b h/n 32 x 32, or
about half of it for the causal blocks), e.g. m = 2, n = 1, g = 4: 2048b + 2048b < 8192b; at 6 or
8 rows it is the other way round (b g/n 8 d_v > b h/n 8 x 8)."""
STRATEGIES = ["score_allreduce", "qk_allgather"]


def attention_cases() -> list[tuple[tuple[int, int], Attn, str, str]]:
    """(layout, attention config, strategy, phase) for every combination under test."""
    out = []
    for layout, attn, strategy in itertools.product(LAYOUTS, ATTNS, STRATEGIES):
        out.append((layout, attn, strategy, "prefill"))
        if attn.causal and not attn.dropout:
            out.append((layout, attn, strategy, "decode"))
    return out


def case_id(case) -> str:
    (m, n), attn, strategy, phase = case
    return f"m{m}n{n}-{attn.name}-{strategy}-{phase}"


def _grad_errors(layer, ref_grads: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Relative error of every gradient shard vs the slice of the dense gradient.

    The key bias has an identically zero true gradient (softmax is shift-invariant along keys),
    so a per-tensor relative error would compare rounding noise with rounding noise: each
    denominator is floored at 1e-3 of the layer's largest dense gradient.
    """
    scale = max(float(g.abs().max()) for g in ref_grads.values() if g is not None)
    out = {}
    for name, (index, dim) in layer.shard_index().items():
        ref = ref_grads[name].index_select(dim, index)
        out[f"grad:{prefix}{name}"] = rel_err(layer.get_parameter(name).grad, ref, floor=1e-3 * scale)
    return out


def _inputs(attn: Attn, spec: AttentionSpec, seed: int, seq: int = PREFILL_SEQ, batch: int = 3, start: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, HIDDEN, generator=gen)
    pos = torch.arange(start, start + seq).expand(batch, -1)
    rope = rope_cos_sin(pos, spec) if spec.rot_dim else None
    return x, rope


def _padding_mask(attn: Attn, batch: int, kv_len: int) -> torch.Tensor | None:
    if not attn.padding:
        return None
    mask = torch.ones(batch, kv_len, dtype=torch.long)
    mask[1, :2] = 0  # left padding on one row, as batched generation does
    mask[2, :1] = 0
    return mask


def _comm_counts(counter: CommCounter) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in counter.records:
        key = f"{r.op}/{r.axis}/{'bwd' if r.backward else 'fwd'}"
        out[key] = out.get(key, 0) + 1
    return out


def _prefill_case(mesh, attn: Attn, strategy: str) -> dict:
    spec = attn.spec()
    torch.manual_seed(1234)
    dense = attn.dense(o_bias=attn.bias, causal=attn.causal, dropout=attn.dropout, dropout_seed=7)
    with torch.no_grad():  # non-trivial norm weights so their gradients are checked for real
        for p in dense.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    kv_rep = mesh.axes.n > spec.num_kv_heads
    layer = TwoLevelAttention.from_dense(dense, mesh, strategy=strategy, kv_replication=kv_rep)
    if attn.dropout:
        dense.train(), layer.train()
    x, rope = _inputs(attn, spec, seed=100 + mesh.axes.dp.rank, seq=attn.seq)
    mask = _padding_mask(attn, x.shape[0], x.shape[1])
    # loss weights; padded query rows attend to nothing, so (as in real training) they carry no loss:
    # their values are finite but arbitrary, and fused SDPA and the explicit softmax differentiate
    # them differently
    weight = torch.linspace(-1, 1, HIDDEN) * (1.0 if mask is None else mask.unsqueeze(-1))
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = dense(x_ref, position_embeddings=rope, attention_mask=mask)
    (y_ref * weight).sum().backward()
    with CommCounter() as comm:
        y = layer(x_par, position_embeddings=rope, attention_mask=mask)
        (y * weight).sum().backward()
    errors = {"output": rel_err(y, y_ref), "input_grad": rel_err(x_par.grad, x_ref.grad)}
    if not attn.dropout:  # inference takes its own paths (blocks written in place, mask filled in place)
        with torch.no_grad():
            errors["output_no_grad"] = rel_err(layer(x, position_embeddings=rope, attention_mask=mask), y_ref)
    errors.update(_grad_errors(layer, dense.grad_state()))
    if layer.o_bias is not None:
        errors["grad:o_bias"] = rel_err(layer.o_bias.grad, dense.o_proj.bias.grad)
    gathered = gather_dense_state(layer)  # the inverse of slicing, through real collectives
    errors["gather_roundtrip"] = max(rel_err(v, dense.dense_state()[k]) for k, v in gathered.items())
    return {"errors": errors, "comm": _comm_counts(comm)}


def _decode_case(mesh, attn: Attn, strategy: str) -> dict:
    spec = attn.spec()
    torch.manual_seed(1234)
    dense = attn.dense()
    layer = TwoLevelAttention.from_dense(dense, mesh, strategy=strategy,
                                         kv_replication=mesh.axes.n > spec.num_kv_heads)
    cache_ref, cache_par = KVCache(), KVCache()
    errors, comms, seq = {}, [], 5
    with torch.no_grad():
        for step in range(4):  # prefill 5 tokens, then 3 single-token steps against the cache
            q_len = seq if step == 0 else 1
            start = 0 if step == 0 else seq + step - 1
            x, rope = _inputs(attn, spec, seed=200 + 10 * mesh.axes.dp.rank + step, seq=q_len, start=start)
            mask = _padding_mask(attn, x.shape[0], start + q_len)
            y_ref = dense(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache_ref)
            with CommCounter() as comm:
                y = layer(x, position_embeddings=rope, attention_mask=mask, kv_cache=cache_par)
            errors[f"step{step}"] = rel_err(y, y_ref)
            comms.append(_comm_counts(comm))
    # the cache stays partitioned: this rank holds 1/(n*m) of it (times KV replication)
    part = layer.part
    expected = cache_ref.nbytes() * part.local_kv_heads * part.local_dim // (spec.num_kv_heads * spec.head_dim)
    errors["cache_bytes_mismatch"] = float(cache_par.nbytes() != expected)
    return {"errors": errors, "comm": comms[-1]}


def _block_case(mesh, gated: bool) -> dict:
    spec = AttentionSpec(8, 4, 8, rope_style="half")
    torch.manual_seed(99)
    dense = DenseBlock(HIDDEN, spec, 64, gated=gated, activation="silu" if gated else "gelu")
    block = TwoLevelBlock.from_dense(dense, mesh)
    x, rope = _inputs(Attn("block", 8, 4), spec, seed=300 + mesh.axes.dp.rank)
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense(x_ref, position_embeddings=rope).pow(2).sum().backward()
    y = block(x_par, position_embeddings=rope)
    y.pow(2).sum().backward()
    y_ref = dense(x_ref.detach(), position_embeddings=rope)
    errors = {"output": rel_err(y, y_ref), "input_grad": rel_err(x_par.grad, x_ref.grad)}
    errors.update(_grad_errors(block.mlp, {n: p.grad for n, p in dense.mlp.named_parameters()}, "mlp."))
    errors.update(_grad_errors(block.attn, dense.attn.grad_state(), "attn."))
    for norm in ("attn_norm", "mlp_norm"):
        errors[f"grad:{norm}"] = rel_err(getattr(block, norm).weight.grad, getattr(dense, norm).weight.grad)
    gathered = gather_dense_state(block.mlp)
    errors["mlp_gather_roundtrip"] = max(rel_err(v, dense.mlp.state_dict()[k]) for k, v in gathered.items())
    return {"errors": errors, "comm": {}}


SP_STRATEGIES = ("score_allreduce", "qk_allgather", "seq_rows")
SP_SEQ = 16
"""tokens of the sequence-parallel block cases: 16/p local tokens on p = 2, 4 or 8 ranks."""


def sp_cases() -> list[tuple[tuple[int, int], str, bool]]:
    """(layout, strategy, padded) of the sequence-parallel block cases (layouts with n*m > 1)."""
    return [(lay, strategy, padded) for lay in LAYOUTS if lay[0] * lay[1] > 1
            for strategy in SP_STRATEGIES for padded in (False, True)]


def sp_case_id(case) -> str:
    (m, n), strategy, padded = case
    return f"sp-m{m}n{n}-{strategy}-{'padded' if padded else 'causal'}"


def _records(counter: CommCounter) -> list[tuple]:
    return sorted((r.op, r.axis, r.tag, r.numel, r.ranks, r.backward) for r in counter.records)


def _sp_block_case(mesh, strategy: str, padded: bool) -> dict:
    """A sequence-parallel block (rank r holds tokens [r*s/p, (r+1)*s/p)) vs the dense block on the
    whole sequence: output, input gradient, every gradient; counted == modelled records; bytes vs
    the same block with sequence parallelism off."""
    spec = AttentionSpec(8, 4, 8, rope_style="half")
    torch.manual_seed(77)
    dense = DenseBlock(HIDDEN, spec, 64, o_bias=True)
    with torch.no_grad():
        for p in dense.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    block = TwoLevelBlock.from_dense(dense, mesh, sequence_parallel=True, strategy=strategy)
    plain = TwoLevelBlock.from_dense(dense, mesh, strategy=strategy)
    tp = mesh.axes.tp
    x, rope = _inputs(Attn("sp", 8, 4), spec, seed=400 + mesh.axes.dp.rank, seq=SP_SEQ, batch=2)
    mask = None
    if padded:  # right padding of one row (lengths that do not fill the sequence)
        mask = torch.ones(2, SP_SEQ, dtype=torch.long)
        mask[1, -5:] = 0
    weight = torch.linspace(-1, 1, HIDDEN) * (1.0 if mask is None else mask.unsqueeze(-1))
    per = SP_SEQ // tp.size
    mine = slice(tp.rank * per, (tp.rank + 1) * per)
    x_ref, x_par = x.clone().requires_grad_(), x[:, mine].clone().requires_grad_()
    (dense(x_ref, position_embeddings=rope, attention_mask=mask) * weight).sum().backward()
    y_ref = dense(x_ref.detach(), position_embeddings=rope, attention_mask=mask)
    with CommCounter() as comm:
        y = block(x_par, position_embeddings=rope, attention_mask=mask)
        (y * weight[:, mine] if padded else y * weight).sum().backward()
    x_plain = x.clone().requires_grad_()
    with CommCounter() as comm_plain:
        (plain(x_plain, position_embeddings=rope, attention_mask=mask) * weight).sum().backward()
    errors = {"output": rel_err(y, y_ref[:, mine]), "input_grad": rel_err(x_par.grad, x_ref.grad[:, mine])}
    errors.update(_grad_errors(block.mlp, {n: p.grad for n, p in dense.mlp.named_parameters()}, "mlp."))
    errors.update(_grad_errors(block.attn, dense.attn.grad_state(), "attn."))
    errors["grad:o_bias"] = rel_err(block.attn.o_bias.grad, dense.attn.o_proj.bias.grad)
    for norm in ("attn_norm", "mlp_norm"):
        errors[f"grad:{norm}"] = rel_err(getattr(block, norm).weight.grad, getattr(dense, norm).weight.grad)
    call = block.attn.attention_call(x, mask, None)
    cols = block_collectives(call, block.attn.resolve_strategy(call), backward=True, sequence_parallel=True)
    cols += replicated_grad_collectives([HIDDEN] * 3, tp.size)  # the norms' weights and o_bias
    predicted = sorted((c.op, c.axis, c.tag, c.numel, c.ranks, c.backward) for c in cols)
    return {"errors": errors, "comm": {}, "counted": _records(comm), "predicted": predicted,
            "bytes": (comm.bytes_sent() - comm.bytes_sent(tag="replicated_grad"), comm_plain.bytes_sent()),
            "replicated_grad_bytes": comm.bytes_sent(tag="replicated_grad")}


def _all_cases_on_rank() -> dict[str, dict]:
    results: dict[str, dict] = {}
    meshes = {}
    for m, n in LAYOUTS:
        meshes[(m, n)] = TwoLevelLayout.from_world_size(dist.get_world_size(), n=n, m=m).build()
    groups = dist.distributed_c10d._world.group_count  # every new_group / split_group adds one
    for case in attention_cases():
        layout, attn, strategy, phase = case
        run = _prefill_case if phase == "prefill" else _decode_case
        results[case_id(case)] = run(meshes[layout], attn, strategy)
    for (m, n), gated in itertools.product(LAYOUTS, (True, False)):
        results[f"block-m{m}n{n}-{'gated' if gated else 'plain'}"] = _block_case(meshes[(m, n)], gated)
    for case in sp_cases():
        results[sp_case_id(case)] = _sp_block_case(meshes[case[0]], case[1], case[2])
    kv_rep = {(m, n, g): mesh.axes_for(g).kv_rep.size for (m, n), mesh in meshes.items() for g in range(1, 5)}
    results["groups"] = {"created_by_layers": dist.distributed_c10d._world.group_count - groups, "kv_rep": kv_rep}
    return results


@pytest.fixture(scope="module")
def rank_results() -> list[dict[str, dict]]:
    return run_distributed(_all_cases_on_rank, WORLD, timeout=900)


def _worst(rank_results, key):
    errors = {}
    for rank, res in enumerate(rank_results):
        for name, err in res[key]["errors"].items():
            if err > errors.get(name, (-1.0, 0))[0]:
                errors[name] = (err, rank)
    return errors


@pytest.mark.parametrize("case", attention_cases(), ids=case_id)
def test_attention_matches_dense(rank_results, case):
    errors = _worst(rank_results, case_id(case))
    bad = {k: v for k, v in errors.items() if not v[0] <= TOL}
    assert not bad, f"relative errors above {TOL} (error, rank): {bad}"


def expected_comm(case) -> dict[str, int]:
    """Collectives per call, from DESIGN.md (independent of the cost model)."""
    (m, n), attn, strategy, phase = case
    fwd, bwd = {}, {}

    def add(d, key, k=1):
        if k:
            d[key] = d.get(key, 0) + k

    head_norm = attn.qk_norm and attn.norm_scope == "head"
    whole_norm = attn.qk_norm and attn.norm_scope == "projection"
    if m > 1:
        add(fwd, "all_reduce/m/fwd", 2 * head_norm)
        add(bwd, "all_reduce/m/bwd", 2 * head_norm)
        if strategy == "score_allreduce" and phase == "prefill" and attn.seq % m == 0:
            # split softmax (or causal blocks): reduce-scatter the partial scores by query rows (or
            # by owned blocks), all-gather the probabilities - or, for long rows, all-gather V and
            # all-to-all the output rows
            add(fwd, "reduce_scatter/m/fwd"), add(fwd, "all_gather/m/fwd")
            add(bwd, "all_gather/m/bwd"), add(bwd, "reduce_scatter/m/bwd")
            if attn.seq >= LONG_SEQ:
                add(fwd, "all_to_all/m/fwd"), add(bwd, "all_to_all/m/bwd")
        elif strategy == "score_allreduce":  # rows do not divide by m (prefill of 6 at m = 4; decode)
            add(fwd, "all_reduce/m/fwd"), add(bwd, "all_reduce/m/bwd")
        else:
            add(fwd, "all_gather/m/fwd", 2), add(bwd, "reduce_scatter/m/bwd", 2)
    if n > 1:
        add(bwd, "all_reduce/n/bwd", 2 * head_norm)
    if n > attn.kv_heads:  # replicated KV heads sum their k/v weight (and bias, k norm weight) gradients
        add(bwd, "all_reduce/kv_rep/bwd", 2 + 2 * attn.bias + whole_norm)
    if m * n > 1:
        add(fwd, "all_reduce/tp/fwd"), add(bwd, "all_reduce/tp/bwd")
        add(fwd, "all_reduce/tp/fwd", 2 * whole_norm), add(bwd, "all_reduce/tp/bwd", 2 * whole_norm)  # sumsq
    return fwd if phase == "decode" else {**fwd, **bwd}


@pytest.mark.parametrize("case", attention_cases(), ids=case_id)
def test_collectives_per_forward_and_backward(rank_results, case):
    for rank, res in enumerate(rank_results):
        assert res[case_id(case)]["comm"] == expected_comm(case), f"rank {rank}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"m{l[0]}n{l[1]}")
@pytest.mark.parametrize("mlp", ["gated", "plain"])
def test_block_matches_dense(rank_results, layout, mlp):
    errors = _worst(rank_results, f"block-m{layout[0]}n{layout[1]}-{mlp}")
    bad = {k: v for k, v in errors.items() if not v[0] <= TOL}
    assert not bad, f"relative errors above {TOL} (error, rank): {bad}"


@pytest.mark.parametrize("case", sp_cases(), ids=sp_case_id)
def test_sequence_parallel_block_matches_dense(rank_results, case):
    """Each rank holds s/(n*m) tokens between sublayers: exact against the dense block on the whole
    sequence (output, input gradient, every gradient); the records counted are the cost model's; the
    residual stream's gather + reduce-scatter pairs send exactly the bytes of the all-reduces they
    replace. The one addition is the sum over tp of the replicated weights' gradients (norms, o_bias:
    3*H elements here, independent of s)."""
    errors = _worst(rank_results, sp_case_id(case))
    bad = {k: v for k, v in errors.items() if not v[0] <= TOL}
    assert not bad, f"relative errors above {TOL} (error, rank): {bad}"
    for rank, res in enumerate(rank_results):
        got = res[sp_case_id(case)]
        assert got["counted"] == got["predicted"], f"rank {rank}"
        sp, plain = got["bytes"]
        assert sp == plain, f"rank {rank}: {sp} bytes with sequence parallelism, {plain} without"


def test_layers_and_axes_for_create_no_process_group(rank_results):
    """Every sub-mesh (kv_rep of each replication factor included) is built with the mesh: the
    layer constructors (with and without KV replication) and axes_for only look groups up."""
    for rank, res in enumerate(rank_results):
        assert res["groups"]["created_by_layers"] == 0, f"rank {rank}"
        kv_rep = res["groups"]["kv_rep"]
        assert kv_rep[(1, 4, 2)] == kv_rep[(2, 4, 2)] == kv_rep[(1, 2, 1)] == 2 and kv_rep[(1, 4, 1)] == 4, kv_rep
        assert kv_rep[(2, 2, 4)] == kv_rep[(1, 4, 3)] == kv_rep[(1, 1, 1)] == 1, kv_rep  # n <= g, or g does not divide n


def _strict_dp_world_case() -> dict:
    """A world of exactly dp*n*m = 2*1*2 = 4 ranks: the dp axis and its group."""
    mesh = TwoLevelLayout(n=1, m=2, dp=2).build()
    out = _prefill_case(mesh, ATTNS[1], "score_allreduce")
    grads = torch.tensor([float(mesh.axes.dp.rank)])
    dist.all_reduce(grads, group=mesh.get_data_parallel_group())
    out["dp_sum"] = float(grads)
    out["coord"] = (mesh.axes.dp.rank, mesh.axes.i, mesh.axes.j)
    return out


def test_dp2_world_of_four():
    results = run_distributed(_strict_dp_world_case, 4)
    assert [r["coord"] for r in results] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert all(r["dp_sum"] == 1.0 for r in results)
    for r in results:
        assert max(r["errors"].values()) <= TOL, r["errors"]


def test_single_process_layer_without_process_group():
    mesh = TwoLevelLayout(n=1, m=1).build()
    res = _prefill_case(mesh, ATTNS[2], "score_allreduce")
    assert max(res["errors"].values()) <= TOL and res["comm"] == {}
