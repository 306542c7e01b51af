"""Vocab-parallel embedding, LM head and cross-entropy against the dense computation: one 4-rank gloo
launch runs every case (the core layers with V divisible and not, Llama / Qwen3 / GPT-NeoX patched with
``vocab_parallel=True`` at 2x2 and 1x4, the dense save / load round trip); the tests assert per case."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ds_twolevel import CommCounter, TwoLevelLayout
from ds_twolevel.layers.vocab_parallel import (VocabParallelEmbedding, VocabParallelLMHead, modelled_bytes,
                                               vocab_parallel_cross_entropy, vocab_range)
from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.testing import run_distributed
from hf_integration import load_partitioned, patch_model
from hf_integration.partitioned import partitioned_layers
from hf_integration.testing import rel_err, sample_batch, shard_grad_errors, tiny_model
from hf_integration.vocab_parallel import HFVocabEmbedding, HFVocabHead

WORLD = 4
TOL = 1e-5
LAYOUTS = {"2x2": dict(n=2, m=2), "1x4": dict(n=1, m=4)}
MODELS = {  # case -> (arch, overrides): tied Llama, tied Qwen3 with a vocabulary 4 does not divide, untied NeoX
    "llama": ("llama", dict(tie_word_embeddings=True, attention_bias=False, mlp_bias=False)),
    "qwen3_v98": ("qwen3", dict(tie_word_embeddings=True, vocab_size=98)),
    "gpt_neox": ("gpt_neox", dict(attention_bias=False)),
}
"""(no attention biases: the key bias's gradient is analytically zero, rounding noise that AdamW's
normalised step would blow up to a full learning-rate step on either side)."""
LR = 1e-4
"""AdamW steps each element by about lr whatever its gradient's size, so a gradient element that is
mostly cancellation (relative error 1e-3 where the dense one is 1e-7 of the tensor's largest) moves
the weight by lr x that error: at lr 1e-4 the weights after 4 steps stay ~1e-8 of the largest weight
from dense while the steps move them ~6e-4 of it (a wrong gradient or a doubly-stepped tied weight shows)."""
STEPS = 4
NEW_TOKENS = 8
SP_CASES = [("llama", "2x2"), ("qwen3_v98", "1x4")]
"""(model, layout) run with sequence_parallel=True as well."""


# -- core layers ----------------------------------------------------------------------------------
def _core(tp: AxisGroup, vocab: int) -> dict:
    """Embedding -> head -> loss on vocab shards vs nn.Embedding / F.cross_entropy (forward, gradients)."""
    torch.manual_seed(0)
    hidden, b, s = 16, 2, 8
    table = torch.randn(vocab, hidden, dtype=torch.float64)
    head_w = torch.randn(vocab, hidden, dtype=torch.float64)
    ids = torch.randint(0, vocab, (b, s))
    ids[0, :2] = 3  # padding_idx: no gradient to its row
    labels = torch.randint(0, vocab, (b, s))
    labels[1, -3:] = -100
    dense_emb = torch.nn.Embedding(vocab, hidden, padding_idx=3, dtype=torch.float64)
    dense_head = torch.nn.Linear(hidden, vocab, bias=True, dtype=torch.float64)
    with torch.no_grad():
        dense_emb.weight.copy_(table)
        dense_head.weight.copy_(head_w)
    x_dense = dense_emb(ids)
    loss_dense = F.cross_entropy(dense_head(x_dense).reshape(-1, vocab), labels.reshape(-1))
    loss_dense.backward()

    emb = VocabParallelEmbedding.from_dense(dense_emb, tp)
    head = VocabParallelLMHead.from_dense(dense_head, tp)
    with CommCounter() as comm:
        x = emb(ids)
        logits = head(x)  # (b, s, V_r)
        loss = vocab_parallel_cross_entropy(logits, labels, vocab_start=head.start, tp=tp, vocab_size=vocab)
        loss.backward()
    rows = torch.arange(*vocab_range(vocab, tp.size, tp.rank))
    counted = {(op, tag, bwd): sent for (op, _, tag, bwd), (_, sent) in comm.summary().items()}
    modelled = modelled_bytes(tokens=b * s, hidden=hidden, vocab_size=vocab, tp=tp.size, element_size=8,
                              loss_element_size=8)
    total, count = vocab_parallel_cross_entropy(head(emb(ids)), labels, vocab_start=head.start, tp=tp,
                                                reduction="sum_count")
    with torch.no_grad():
        full = head.full_logits(x)
    return {
        "rows": (head.start, head.stop), "logits_cols": logits.shape[-1],
        "emb_err": rel_err(x, x_dense), "loss_err": rel_err(loss, loss_dense),
        "sum_count_err": rel_err(total / count, loss_dense), "count": int(count),
        "emb_grad_err": rel_err(emb.weight.grad, dense_emb.weight.grad[rows]),
        "pad_row_grad_zero": bool((dense_emb.weight.grad[3] == 0).all()) and (
            not (head.start <= 3 < head.stop) or bool((emb.weight.grad[3 - head.start] == 0).all())),
        "head_grad_err": rel_err(head.weight.grad, dense_head.weight.grad[rows]),
        "bias_grad_err": rel_err(head.bias.grad, dense_head.bias.grad[rows]),
        "full_logits_err": rel_err(full, dense_head(x_dense)),
        "bytes_counted": counted, "bytes_modelled": modelled,
    }


def _core_sequence_parallel(tp: AxisGroup) -> dict:
    """The embedding's reduce-scatter along s gives this rank's s/p tokens; the head all-gathers them."""
    torch.manual_seed(1)
    vocab, hidden, b, s = 30, 8, 2, 8
    dense_emb = torch.nn.Embedding(vocab, hidden, dtype=torch.float64)
    ids = torch.randint(0, vocab, (b, s))
    emb = VocabParallelEmbedding.from_dense(dense_emb, tp, sequence_parallel=True)
    mine = emb(ids)  # (b, s/p, H)
    chunk = s // tp.size
    (mine * torch.arange(1, hidden + 1, dtype=torch.float64)).sum().backward()
    want = dense_emb(ids)
    # the ranks' losses add up to the loss of all tokens: the gradient of every row is that of the whole sequence
    (want * torch.arange(1, hidden + 1, dtype=torch.float64)).sum().backward()
    rows = torch.arange(*vocab_range(vocab, tp.size, tp.rank))
    return {"shape": tuple(mine.shape), "err": rel_err(mine, want[:, tp.rank * chunk:(tp.rank + 1) * chunk]),
            "grad_err": rel_err(emb.weight.grad, dense_emb.weight.grad[rows])}


# -- Hugging Face models --------------------------------------------------------------------------
def _labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill(mask == 0, -100)


def _shard_value_errors(dense: torch.nn.Module, patched: torch.nn.Module) -> float:
    """max |patched - dense| over every parameter element (each compared with its dense slice), relative to the
    dense model's largest weight: the whole parameter vector's relative error. (Per tensor, the layer-norm biases,
    which start at zero and are ~lr*steps after the steps, would compare rounding with rounding.)"""
    worst = 0.0
    layers = partitioned_layers(patched)
    inside = tuple(p + "." for p, _ in layers)
    dense_params = dict(dense.named_parameters(remove_duplicate=False))
    scale = max(float(p.detach().abs().max()) for p in dense.parameters())
    for name, param in patched.named_parameters():
        if not name.startswith(inside):
            worst = max(worst, rel_err(param, dense_params[name], scale))
    for path, layer in layers:
        owner = path[: -len(layer.target) - 1] if layer.target else path
        for name, (index, _) in layer.shard_index().items():
            tmap = layer.tensor_maps[name]
            full = dense_params[f"{owner}.{tmap.key}"].detach()
            expected = full.index_select(tmap.hf_dim, tmap.hf_index(index))
            actual = layer.get_parameter(name)
            worst = max(worst, rel_err(actual, expected.t() if tmap.transpose else expected, scale))
    return worst


def _hf_case(arch: str, overrides: dict, mesh) -> dict:
    """Loss, every gradient, weights after AdamW steps, greedy generate and parameter counts vs dense."""
    dense = tiny_model(arch, seed=2, **overrides)
    vocab = dense.config.vocab_size
    ids, mask = sample_batch(7)
    ids = ids % vocab
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want_single = dense.generate(ids[1:, :6], **gen)
        want_batched = dense.generate(ids, attention_mask=mask, **gen)
    patched = copy.deepcopy(dense)
    report = patch_model(patched, mesh, vocab_parallel=True)
    out: dict = {"replaced": dict(report.replaced), "share": report.share}
    with torch.no_grad():
        out["gen_single_equal"] = bool(torch.equal(patched.generate(ids[1:, :6], **gen), want_single))
        out["gen_batched_equal"] = bool(torch.equal(patched.generate(ids, attention_mask=mask, **gen), want_batched))
        out["eval_logits_err"] = rel_err(patched(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                         dense(input_ids=ids, attention_mask=mask).logits[mask.bool()])
    emb, head = patched.get_input_embeddings(), patched.get_output_embeddings()
    dense_vocab_params = sum(p.numel() for p in {id(p): p for p in (*dense.get_input_embeddings().parameters(),
                                                                   *dense.get_output_embeddings().parameters())}.values())
    local_vocab_params = sum(p.numel() for p in {id(p): p for p in (*emb.parameters(), *head.parameters())}.values())
    rows = [b - a for a, b in (vocab_range(vocab, mesh.axes.tp.size, r) for r in range(mesh.axes.tp.size))]
    out.update(types=(type(emb).__name__, type(head).__name__), vocab_params=(local_vocab_params, dense_vocab_params),
               rows=rows, my_rows=head.rows, tied=head.weight is emb.weight,
               dense_tied=dense.get_output_embeddings().weight is dense.get_input_embeddings().weight,
               params_local=report.params_local, params_dense=report.params_dense,
               dense_numel=sum(p.numel() for p in dense.parameters()),
               tags=all(getattr(p, "tensor_model_parallel", False) and p.partition_dim == 0
                        for p in (*emb.parameters(), *head.parameters())))
    shapes: list = []
    handle = head.register_forward_hook(lambda mod, args, result: shapes.append(tuple(result.shape)))
    dense.train(), patched.train()
    initial = copy.deepcopy(dense)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=LR)
    opt_p = torch.optim.AdamW(patched.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        step_ids, step_mask = sample_batch(20 + step)
        step_ids = step_ids % vocab
        loss_d = dense(input_ids=step_ids, attention_mask=step_mask, labels=_labels(step_ids, step_mask)).loss
        result = patched(input_ids=step_ids, attention_mask=step_mask, labels=_labels(step_ids, step_mask))
        result.loss.backward(), loss_d.backward()
        losses.append(rel_err(result.loss, loss_d))
        if step == 0:
            out["grad_err"] = shard_grad_errors(dense, patched)
            out["train_logits"] = result.logits
        opt_d.step(), opt_p.step(), opt_d.zero_grad(), opt_p.zero_grad()
    handle.remove()
    out.update(loss_err=max(losses), weights_err=_shard_value_errors(dense, patched), head_out_shapes=shapes,
               moved=max(float((p - q).detach().abs().max()) for p, q in zip(dense.parameters(), initial.parameters()))
               / max(float(p.detach().abs().max()) for p in dense.parameters()),
               still_tied=patched.get_output_embeddings().weight is patched.get_input_embeddings().weight)
    return out


def _roundtrip(arch: str, overrides: dict, mesh, root: Path) -> dict:
    """save_pretrained of the patched model (vocab rows gathered) -> load_partitioned(vocab_parallel=True)."""
    dense = tiny_model(arch, seed=4, **overrides)
    patched = copy.deepcopy(dense)
    patch_model(patched, mesh, vocab_parallel=True, probe=False)
    dst = root / f"{arch}_vocab_saved"
    patched.save_pretrained(dst)
    inner = tuple(path + "." for path, layer in partitioned_layers(patched)
                  if not isinstance(layer, (HFVocabEmbedding, HFVocabHead)))  # core names inside attention / MLP
    extra = sorted(k for k in set(patched.state_dict()) - set(dense.state_dict()) if not k.startswith(inner))
    out: dict = {"extra_names": extra}
    if dist.get_rank() == 0:
        back = type(dense).from_pretrained(dst).eval()
        ref = dense.state_dict()
        out["saved_exact"] = sorted(back.state_dict()) == sorted(ref) and all(
            torch.equal(back.state_dict()[k], v) for k, v in ref.items())
    lazy, _ = load_partitioned(dst, mesh, model_class=type(dense), vocab_parallel=True)
    mine, theirs = lazy.state_dict(), patched.state_dict()
    out["loaded_exact"] = sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], v) for k, v in theirs.items())
    out["loaded_tied"] = lazy.get_output_embeddings().weight is lazy.get_input_embeddings().weight
    ids, mask = sample_batch(9)
    ids = ids % dense.config.vocab_size
    with torch.no_grad():  # the same shards compute the same logits, bit for bit
        out["loaded_logits_equal"] = bool(torch.equal(lazy(input_ids=ids, attention_mask=mask).logits,
                                                      patched.eval()(input_ids=ids, attention_mask=mask).logits))
    out["sequence_parallel_loss_err"] = _loaded_sequence_parallel(dst, mesh, dense)
    dist.barrier()
    return out


def _loaded_sequence_parallel(path: Path, mesh, dense: torch.nn.Module) -> float:
    """load_partitioned(..., sequence_parallel=True, vocab_parallel=True) (its parity probe runs the whole
    sequence): the loss of each rank's shard, the shares added, against the dense model's."""
    from hf_integration.sequence_data import shard_batch, whole_loss

    model, _ = load_partitioned(path, mesh, model_class=type(dense), sequence_parallel=True, vocab_parallel=True)
    ids, mask = sample_batch(9)
    ids = ids % dense.config.vocab_size
    batch = {"input_ids": ids, "attention_mask": mask, "labels": _labels(ids, mask)}
    with torch.no_grad():
        return rel_err(whole_loss(model(**shard_batch(batch, mesh)).loss, mesh), dense.eval()(**batch).loss)


VOCAB_TAGS = ("embed", "embed_ids", "head_in", "labels", "ce_max", "ce_sums", "loss_grad")
"""the collectives of the embedding, the head and the loss."""


def _modelled_inputs(mesh, batch: int, seq: int, padding_mask: bool) -> list[tuple]:
    """The cost model's per-forward input all-gathers under sequence parallelism (shard descriptions, positions)."""
    from ds_twolevel.costmodel.training import TrainLayout, TrainSetup, input_collectives

    layout = TrainLayout(1, 1, mesh.layout.n, mesh.layout.m)
    setup = TrainSetup(batch=batch, seq=seq, sequence_parallel=True, padding_mask=padding_mask)
    return sorted((c.op, c.axis, c.tag, c.numel, c.ranks, c.backward) for c in input_collectives(layout, setup))


def _sp_case(arch: str, overrides: dict, mesh) -> dict:
    """vocab_parallel with sequence_parallel: each rank feeds its shard of the batch (shard_batch); the ranks'
    loss shares add up to the dense loss, and every gradient is the dense one."""
    try:
        from hf_integration.sequence_data import shard_batch, whole_loss
    except ImportError as err:  # reported by the test as a failure, not skipped
        return {"error": f"sequence parallelism is not importable: {err}"}

    dense = tiny_model(arch, seed=5, **overrides)
    vocab = dense.config.vocab_size
    ids, mask = sample_batch(11, seq=14)  # 14 tokens on 4 ranks: shard_batch pads to 16
    ids = ids % vocab
    labels = _labels(ids, mask)
    patched = copy.deepcopy(dense)
    patch_model(patched, mesh, sequence_parallel=True, vocab_parallel=True)
    dense.train(), patched.train()
    loss_d = dense(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_d.backward()
    head = patched.get_output_embeddings()
    shapes: list = []
    handle = head.register_forward_hook(lambda mod, args, result: shapes.append(tuple(result.shape)))
    shard = shard_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, mesh)
    with CommCounter() as comm:
        share = patched(**shard).loss
        share.backward()
    handle.remove()
    counted = {(op, tag, bwd): sent for (op, _, tag, bwd), (_, sent) in comm.summary().items() if tag in VOCAB_TAGS}
    modelled = modelled_bytes(tokens=ids.shape[0] * 16, hidden=dense.config.hidden_size, vocab_size=vocab,
                              tp=mesh.axes.tp.size, sequence_parallel=True)
    out = {"inputs_counted": sorted((r.op, r.axis, r.tag, r.numel, r.ranks, r.backward) for r in comm.records
                                    if r.tag in ("batch", "positions")),
           "inputs_modelled": _modelled_inputs(mesh, ids.shape[0], 16, "attention_mask" in shard)}
    out |= {"loss_err": rel_err(whole_loss(share, mesh), loss_d), "grad_err": shard_grad_errors(dense, patched),
           "head_out_shapes": shapes, "my_rows": head.rows, "bytes_counted": counted, "bytes_modelled": modelled}
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out["gen_batched_equal"] = bool(torch.equal(patched.eval().generate(ids, attention_mask=mask, **gen),
                                                    dense.eval().generate(ids, attention_mask=mask, **gen)))
    return out


CLIP = 0.05
"""gradient clipping of the DeepSpeed case, below the gradient norm: the engine computes the global norm
(vocab shards counted as shards, the tied parameter once), compared with the dense one."""


def _ds_config(mesh, stage: int, *, sequence_parallel: bool, vocab_parallel: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "two_level": {"n": mesh.layout.n, "m": mesh.layout.m, "sequence_parallel": sequence_parallel,
                          "vocab_parallel": vocab_parallel}}


def _engine_step(engine, step: int, sequence_parallel: bool) -> torch.Tensor:
    """One step on batch ``30 + step``; returns the batch's loss (with sequence_parallel: the shares added)."""
    from hf_integration.sequence_data import shard_batch, whole_loss

    ids, mask = sample_batch(30 + step)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": _labels(ids, mask)}
    mesh = engine.two_level.mesh
    loss = engine(**(shard_batch(batch, mesh) if sequence_parallel else batch)).loss
    engine.backward(loss)
    engine.step()
    return (whole_loss(loss, mesh) if sequence_parallel else loss).detach()


def _dense_state(engine) -> dict:
    """The engine's dense fp32 weights and Adam moments (collective)."""
    from ds_twolevel.deepspeed.checkpoint import current_manifest
    from ds_twolevel.deepspeed.engine_state import dense_state

    return dense_state(engine, engine.two_level.mesh, current_manifest(engine))


def _state_error(got: dict, want: dict) -> float:
    return max(rel_err(got[kind][name], tensor) for kind in want for name, tensor in want[kind].items())


def _deepspeed_case(meshes: dict, stage: int, root: Path) -> dict:
    """ds_twolevel.initialize with sequence_parallel and vocab_parallel, ZeRO ``stage``: 2 clipped AdamW steps vs
    dense; the checkpoint resumed at the same layout; resumed at 1x4 with both switches off (the weights and
    moments identical to the saved ones, the next step's loss the uninterrupted run's), saved there and resumed
    at 2x2 with both on again (the same checks). A tied Llama with 98 tokens: vocab shards of 24 and 25 rows."""
    mesh = meshes["2x2"]
    import ds_twolevel

    arch, overrides = MODELS["llama"][0], {**MODELS["llama"][1], "vocab_size": 98}
    dense = tiny_model(arch, seed=6, **overrides).train()
    patched = copy.deepcopy(dense)
    both = dict(sequence_parallel=True, vocab_parallel=True)
    off = dict(sequence_parallel=False, vocab_parallel=False)
    engine, *_ = ds_twolevel.initialize(model=patched, config=_ds_config(mesh, stage, **both), mesh=mesh)
    opt = torch.optim.AdamW(dense.parameters(), lr=LR, weight_decay=0.01)
    losses, norms, engine_norms = [], [], []
    for step in range(2):
        ids, mask = sample_batch(30 + step)
        loss_d = dense(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss
        loss_d.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(dense.parameters(), CLIP)))
        opt.step(), opt.zero_grad()
        losses.append(rel_err(_engine_step(engine, step, True), loss_d))
        engine_norms.append(float(engine.get_global_grad_norm()))
    module = engine.module
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=stage == 3):
        weights = _shard_value_errors(dense, module)
    out = {"loss_err": max(losses), "weights_err": weights, "dense_norms": norms, "engine_norms": engine_norms,
           "vocab": type(module.get_output_embeddings()).__name__}
    ckpt = root / f"ds_zero{stage}"
    tag_dir = ds_twolevel.save_checkpoint(engine, ckpt)
    saved = _dense_state(engine)
    from ds_twolevel.deepspeed.checkpoint import dense_from_checkpoint  # what ds-twolevel convert writes

    out["convert_err"] = _state_error(dense_from_checkpoint(tag_dir, states=tuple(saved)), saved)
    resumed, *_ = ds_twolevel.initialize(model=tiny_model(arch, seed=9, **overrides).train(),
                                         config=_ds_config(mesh, stage, **both), mesh=mesh)
    ds_twolevel.load_checkpoint(resumed, ckpt)
    with deepspeed.zero.GatheredParameters(list(resumed.module.parameters()), enabled=stage == 3):
        out["resumed_err"] = _shard_value_errors(dense, resumed.module)
    # 2x2 with both switches -> 1x4 with both off -> 2x2 with both on, each compared with the uninterrupted engine
    plain, *_ = ds_twolevel.initialize(model=tiny_model(arch, seed=9, **overrides).train(),
                                       config=_ds_config(meshes["1x4"], stage, **off), mesh=meshes["1x4"])
    ds_twolevel.load_checkpoint(plain, ckpt)
    out["off_1x4_vocab"] = type(plain.module.get_output_embeddings()).__name__
    out["off_1x4_state_err"] = _state_error(_dense_state(plain), saved)
    out["off_1x4_next_loss_err"] = rel_err(_engine_step(plain, 2, False), _engine_step(engine, 2, True))
    ds_twolevel.save_checkpoint(plain, root / f"ds_zero{stage}_off_1x4")
    saved = _dense_state(plain)
    back, *_ = ds_twolevel.initialize(model=tiny_model(arch, seed=9, **overrides).train(),
                                      config=_ds_config(mesh, stage, **both), mesh=mesh)
    ds_twolevel.load_checkpoint(back, root / f"ds_zero{stage}_off_1x4")
    out["on_2x2_state_err"] = _state_error(_dense_state(back), saved)
    out["on_2x2_next_loss_err"] = rel_err(_engine_step(back, 3, True), _engine_step(engine, 3, True))
    return out


def _all_cases(root: str) -> dict:
    out: dict = {}
    meshes = {name: TwoLevelLayout(**kw).build() for name, kw in LAYOUTS.items()}
    tp = meshes["1x4"].axes.tp
    for vocab in (96, 98, 5):
        out[f"core_v{vocab}"] = _core(tp, vocab)
    out["core_seq"] = _core_sequence_parallel(tp)
    for name, mesh in meshes.items():
        for case, (arch, overrides) in MODELS.items():
            out[f"{case}_{name}"] = _hf_case(arch, overrides, mesh)
    for case in ("llama", "gpt_neox"):
        arch, overrides = MODELS[case]
        out[f"roundtrip_{case}"] = _roundtrip(arch, overrides, meshes["2x2"], Path(root))
    for stage in (2, 3):
        out[f"deepspeed_zero{stage}"] = _deepspeed_case(meshes, stage, Path(root))
    for case, layout in SP_CASES:
        arch, overrides = MODELS[case]
        out[f"sp_{case}_{layout}"] = _sp_case(arch, overrides, meshes[layout])
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return run_distributed(_all_cases, WORLD, str(root), timeout=1500)


# -- assertions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [96, 98, 5])
def test_core_matches_dense(results, vocab):
    for rank, res in enumerate(results):
        core = res[f"core_v{vocab}"]
        assert core["rows"] == vocab_range(vocab, WORLD, rank)
        assert core["logits_cols"] == core["rows"][1] - core["rows"][0]
        for key in ("emb_err", "loss_err", "sum_count_err", "emb_grad_err", "head_grad_err", "bias_grad_err",
                    "full_logits_err"):
            assert core[key] < 1e-12, (rank, key, core[key])
        assert core["pad_row_grad_zero"]
        assert core["count"] == 13


def test_core_counted_bytes_equal_modelled(results):
    for res in results:
        for vocab in (96, 98, 5):
            core = res[f"core_v{vocab}"]
            assert core["bytes_counted"] == core["bytes_modelled"], vocab


def test_core_sequence_parallel_embedding(results):
    for res in results:
        assert res["core_seq"]["shape"] == (2, 2, 8)
        assert res["core_seq"]["err"] < 1e-12 and res["core_seq"]["grad_err"] < 1e-12


CASES = [f"{case}_{layout}" for layout in LAYOUTS for case in MODELS]


@pytest.mark.parametrize("case", CASES)
def test_hf_loss_gradients_and_steps_match_dense(results, case):
    for res in results:
        r = res[case]
        assert r["loss_err"] < TOL and r["grad_err"] < TOL and r["weights_err"] < TOL, r
        assert r["train_logits"] is None  # never a shard handed out as the logits
        assert r["moved"] > 20 * TOL  # the steps moved the weights far more than the tolerance


@pytest.mark.parametrize("case", CASES)
def test_hf_generate_matches_unpatched(results, case):
    for res in results:
        assert res[case]["gen_single_equal"] and res[case]["gen_batched_equal"]
        assert res[case]["eval_logits_err"] < TOL


@pytest.mark.parametrize("case", CASES)
def test_hf_vocab_shards_per_rank(results, case):
    for rank, res in enumerate(results):
        r = res[case]
        assert r["types"] == ("HFVocabEmbedding", "HFVocabHead")
        assert r["tags"]
        local, dense = r["vocab_params"]
        hidden = 64
        assert local == (1 if r["tied"] else 2) * r["rows"][rank] * hidden
        if len(set(r["rows"])) == 1:  # V divisible by n*m: exactly 1/(n*m)
            assert local * WORLD == dense
        assert sum(r["rows"]) * hidden * (1 if r["tied"] else 2) == dense
        assert r["params_dense"] == r["dense_numel"]  # verify() counts the dense model right
        assert r["tied"] == r["dense_tied"] == r["still_tied"]
        # training never materialises full-vocab logits: the head returned (b, s, V_r) on every step
        assert r["head_out_shapes"] == [(2, 12, r["my_rows"])] * STEPS


def test_tied_models_are_tied(results):
    assert results[0]["llama_2x2"]["tied"] and results[0]["qwen3_v98_1x4"]["tied"]
    assert not results[0]["gpt_neox_2x2"]["tied"]


@pytest.mark.parametrize("case", ["llama", "gpt_neox"])
def test_save_and_load_partitioned_round_trip(results, case):
    assert results[0][f"roundtrip_{case}"]["saved_exact"]
    for res in results:
        r = res[f"roundtrip_{case}"]
        assert r["extra_names"] == [] and r["loaded_exact"] and r["loaded_logits_equal"], r
        assert r["sequence_parallel_loss_err"] < TOL, r
        assert r["loaded_tied"] == (case == "llama")


@pytest.mark.parametrize("case,layout", SP_CASES)
def test_with_sequence_parallel_matches_dense(results, case, layout):
    for res in results:
        r = res[f"sp_{case}_{layout}"]
        assert "error" not in r, r.get("error")
        assert r["loss_err"] < TOL and r["grad_err"] < TOL, r
        assert r["gen_batched_equal"]
        assert r["head_out_shapes"] == [(2, 16, r["my_rows"])]  # V/p columns of the whole sequence, never V
        assert r["bytes_counted"] == r["bytes_modelled"]
        assert r["inputs_counted"] == r["inputs_modelled"] and len(r["inputs_counted"]) == 2, r


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_initialize_with_vocab_parallel(results, stage):
    for res in results:
        r = res[f"deepspeed_zero{stage}"]
        assert r["vocab"] == "HFVocabHead"
        assert min(r["dense_norms"]) > CLIP  # clipping acted on every step
        assert rel_err(torch.tensor(r["engine_norms"]), torch.tensor(r["dense_norms"])) < TOL, r
        assert r["loss_err"] < TOL and r["weights_err"] < TOL, r
        assert r["resumed_err"] < TOL, r  # same layout: the saved shards come back


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_resharded_with_switches_flipped(results, stage):
    """2x2 with sequence_parallel and vocab_parallel -> 1x4 with both off -> 2x2 with both on: each resume holds
    exactly the saved dense weights and Adam moments, and its next step's loss is the uninterrupted run's."""
    for res in results:
        r = res[f"deepspeed_zero{stage}"]
        assert r["off_1x4_vocab"] == "Linear"
        assert r["convert_err"] == 0, r  # the dense weights and moments of the saved vocab shards
        assert r["off_1x4_state_err"] == 0 and r["on_2x2_state_err"] == 0, r
        assert r["off_1x4_next_loss_err"] < TOL and r["on_2x2_next_loss_err"] < TOL, r


# -- single process: errors ------------------------------------------------------------------------
def test_vocab_range_refuses_more_ranks_than_rows():
    with pytest.raises(ValueError, match=r"vocab_size \(3\) is smaller than the 4"):
        vocab_range(3, 4, 0)


def test_label_outside_vocabulary_is_refused():
    tp = AxisGroup.single("tp")
    with pytest.raises(ValueError, match=r"labels \[7\] are outside the vocabulary \[0, 5\)"):
        vocab_parallel_cross_entropy(torch.zeros(3, 5), torch.tensor([1, 7, -100]), vocab_start=0, tp=tp, vocab_size=5)


def test_non_causal_model_is_refused_before_patching():
    mesh = TwoLevelLayout(n=1, m=1).build()
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="vocab_parallel"):
        patch_model(model, mesh, vocab_parallel=True)
    assert not partitioned_layers(model)


def test_loss_function_refuses_full_logits():
    mesh = TwoLevelLayout(n=1, m=1).build()
    model = tiny_model("llama")
    patch_model(model, mesh, vocab_parallel=True)
    ids, mask = sample_batch(1)
    with pytest.raises(ValueError, match="vocab columns"):
        model.loss_function(torch.zeros(2, 12, 95), ids, vocab_size=96)
    assert isinstance(model.get_input_embeddings(), HFVocabEmbedding)
    assert isinstance(model.get_output_embeddings(), HFVocabHead)
