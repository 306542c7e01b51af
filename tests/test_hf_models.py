"""Hugging Face models patched on n x m ranks vs the unpatched model: one 8-rank gloo launch runs
every case (architectures x layouts, checkpoints, real MiniLM weights, the parity probe refusing
wrong specs on every rank); the tests assert per case."""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ds_twolevel import TwoLevelLayout
from ds_twolevel.testing import run_distributed
from hf_integration import SPECS, load_partitioned, patch_model, verify
from hf_integration.specs import QKNormStyle
from hf_integration.testing import (ARCHITECTURES, DECODERS, SENTENCES, compare_model, dense_run, mean_pool,
                                    minilm_dir, rel_err, sample_batch, tiny_model)

WORLD = 8
TOL = 1e-5
# (name, layout, strategy, kv_replication): n*m exceeds the 2 KV heads of the GQA models in all
LAYOUTS = [
    ("dp2_n2_m2", dict(n=2, m=2, dp=2), "auto", False),
    ("n2_m4", dict(n=2, m=4, dp=1), "score_allreduce", False),
    ("n4_m2_kvrep", dict(n=4, m=2, dp=1), "qk_allgather", True),
]
SHARDED = ("llama", "gpt2", "bert", "mixtral", "qwen2_moe")
"""architectures whose round trip starts from a sharded checkpoint (model.safetensors.index.json)."""
EXTRA = [  # (case, arch, layout, strategy, overrides)
    ("llama_eager_n2_m4", "llama", dict(n=2, m=4, dp=1), "auto", dict(attn_implementation="eager")),
    ("llama_n1_m8", "llama", dict(n=1, m=8, dp=1), "auto", {}),
]


def _roundtrip(arch: str, mesh, root: Path) -> dict:
    """save_pretrained (dense) -> load_partitioned (slices) -> save_pretrained (gathered) -> from_pretrained."""
    dense = tiny_model(arch, seed=3)
    src, dst = root / f"{arch}_dense", root / f"{arch}_roundtrip"
    if dist.get_rank() == 0:  # sharded index for half of the architectures
        dense.save_pretrained(src, max_shard_size="40KB" if arch in SHARDED else "1GB")
    dist.barrier()
    lazy, report = load_partitioned(src, mesh, model_class=type(dense))
    eager = copy.deepcopy(dense)
    patch_model(eager, mesh, probe=False)  # compare_model probes every architecture; here only the shards matter
    ids, mask = sample_batch(5)
    keep = mask.bool()
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).logits[keep]
        got_lazy = lazy(input_ids=ids, attention_mask=mask).logits[keep]
        got_eager = eager(input_ids=ids, attention_mask=mask).logits[keep]
    same_shards = all(torch.equal(a, b) for a, b in zip(lazy.state_dict().values(), eager.state_dict().values()))
    lazy.save_pretrained(dst)  # patched model: gathers and writes the dense checkpoint
    out = {"lazy_logits_err": rel_err(got_lazy, want), "lazy_equals_patched": bool(torch.equal(got_lazy, got_eager))
           and same_shards, "lazy_share": report.share, "sharded_src": (src / "model.safetensors.index.json").exists()}
    if dist.get_rank() == 0:
        back = type(dense).from_pretrained(dst).eval()
        ref = dense.state_dict()
        out["roundtrip_exact"] = sorted(back.state_dict()) == sorted(ref) and all(
            torch.equal(back.state_dict()[k], v) for k, v in ref.items())
        with torch.no_grad():
            out["roundtrip_logits_equal"] = bool(torch.equal(back(input_ids=ids, attention_mask=mask).logits[keep],
                                                             want))
    dist.barrier()
    return out


def _minilm(mesh) -> dict:
    """Real all-MiniLM-L6-v2 weights on n=4 x m=2: sentence embeddings vs the unpatched model."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    dense = AutoModel.from_pretrained(path).eval()
    patched = AutoModel.from_pretrained(path).eval()
    report = patch_model(patched, mesh)
    lazy, _ = load_partitioned(path, mesh, model_class=type(dense))
    with torch.no_grad():
        want = mean_pool(dense(**batch).last_hidden_state, batch["attention_mask"])
        got = mean_pool(patched(**batch).last_hidden_state, batch["attention_mask"])
        got_lazy = mean_pool(lazy(**batch).last_hidden_state, batch["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(got, want).min()
    return {"emb_err": rel_err(got, want), "emb_lazy_err": rel_err(got_lazy, want), "min_cos": float(cos),
            "replaced": dict(report.replaced), "share": report.share, "heads": dense.config.num_attention_heads}


def _bad_layout() -> str:
    """Every rank refuses the same impossible layout with the same message (no hang)."""
    mesh = TwoLevelLayout(n=8, m=1).build()
    model = tiny_model("llama")
    try:
        patch_model(model, mesh)
    except ValueError as err:
        untouched = type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
        return f"{err} | untouched={untouched}"
    return "no error"


def _spec_less_model(arch: str) -> torch.nn.Module:
    """A tiny seeded model of an architecture with no ArchSpec (GPT-J, OPT)."""
    import transformers

    torch.manual_seed(0)
    if arch == "gptj":
        config = transformers.GPTJConfig(vocab_size=96, n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=64,
                                         bos_token_id=None, eos_token_id=None)
    else:
        config = transformers.OPTConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                        ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


NO_SPEC = ("gptj", "opt")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all_single",
                "barrier", "broadcast", "broadcast_object_list", "reduce_scatter_tensor", "send", "recv")


def _refused_without_spec(arch: str, mesh) -> dict:
    """patch_model(strict=True) on an architecture with no spec: every call into torch.distributed during the
    call is counted (zero expected), and the model must be left as it was."""
    import torch.distributed.distributed_c10d as c10d

    model = _spec_less_model(arch)
    ids = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    calls: list[str] = []

    def counting(name: str, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    originals = [(ns, name, getattr(ns, name)) for ns in (dist, c10d) for name in _COLLECTIVES if hasattr(ns, name)]
    for ns, name, fn in originals:
        setattr(ns, name, counting(name, fn))
    try:
        patch_model(model, mesh, strict=True)
        message = "not refused"
    except ValueError as err:
        message = f"{type(err).__name__}: {err}"
    finally:
        for ns, name, fn in originals:
            setattr(ns, name, fn)
    with torch.no_grad():
        untouched = not verify(model).replaced and torch.equal(model(input_ids=ids).logits, before)
    return {"message": message, "collectives": calls, "untouched": untouched}


WRONG_SPECS = {  # the parity probe's cases: specs no shape check can fault
    "gemma2_no_softcap": ("gemma2", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, softcap=None))),
    "gemma3_norm_w": ("gemma3_text", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, norm_style=dataclasses.replace(s.attention.norm_style, formula="w")))),
    "llama_rope_interleaved": ("llama", lambda s: dataclasses.replace(s, rope_style="interleaved")),
    # llama-style: every layer rotated; wrong only on SmolLM3's NoPE layer 1
    "smollm3_rope_everywhere": ("smollm3", lambda s: dataclasses.replace(s, attention=dataclasses.replace(
        s.attention, use_rope=None))),
    # GLM4's pairs read from an interleaved table: the half-layout table is what HF passes
    "glm4_interleaved_table": ("glm4", lambda s: dataclasses.replace(s, rope_style="interleaved")),
}
REFUSED_AT = {"smollm3_rope_everywhere": "model.layers.1.self_attn"}
"""the layer each wrong spec's refusal names (default: the first attention layer)."""
LOAD_REFUSALS = ("llama_rope_interleaved", "smollm3_rope_everywhere")
"""wrong specs that load_partitioned (every layer gathered and probed) must refuse as well."""


def _refused(case: str, mesh, root: Path) -> dict:
    """A wrong spec registered for one call: patch_model (and, for LOAD_REFUSALS, load_partitioned)
    must refuse on every rank with the same ProbeError and leave the model as it was."""
    arch, wrong = WRONG_SPECS[case]
    good = SPECS[arch]
    model = tiny_model(arch)
    ids, mask = sample_batch(2)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    out: dict = {}
    SPECS[arch] = wrong(good)
    try:
        try:
            patch_model(model, mesh)
            out["patch"] = "not refused"
        except ValueError as err:
            out["patch"] = f"{type(err).__name__}: {err}"
        if case in LOAD_REFUSALS:
            out["load"] = _refused_load(arch, mesh, root)
    finally:
        SPECS[arch] = good
    with torch.no_grad():
        out["untouched"] = not verify(model).replaced and torch.equal(
            model(input_ids=ids, attention_mask=mask).logits, before)
    return out


def _refused_load(arch: str, mesh, root: Path) -> str:
    src = root / f"{arch}_probe_src"
    if dist.get_rank() == 0:
        tiny_model(arch).save_pretrained(src)
    dist.barrier()
    try:
        load_partitioned(src, mesh)
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    return "not refused"


def _rank_body(root: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    out: dict = {"seconds": {}}
    clock = time.perf_counter()

    def lap(part: str) -> None:  # seconds per part of the launch, printed with pytest -s
        nonlocal clock
        out["seconds"][part] = out["seconds"].get(part, 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()

    meshes = [(name, TwoLevelLayout(**layout).build(), strategy, kv_rep) for name, layout, strategy, kv_rep in LAYOUTS]
    groups = dist.distributed_c10d._world.group_count  # every new_group / split_group adds one
    for arch in ARCHITECTURES:  # the dense model and its outputs once, every layout against them
        dense = dense_run(arch)
        for name, mesh, strategy, kv_rep in meshes:
            out[(arch, name)] = compare_model(arch, mesh, strategy=strategy, kv_replication=kv_rep, dense=dense)
        lap(f"layouts {arch}")
    out["groups_created_by_patching"] = dist.distributed_c10d._world.group_count - groups
    for arch in ARCHITECTURES:
        out[("roundtrip", arch)] = _roundtrip(arch, meshes[0][1], Path(root))
        lap(f"roundtrip {arch}")
    for case, arch, layout, strategy, overrides in EXTRA:
        out[(arch, case)] = compare_model(arch, TwoLevelLayout(**layout).build(), strategy=strategy, **overrides)
    out["minilm"] = _minilm(TwoLevelLayout(n=4, m=2).build())
    out["bad_layout"] = _bad_layout()
    lap("extra, minilm, bad layout")
    for case in WRONG_SPECS:
        out[("refused", case)] = _refused(case, meshes[0][1], Path(root))
    for arch in NO_SPEC:
        out[("no_spec", arch)] = _refused_without_spec(arch, meshes[0][1])
    lap("probe refusals, no spec")
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("hf_ckpt")
    out = run_distributed(_rank_body, WORLD, str(root), timeout=1800)
    print(_summary(out))  # shown with pytest -s: the figures quoted in docs/hf_integration.md
    return out


def _summary(results: list[dict]) -> str:
    lines = [f"{'case':<28} {'logits rel err':>14} {'grad rel err':>12} {'generate':>9}"]
    for arch, layout in CASES:
        errs = [r[(arch, layout)] for r in results]
        gen = "-" if arch not in DECODERS else str(all(e["gen_single_equal"] and e["gen_batched_equal"] for e in errs))
        lines.append(f"{arch + ' ' + layout:<28} {max(e['logits_err'] for e in errs):>14.1e} "
                     f"{max(e['grad_err'] for e in errs):>12.1e} {gen:>9}")
    seconds = {part: max(r["seconds"][part] for r in results) for part in results[0]["seconds"]}
    lines.append("seconds (slowest rank): " + ", ".join(f"{p} {t:.1f}" for p, t in seconds.items()))
    mini = results[0]["minilm"]
    lines.append(f"MiniLM n=4 x m=2: embeddings rel err {max(r['minilm']['emb_err'] for r in results):.1e}, "
                 f"lazy {max(r['minilm']['emb_lazy_err'] for r in results):.1e}, min cosine {mini['min_cos']:.8f}")
    return "\n".join(lines)


def _worst(results: list[dict], key, metric: str) -> float:
    return max(r[key][metric] for r in results)


CASES = [(arch, name) for name, *_ in LAYOUTS for arch in ARCHITECTURES] + [(a, c) for c, a, *_ in EXTRA]


@pytest.mark.parametrize("arch,layout", CASES)
def test_logits_match_dense(results, arch, layout):
    assert _worst(results, (arch, layout), "logits_err") <= TOL


@pytest.mark.parametrize("arch,layout", CASES)
def test_gradients_match_dense(results, arch, layout):
    assert _worst(results, (arch, layout), "grad_err") <= TOL


@pytest.mark.parametrize("arch,layout", [c for c in CASES if c[0] in DECODERS])
def test_greedy_generate_identical(results, arch, layout):
    for r in results:
        case = r[(arch, layout)]
        assert case["gen_tokens"] == 16
        assert case["gen_single_equal"] and case["gen_batched_equal"]


@pytest.mark.parametrize("arch,layout", [c for c in CASES if c[0] in DECODERS])
def test_kv_cache_stays_partitioned(results, arch, layout):
    for r in results:  # HF's DynamicCache holds each rank's (b, g/n, s, d/m) slice only
        assert r[(arch, layout)]["cache_shape"] == r[(arch, layout)]["local_kv_shape"]


EXPECTED_LAYERS = {
    "qwen2_moe": {"Qwen2MoeAttention": 2, "Qwen2MoeSparseMoeBlock": 1, "Qwen2MoeMLP": 2},  # shared expert + dense
    "qwen3_moe": {"Qwen3MoeAttention": 2, "Qwen3MoeSparseMoeBlock": 1, "Qwen3MoeMLP": 1},  # layer 1 dense
}
"""partitioned modules per class where they are not 2 attention + 2 MLP layers."""


@pytest.mark.parametrize("arch,layout", CASES)
def test_every_layer_partitioned(results, arch, layout):
    case = results[0][(arch, layout)]
    if arch in EXPECTED_LAYERS:
        assert case["replaced"] == EXPECTED_LAYERS[arch]
    else:
        assert sorted(case["replaced"].values()) == [2, 2]  # 2 attention + 2 MLP layers
    assert case["share"] < 0.75  # this rank holds 1/(n*m) of every attention and MLP weight


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lazy_load_and_dense_roundtrip(results, arch):
    for r in results:
        case = r[("roundtrip", arch)]
        assert case["lazy_logits_err"] <= TOL
        assert case["lazy_equals_patched"]  # slices read from disk == slices of the live model
    assert results[0][("roundtrip", arch)]["roundtrip_exact"]
    assert results[0][("roundtrip", arch)]["roundtrip_logits_equal"]


def test_sharded_checkpoints_were_exercised(results):
    flags = {a: results[0][("roundtrip", a)]["sharded_src"] for a in ARCHITECTURES}
    assert all(flags[a] for a in SHARDED) and not flags["qwen2"]


def test_minilm_sentence_embeddings(results):
    for r in results:
        mini = r["minilm"]
        assert mini["heads"] == 12
        assert mini["emb_err"] <= TOL and mini["emb_lazy_err"] <= TOL
        assert mini["min_cos"] > 1 - 1e-6
        assert mini["replaced"] == {"BertAttention": 6, "BertLayer": 6}


def test_patching_creates_no_process_group(results):
    """patch_model (kv_replication included) only looks up the sub-groups the mesh built."""
    assert [r["groups_created_by_patching"] for r in results] == [0] * WORLD


def test_bad_layout_refused_on_every_rank(results):
    messages = {r["bad_layout"] for r in results}
    assert len(messages) == 1
    msg = messages.pop()
    assert "num_heads (4) is not divisible by n=8" in msg and "n=2 x m=4" in msg and "untouched=True" in msg


@pytest.mark.parametrize("case", list(WRONG_SPECS))
def test_probe_refuses_wrong_spec_on_every_rank(results, case):
    outcomes = [r[("refused", case)] for r in results]
    messages = {o["patch"] for o in outcomes}
    assert len(messages) == 1, messages  # the same refusal on every rank (errors max-reduced first)
    msg = messages.pop()
    assert msg.startswith("ProbeError: ") and "parity probe refuses" in msg and "nothing was partitioned" in msg
    layer = REFUSED_AT.get(case, "model.layers.0.self_attn")
    assert f"{layer} (" in msg and "relative error" in msg, msg
    if case in REFUSED_AT:  # the layers before it agree with the spec: only the wrong layer is named
        assert "model.layers.0.self_attn (" not in msg, msg
    assert all(o["untouched"] for o in outcomes)  # the dense modules were put back: same logits as before
    if case in LOAD_REFUSALS:  # load_partitioned gathers and probes every layer: it refuses too, naming it
        loads = {o["load"] for o in outcomes}
        assert len(loads) == 1, loads
        load = loads.pop()
        assert load.startswith("ProbeError: ") and f"{layer} (" in load and "the model was not returned" in load, load


@pytest.mark.parametrize("arch", NO_SPEC)
def test_strict_refuses_an_architecture_without_spec_on_every_rank(results, arch):
    outcomes = [r[("no_spec", arch)] for r in results]
    messages = {o["message"] for o in outcomes}
    assert len(messages) == 1, messages  # the same refusal on every rank
    msg = messages.pop()
    assert msg.startswith("ValueError: ") and f"architecture {arch!r} has no two-level spec" in msg, msg
    assert "strict=False" in msg and "falcon" in msg and "gpt_oss" in msg  # the supported list names the new ones
    assert all(o["collectives"] == [] for o in outcomes), [o["collectives"] for o in outcomes]  # zero collectives
    assert all(o["untouched"] for o in outcomes)


def test_verify_reports_counts():
    model = tiny_model("qwen3")
    patch_model(model, TwoLevelLayout(n=1, m=1).build())
    report = verify(model)
    assert report.replaced == {"Qwen3Attention": 2, "Qwen3MLP": 2} and report.left_dense == []
    assert report.params_local == report.params_dense == sum(p.numel() for p in tiny_model("qwen3").parameters())
