"""Counted collectives == the cost model's prediction, exactly, over the whole test matrix.

One ``run_distributed(..., 8)`` launch runs every case (layouts with n*m < 8 use dp = 8/(n*m));
each rank returns, per case, the sorted (op, axis, tag, numel, ranks, backward) records it
counted and the ones :mod:`ds_twolevel.costmodel` predicts; the tests below only compare. The same launch
trains the composed layout dp=2 x sp=2 x n=1 x m=2 (Ulysses outside two-level) through ds_twolevel.initialize,
Llama and Qwen3 under ZeRO-2 and ZeRO-3: against the dense run, and every collective of its first step counted
against ``costmodel.training.step_collectives``.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ds_twolevel.layers.block import TwoLevelBlock
from ds_twolevel.layers.cache import KVCache
from ds_twolevel.parallel.collectives import CommCounter
from ds_twolevel.costmodel import (attention_call, attention_collectives, block_collectives,
                                   mlp_collectives, ModelConfig, resolve)
from ds_twolevel.strategies import registry
from ds_twolevel.parallel.layout import TwoLevelLayout
from ds_twolevel.layers.qk_norm import QKNorm
from ds_twolevel.testing.reference import DenseBlock
from ds_twolevel.layers.rope import rope_cos_sin
from ds_twolevel.testing import run_distributed
from tests import toy_strategy

WORLD = 8
LAYOUTS_MN = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (1, 4), (2, 4)]
"""(m, n) pairs of the matrix."""
KV_HEADS = {4: "gqa", 2: "kvrep"}  # g=2 with n=4: KV heads replicated over head groups
BATCH, SEQ = 2, 6
PHASES = ("prefill", "decode", "prefill8", "prefill30", "prefill32")
"""prefill of SEQ rows (split softmax at m = 2, all-reduce at m = 4), decode, a prefill of 8
rows (the causal block path at m = 2 and 4); at 30 and 32 rows the split paths gather V and
all-to-all the output rows instead of gathering the probabilities (30: split softmax at m = 2;
32: causal blocks at m = 2 and 4)."""


def _lengths(phase: str) -> tuple[int, int]:
    """(q_len, kv_len) of the counted call."""
    return {"prefill": (SEQ, SEQ), "decode": (1, SEQ + 1), "prefill8": (8, 8), "prefill30": (30, 30),
            "prefill32": (32, 32)}[phase]


def model_config(kv_heads: int, qk_norm: bool | str) -> ModelConfig:
    """The small block every case uses (h=8, d=16 with RoPE, H=64, I=128); ``qk_norm="projection"``:
    OLMo2's q/k norm over the whole projection."""
    return ModelConfig("bytes-test", hidden=64, heads=8, kv_heads=kv_heads, head_dim=16, intermediate=128,
                       layers=1, qk_norm=bool(qk_norm), qk_norm_scope="projection" if qk_norm == "projection" else "head")


def cases() -> list[tuple[str, int, int, int, bool, str, str, str]]:
    """(id, m, n, g, qk_norm, strategy, phase, module) for every case of the matrix."""
    out = []
    layouts = [(m, n, 4) for m, n in LAYOUTS_MN] + [(1, 4, 2), (2, 4, 2)]
    for (m, n, g), phase in itertools.product(layouts, PHASES):
        out.append((f"m{m}n{n}-{KV_HEADS[g]}-mlp-{phase}", m, n, g, False, "-", phase, "mlp"))
        for qk_norm, strategy, module in itertools.product((False, True), (*registry.universal(), "auto"), ("attn", "block")):
            if module == "block" and strategy == "auto":
                continue
            cid = f"m{m}n{n}-{KV_HEADS[g]}-{module}-{strategy}-{'qknorm' if qk_norm else 'plain'}-{phase}"
            out.append((cid, m, n, g, qk_norm, strategy, phase, module))
        if phase in ("prefill", "decode", "prefill8"):  # the whole-projection norm: its sums over tp
            out.append((f"m{m}n{n}-{KV_HEADS[g]}-attn-auto-projnorm-{phase}", m, n, g, "projection", "auto", phase,
                        "attn"))
    return out


def _key(op, axis, tag, numel, ranks, backward) -> tuple:
    return (op, axis, tag, int(numel), int(ranks), bool(backward))


def _predicted(model: ModelConfig, m: int, n: int, strategy: str, phase: str, module: str) -> list[tuple]:
    q_len, kv_len = _lengths(phase)
    call = attention_call(model, n, m, BATCH, q_len, kv_len)
    if module == "mlp":
        cols = mlp_collectives(batch=BATCH, seq=q_len, hidden=model.hidden, tp=m * n, backward=True)
    elif module == "attn":
        cols = attention_collectives(call, resolve(call, strategy, 4), backward=True)
    else:
        cols = block_collectives(call, resolve(call, strategy, 4), backward=True)
    return sorted(_key(c.op, c.axis, c.tag, c.numel, c.ranks, c.backward) for c in cols)


def _run_case(block: TwoLevelBlock, model: ModelConfig, strategy: str, phase: str, module: str,
              gen: torch.Generator) -> list[tuple]:
    """Forward + backward of one module; returns the sorted records counted."""
    spec = model.spec()
    cache = KVCache() if phase == "decode" else None
    if cache is not None:  # fill the cache with SEQ positions, untimed and uncounted
        with torch.no_grad():
            prompt = torch.randn(BATCH, SEQ, model.hidden, generator=gen)
            rope = rope_cos_sin(torch.arange(SEQ).expand(BATCH, -1), spec)
            block.attn(prompt, position_embeddings=rope, kv_cache=cache, strategy=_fixed(strategy))
    start, q_len = (SEQ, 1) if cache is not None else (0, _lengths(phase)[0])
    x = torch.randn(BATCH, q_len, model.hidden, generator=gen).requires_grad_()
    rope = rope_cos_sin(torch.arange(start, start + q_len).expand(BATCH, -1), spec)
    with CommCounter() as comm:
        if module == "mlp":
            y = block.mlp(x)
        elif module == "attn":
            y = block.attn(x, position_embeddings=rope, kv_cache=cache, strategy=strategy)
        else:
            y = block(x, position_embeddings=rope, kv_cache=cache, strategy=strategy)
        y.square().mean().backward()
    return sorted(_key(r.op, r.axis, r.tag, r.numel, r.ranks, r.backward) for r in comm.records)


def _fixed(strategy: str) -> str | None:
    return strategy if strategy in registry.universal() else None


def matrix_rank() -> dict[str, tuple[list[tuple], list[tuple]]]:
    """Body of each of the 8 ranks: case id -> (counted, predicted)."""
    torch.manual_seed(0)
    out: dict[str, tuple[list[tuple], list[tuple]]] = {}
    with toy_strategy.registered():  # the toy entry joins the matrix like any registered strategy
        out = _matrix_cases()
    out.update(_composed_cases())
    return out


COMPOSED_LAYOUT = (2, 2, 1, 2)
"""dp x sp x n x m of the composed cases: Ulysses outside two-level on all 8 ranks."""
COMPOSED = {f"composed-{arch}-zero{stage}": (arch, stage) for arch in ("llama", "qwen3") for stage in (2, 3)}
"""case id -> (tiny model, ZeRO stage): 4 steps each (tests/test_sequence_parallel.py's settings)."""


def _composed_cases() -> dict[str, dict]:
    return {cid: _composed_case(arch, stage) for cid, (arch, stage) in COMPOSED.items()}


def _composed_case(arch: str, stage: int) -> dict:
    """dp=2 x sp=2 x 1x2 through ds_twolevel.initialize vs the dense model (each replica its own padded batch, the
    dense run on their mean loss, torch AdamW with the same clipping): relative errors of every step's loss and
    clipped gradient norm, step 0's gradients, the weights after the last step; and step 0's counted collectives
    with the cost model's."""
    from tests.test_sequence_parallel import _ulysses_train

    dp, sp, n, m = COMPOSED_LAYOUT
    errors, records = _ulysses_train(arch, n, m, stage, dp, sp)
    errors["counted"] = [(*_key(r.op, r.axis, r.tag, r.numel, r.ranks, r.backward), r.bytes_sent) for r in records]
    return errors


def composed_modelled(arch: str) -> list[tuple]:
    """The cost model's collectives of one composed step (:data:`COMPOSED_LAYOUT`, the tiny model on
    tests/test_sequence_parallel.py's padded batches of 13 tokens, which ``shard_batch`` pads to 14), with the
    bytes each sends, less ZeRO's (DeepSpeed's own, which the counter does not see). The inner attention is
    the strategy "cost_model" picks for the call after the all-to-alls, as the layers do."""
    from ds_twolevel.costmodel.training import (TrainLayout, TrainSetup, collective_bytes, inner_call,
                                                step_collectives)
    from hf_integration.specs import cost_model_config
    from hf_integration.testing import tiny_config
    from tests.test_sequence_parallel import U_SEQ

    model = cost_model_config(tiny_config(arch), arch)
    layout = TrainLayout(*COMPOSED_LAYOUT)
    setup = TrainSetup(batch=2 * layout.dp, seq=U_SEQ + 1, checkpointing=False, sequence_parallel=False,
                       vocab_parallel=False, element_size=4, padding_mask=True)
    strategy = resolve(inner_call(model, layout, setup), "cost_model", 4)
    cols = [c for c in step_collectives(model, layout, setup, strategy=strategy) if c.axis != "zero"]
    return sorted((*_key(c.op, c.axis, c.tag, c.numel, c.ranks, c.backward), collective_bytes(c, 4, 4))
                  for c in cols)


def _matrix_cases() -> dict[str, tuple[list[tuple], list[tuple]]]:
    out: dict[str, tuple[list[tuple], list[tuple]]] = {}
    all_cases = cases()
    meshes = {}
    for cid, m, n, g, qk_norm, strategy, phase, module in all_cases:
        if (m, n) not in meshes:
            meshes[(m, n)] = TwoLevelLayout(n=n, m=m, dp=WORLD // (m * n)).build()
        mesh = meshes[(m, n)]
        model = model_config(g, qk_norm)
        torch.manual_seed(1)
        norm = QKNorm(1e-6, scope=model.qk_norm_scope) if qk_norm else None
        dense = DenseBlock(model.hidden, model.spec(), model.intermediate, qk_norm=norm)
        block = TwoLevelBlock.from_dense(dense, mesh, kv_replication=n > g)
        gen = torch.Generator().manual_seed(2 + mesh.axes.dp.rank)
        counted = _run_case(block, model, strategy if strategy != "-" else "auto", phase, module, gen)
        out[cid] = (counted, _predicted(model, m, n, strategy, phase, module))
    return out


@pytest.fixture(scope="module")
def matrix() -> list[dict]:
    return run_distributed(matrix_rank, WORLD, timeout=1200)


with toy_strategy.registered():
    CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_counted_equals_modelled(matrix, case):
    cid, m = case[0], case[1]
    for rank, result in enumerate(matrix):
        counted, predicted = result[cid]
        assert counted == predicted, f"rank {rank}: counted {counted} != predicted {predicted}"
    axes = {r[1] for r in matrix[0][cid][0]}
    if m > 1 and case[7] != "mlp":  # the segment axis is exercised where it exists
        assert "m" in axes
    if "kvrep" in cid and case[7] != "mlp":  # so is the replicated-KV gradient sum
        assert "kv_rep" in axes
    if case[6] == "prefill8" and m > 1 and case[5] == "score_allreduce":  # causal blocks: masked keys skipped
        full = BATCH * (8 // case[2]) * 8 * 8
        scores = [r for r in matrix[0][cid][0] if r[2] == "scores"]
        assert scores and all(r[3] < full for r in scores), scores
    tags = {r[2] for r in matrix[0][cid][0]}
    if m > 1 and case[5] == "score_allreduce" and case[7] != "mlp":  # which split tail ran
        if case[6] == "prefill8":
            assert "probs" in tags and "attn_rows" not in tags, tags
        if case[6] == "prefill32" or (case[6] == "prefill30" and m == 2):
            assert {"v", "attn_rows"} <= tags and "probs" not in tags, tags


@pytest.mark.parametrize("cid", COMPOSED)
def test_composed_layout_trains_exactly(matrix, cid):
    """dp=2 x sp=2 x 1x2, Llama and Qwen3, ZeRO-2 and ZeRO-3: every step's loss, step 0's gradients, every step's
    clipped gradient norm and the weights after 4 steps within 1e-5 of the dense run on the two replicas' batches."""
    for rank, result in enumerate(matrix):
        errors = {k: v for k, v in result[cid].items() if k != "counted"}
        bad = {k: v for k, v in errors.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: relative errors above 1e-5: {bad}"
        assert len(errors) == 2 * 4 + 2, errors


@pytest.mark.parametrize("cid", COMPOSED)
def test_composed_layout_counted_equals_modelled(matrix, cid):
    """Every collective the composed step counts (the inputs' all-gathers over sp, Ulysses' all-to-alls, the
    group's reduces, the q/k norms' and the inner attention's segment collectives; forward and backward), with
    its bytes, equals ``costmodel.training.step_collectives``' (ZeRO's left out: DeepSpeed sends it)."""
    predicted = composed_modelled(COMPOSED[cid][0])
    for rank, result in enumerate(matrix):
        counted = sorted(result[cid]["counted"])
        assert counted == predicted, f"rank {rank}: counted {counted} != modelled {predicted}"
    axes = {r[1] for r in predicted}
    assert {"sp", "tp", "m"} <= axes and {"batch", "positions"} <= {r[2] for r in predicted}, axes
