"""Every way of training in the "Which ways are exact" table of docs/accelerate_trainer.md, on CPU/gloo against a dense
single-process run, and the guard that refuses the ways that would corrupt the model.

Two launches run every scenario of tests/ecosystem_ranks.py: dp x n x m = 2 x 1 x 2 under torchrun
and 1 x 2 x 2 under the deepspeed launcher. The model is a seeded tiny Qwen3 (GQA, per-head q/k
norms); the sequence- and vocab-parallel cases train tiny Llama and Qwen3 models on padded sequences
and compare with a dense run each rank computes itself. Exact paths are compared with a dense run on the same rows (taken from what the ranks
recorded): torch AdamW (eps 1e-5: Adam amplifies fp32 noise by lr/eps, see test_deepspeed_e2e.py),
clip_grad_norm_, every step's loss and pre-clip gradient norm and every final weight within 1e-5
(relative). Refused paths must raise the guard's error on every rank at the first forward, before
any optimizer step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import ecosystem_ranks as R  # noqa: E402

TOL = 1e-5
WORLD = 4
LAYOUTS = {"dp2xn1xm2": ("torchrun", 1, 2, "accelerate_ds_z0,accelerate_ds_z1"), "dp1xn2xm2": ("deepspeed", 2, 2, "")}


# -- launches --------------------------------------------------------------------------------------
def launch(launcher: str, n: int, m: int, out: Path, extra: str) -> tuple[subprocess.CompletedProcess, float]:
    from ds_twolevel.testing import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    port, script = free_port(), str(REPO / "tests" / "ecosystem_ranks.py")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port", str(port)]
    else:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(WORLD), "--master_port", str(port)]
    cmd += [script, "--layout", f"{n}x{m}", "--out", str(out), "--extra", extra]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    for leaked in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leaked.unlink()  # ds_twolevel releases its own; accelerate's DeepSpeed init does not
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run each layout's launch once per module: layout id -> (output folder, dp, n, m)."""
    done: dict[str, tuple[Path, int, int, int]] = {}

    def get(layout: str) -> tuple[Path, int, int, int]:
        if layout not in done:
            launcher, n, m, extra = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(layout)
            proc, seconds = launch(launcher, n, m, out, extra)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
            print(f"\n{layout} launch ({launcher}): {seconds:.0f} s")
            done[layout] = (out, WORLD // (n * m), n, m)
        return done[layout]

    return get


def records(out: Path, case: str) -> list[dict]:
    return [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(WORLD)]


# -- the dense reference ---------------------------------------------------------------------------
def dense_run(step_rows: list[torch.Tensor], weight_decay: float) -> dict:
    """Unpatched Qwen3, torch AdamW + clip_grad_norm_, each step's whole global batch in one forward."""
    model = R.build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=R.LR, betas=R.BETAS, eps=R.EPS, weight_decay=weight_decay)
    losses, norms = [], []
    for ids in step_rows:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), R.CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "grad_norms": norms, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def step_rows(recs: list[dict], tp: int, per_step: int) -> list[torch.Tensor]:
    """The global batch of every step: the micro-batches every replica (its tp rank 0) trained on."""
    replicas = [recs[r]["batches"] for r in range(0, WORLD, tp)]
    for r in range(WORLD):  # one batch per layer group: every rank of a layer saw its group's batches
        assert recs[r]["batches"] == replicas[r // tp], f"rank {r} saw other rows than its layer group"
    flat = [torch.tensor(b) for b in replicas[0]]
    assert len(flat) % per_step == 0 and len({str(b) for rep in replicas for b in rep}) == len(replicas) * len(flat)
    return [torch.cat([torch.tensor(b) for rep in replicas for b in rep[s:s + per_step]])
            for s in range(0, len(flat), per_step)]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def weight_error(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    return max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ref)


def check_exact(out: Path, case: str, tp: int, per_step: int, *, weight_decay: float = 0.01,
                losses_per_micro: bool = True) -> dict:
    """Every step's loss and grad norm and every final weight within TOL of the dense run; returns the errors."""
    recs = records(out, case)
    for r, rec in enumerate(recs):
        assert rec["error"] is None, f"{case} rank {r}: {rec['error']['trace']}"
    ref = dense_run(step_rows(recs, tp, per_step), weight_decay)
    losses = recs[0]["losses"]
    if losses_per_micro:  # the mean of the step's micro-batch losses (same token count each)
        losses = [sum(losses[s:s + per_step]) / per_step for s in range(0, len(losses), per_step)]
    assert len(losses) == len(ref["losses"]) == len(recs[0]["grad_norms"]) == R.STEPS, (case, len(losses))
    norms = [(a, b) for a, b in zip(recs[0]["grad_norms"], ref["grad_norms"]) if a is not None]
    assert norms or case.endswith("z0"), f"{case}: no gradient norm recorded"
    errs = {"loss": max(rel(a, b) for a, b in zip(losses, ref["losses"])),
            "grad_norm": max([rel(a, b) for a, b in norms], default=float("nan")),
            "weights": weight_error(torch.load(out / f"{case}.weights.pt"), ref["weights"])}
    assert all(norm > R.CLIP for norm in ref["grad_norms"]), "clipping must be active for the norm to matter"
    for what, err in errs.items():
        assert err <= TOL or (what == "grad_norm" and not norms), f"{case}: {what} relative error {err:.2e} > {TOL:.0e}"
    return errs


def check_refused(out: Path, case: str, *fragments: str, tp: int = WORLD, refused: list[int] | None = None) -> str:
    """The ranks ``refused`` (default: all) raised the guard's error at the first forward, before any
    step, the same message within each group of ``tp`` consecutive ranks (the world by default); the
    others raised nothing. Returns the first refused rank's message."""
    recs = records(out, case)
    refused = list(range(WORLD)) if refused is None else refused
    errors = [rec["error"] for rec in recs]
    assert [r for r, e in enumerate(errors) if e is not None] == refused, (case, [e and e["message"][:300] for e in errors])
    assert {errors[r]["type"] for r in refused} == {"GuardError"}, [errors[r]["trace"] for r in refused]
    for start in range(0, WORLD, tp):
        assert len({errors[r]["message"] for r in refused if start <= r < start + tp}) <= 1, "ranks disagree"
    message = errors[refused[0]]["message"]
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message}"
    assert all(rec["losses"] == [] for rec in recs), "refused after a step"
    return message


# -- accelerate --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,stage", [("dp2xn1xm2", 2), ("dp2xn1xm2", 3), ("dp1xn2xm2", 2), ("dp1xn2xm2", 3),
                                          ("dp2xn1xm2", 0), ("dp2xn1xm2", 1)])
def test_accelerate_deepspeed_plugin_matches_dense(runs, layout, stage):
    out, dp, n, m = runs(layout)
    recs = records(out, f"accelerate_ds_z{stage}")
    assert recs[0]["accelerator"] == ["DistributedType.DEEPSPEED", WORLD]
    # ds_twolevel.accelerate.build_mesh starts the orphan watchdog, as ds_twolevel.build_mesh does
    assert [rec["watchdog_start"] for rec in recs] == [[r, WORLD] for r in range(WORLD)]
    errs = check_exact(out, f"accelerate_ds_z{stage}", n * m, R.GAS)
    if stage == 3:  # ZeRO-3 partitions over the data-parallel replicas of each rank only
        assert [rec["zero3_group"] for rec in recs] == [list(range(r % (n * m), WORLD, n * m)) for r in range(WORLD)]
    print(f"\naccelerate + DeepSpeedPlugin ZeRO-{stage} at {layout}: {errs}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accelerate_deepspeed_without_autotp_is_refused(runs, layout):
    """The two-level JSON given to DeepSpeedPlugin as it is: refused by prepare(), before it wraps the model."""
    out, dp, n, m = runs(layout)
    message = check_refused(out, "accelerate_ds_noautotp", "refused Accelerator.prepare", "a two-level DeepSpeed "
                            f"config reached accelerate with tensor_parallel.autotp_size = None, not n*m = {n}*{m} = "
                            f"{n * m}", "DeepSpeedPlugin(hf_ds_config=ds_twolevel.accelerate.deepspeed_config(cfg))")
    print(f"\n{layout}: {message[:600]}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accelerate_without_the_gloo_handler_is_refused(runs, layout):
    """On CPU without InitProcessGroupKwargs(backend="gloo") every process believes it is rank 0 of 1:
    refused by prepare() with the fix, instead of DeepSpeed's assertion or a modulo by zero."""
    out, *_ = runs(layout)
    assert records(out, "accelerate_ds_nogloo")[0]["accelerator"][1] == 1
    check_refused(out, "accelerate_ds_nogloo", "refused Accelerator.prepare", "accelerate counts 1 process(es)",
                  f"torch.distributed has {WORLD} ranks", 'kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]')


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accelerate_ddp_is_refused(runs, layout):
    out, dp, n, m = runs(layout)
    assert records(out, "accelerate_ddp")[0]["accelerator"] == ["DistributedType.MULTI_CPU", WORLD]
    check_refused(out, "accelerate_ddp", "DistributedDataParallel (made by accelerate's Accelerator.prepare) averages "
                  "gradients over ranks [0, 1, 2, 3]", "broadcast", "ds_twolevel.accelerate.deepspeed_config")


# -- the Trainer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_with_deepspeed_matches_dense_and_saves_dense(runs, layout):
    from transformers import Qwen3ForCausalLM

    out, dp, n, m = runs(layout)
    recs = records(out, "trainer_ds")
    assert recs[0]["error"] is None, recs[0]["error"] and recs[0]["error"]["trace"]
    assert recs[0]["trainer"] == ["DistributedType.DEEPSPEED", WORLD]
    errs = check_exact(out, "trainer_ds", n * m, R.GAS, weight_decay=0.0, losses_per_micro=False)
    trained = torch.load(out / "trainer_ds.weights.pt")
    for folder in ("final", "checkpoint-4"):  # save_model and the Trainer's own checkpoints: dense
        loaded = Qwen3ForCausalLM.from_pretrained(out / "trainer_ds_out" / folder).state_dict()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained), folder
    assert (out / "trainer_ds_out" / "checkpoint-2" / "model.safetensors").is_file()
    print(f"\nTrainer + DeepSpeed at {layout}: {errs}; saved {recs[0]['saved']}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_recipe_runs_on_the_shipped_config(runs, layout):
    """recipes/train_hf_trainer.py (TwoLevelTrainer on ds_configs/zero2_n{n}_m{m}.json) in the launch."""
    from transformers import LlamaForCausalLM

    out, *_ = runs(layout)
    recs = records(out, "recipe_trainer")
    assert all(rec["error"] is None for rec in recs), recs[0]["error"] and recs[0]["error"]["trace"]
    assert {"checkpoint-2", "checkpoint-4", "dense"} <= set(recs[0]["saved"])
    model = LlamaForCausalLM.from_pretrained(out / "recipe_out" / "dense")
    assert model.config.num_attention_heads == 8 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plain_trainer_that_saves_is_refused(runs, layout):
    out, *_ = runs(layout)
    check_refused(out, "trainer_ds_plain_save", "the Hugging Face Trainer (Recording) saves on rank 0 only (save_strategy='steps')", "TwoLevelTrainer")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plain_trainer_with_deepspeed_that_does_not_save_matches_dense(runs, layout):
    """The "HF Trainer (plain class) + DeepSpeed" row of docs/accelerate_trainer.md: ``Trainer`` (not TwoLevelTrainer) with
    ``training_arguments(out, deepspeed=cfg)`` and save_strategy="no" trains exactly."""
    out, dp, n, m = runs(layout)
    recs = records(out, "trainer_ds_plain_nosave")
    assert recs[0]["trainer"] == ["DistributedType.DEEPSPEED", WORLD]
    errs = check_exact(out, "trainer_ds_plain_nosave", n * m, R.GAS, weight_decay=0.0, losses_per_micro=False)
    print(f"\nplain Trainer + DeepSpeed, save_strategy='no', at {layout}: {errs}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plain_training_arguments_with_deepspeed_on_cpu_are_refused(runs, layout):
    """``TrainingArguments(out, deepspeed=cfg)`` without ``training_arguments``: on CPU accelerate's state has
    no backend and every process counts 1 of 1 (accelerate's dataloader would then divide by
    ``1 // autotp_size = 0``); refused on every rank when the Trainer is made, before any step."""
    out, *_ = runs(layout)
    message = check_refused(out, "trainer_ds_plain_noargs", "the Hugging Face Trainer (Recording) counts 1 process(es) "
                            "(TrainingArguments.world_size = accelerate's PartialState().num_processes = 1) but "
                            f"torch.distributed has {WORLD} ranks", "ds_twolevel.hf_trainer.training_arguments("
                            "output_dir, deepspeed=cfg, ...)")
    assert "trainer" not in records(out, "trainer_ds_plain_noargs")[0], "refused after the Trainer was made"
    print(f"\n{layout}: {message[:400]}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plain_trainer_ddp_is_refused(runs, layout):
    out, *_ = runs(layout)
    assert records(out, "trainer_plain")[0]["trainer"] == ["DistributedType.MULTI_CPU", WORLD]
    check_refused(out, "trainer_plain", "DistributedDataParallel (made by accelerate's Accelerator.prepare)")


# -- sequence and vocab parallelism ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["accelerate_sp", "trainer_sp", "accelerate_sp_qwen3", "trainer_sp_qwen3"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sequence_and_vocab_parallel_match_dense(runs, layout, case):
    """``"two_level": {"sequence_parallel": true, "vocab_parallel": true}``, ZeRO-2, a tiny Llama (Qwen3: the
    ``_qwen3`` cases) on padded sequences of 13 tokens: through ``ds_twolevel.accelerate.accelerator(cfg).prepare`` (accelerate's loop,
    unchanged) and through ``TwoLevelTrainer``, every rank trains on its shard of each batch. Against the
    dense run on every replica's batches (computed on each rank): every step's loss (the Trainer's logged
    loss; accelerate's the shares added, averaged over dp) and pre-clip gradient norm, every parameter's
    gradient at step 1, every weight after 4 steps, within 1e-5."""
    out, dp, n, m = runs(layout)
    recs = records(out, case)
    for r, rec in enumerate(recs):
        assert rec["error"] is None, f"{case} rank {r}: {rec['error']['trace']}"
        assert len(rec["losses"]) == len(rec["grad_norms"]) == R.STEPS, rec
        assert rec["clipped"], "clipping must be active for the norm to matter"
        bad = {k: v for k, v in rec["errors"].items() if not v <= TOL}
        assert not bad, f"{case} rank {r}: relative errors above {TOL}: {bad}"
    if case.startswith("accelerate"):  # prepare() returned a loader of this rank's shards: shard_batch of accelerate's batch
        assert all(rec["loader"] == "SequenceShardLoader" and len(rec["shards_match"]) == R.STEPS * R.GAS
                   and all(rec["shards_match"]) for rec in recs)
    print(f"\n{case} at {layout}: {recs[0]['errors']}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sequence_parallel_fed_whole_batches_or_patched_otherwise_is_refused(runs, layout):
    """accelerate's own Accelerator feeds a sequence-parallel model whole batches: the model's error at the
    first forward, on every rank, before any step. A model patched without sequence_parallel under a config
    that has it: refused by prepare. Either accelerator with DeepSpeed's "sequence_parallel_size" > 1: refused by
    the check at prepare."""
    out, dp, n, m = runs(layout)
    for case, fragments in {
            "accelerate_sp_plain_loader": ["sequence_parallel: pass position_ids", "ds_twolevel.accelerate.accelerator(cfg)",
                                           "ds_twolevel.hf_trainer.TwoLevelTrainer"],
            "accelerate_sp_switch": ["Accelerator.prepare: LlamaForCausalLM was patched with sequence_parallel=False "
                                     "but the DeepSpeed config's \"two_level\" section says sequence_parallel=True",
                                     "patch_model(model, mesh, sequence_parallel=True, vocab_parallel=True)"]}.items():
        errors = [rec["error"] for rec in records(out, case)]
        assert all(e is not None and e["type"] == "ValueError" for e in errors), (case, errors)
        assert len({e["message"] for e in errors}) == 1, "ranks disagree"
        for fragment in fragments:
            assert fragment in errors[0]["message"], (case, fragment, errors[0]["message"])
        assert all(rec["losses"] == [] for rec in records(out, case)), "refused after a step"
        for rec in records(out, case):  # Ulysses composed with two-level runs through ds_twolevel.initialize only
            assert '"sequence_parallel_size" = 2 (Ulysses composed with two-level) runs through ds_twolevel.initialize' \
                in rec["ulysses_problem"], rec["ulysses_problem"]


# -- DDP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ddp_over_the_dp_group_matches_dense(runs, layout):
    out, dp, n, m = runs(layout)
    errs = check_exact(out, "ddp_dp", n * m, 1)
    print(f"\nDDP over the dp group at {layout}: {errs}")


@pytest.mark.parametrize("case", ["ddp_world", "ddp_world_nosync"])
def test_ddp_over_the_world_is_refused(runs, case):
    out, *_ = runs("dp2xn1xm2")
    check_refused(out, case, "DistributedDataParallel averages gradients over ranks [0, 1, 2, 3]",
                  "data-parallel replicas ([0, 2], [1, 3])")


# -- input agreement --------------------------------------------------------------------------------
@pytest.mark.parametrize("case,fragment", [
    ("inputs_batch", "input_ids: (3, 12) int64 on rank(s) {others}; (2, 12) int64 on rank(s) 1"),
    ("inputs_length", "input_ids: (3, 12) int64 on rank(s) {others}; (3, 10) int64 on rank(s) 1"),
    ("inputs_ids", "input_ids: same shape (3, 12) int64, different values on rank(s) {others} vs 1"),
    ("inputs_mask", "attention_mask: same shape (3, 12) int64, different values on rank(s) {others} vs 1"),
    ("inputs_ids_generate", "input_ids: same shape (3, 12) int64, different values on rank(s) {others} vs 1"),
])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inputs_that_differ_within_a_layer_are_refused(runs, layout, case, fragment):
    """tp rank 1 of every layer group gets other rows: every rank raises, gloo never sees the shapes."""
    out, dp, n, m = runs(layout)
    others = ", ".join(str(r) for r in range(n * m) if r != 1)
    message = check_refused(out, case, "inputs differ between the ranks", "of one layer at forward call 1",
                            fragment.format(others=others), tp=n * m)
    assert "Connection reset" not in message and "Supported ways" not in message


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_later_forward_with_other_ids_is_refused(runs, layout):
    """The default guard compares every forward: the 2nd forward, other ids on tp rank 1, is refused on
    every rank of that layer; ``check_inputs="first"`` (the opt-out) lets it through."""
    out, dp, n, m = runs(layout)
    others = ", ".join(str(r) for r in range(n * m) if r != 1)
    check_refused(out, "inputs_ids_second", "at forward call 2", "input_ids: same shape (3, 12) int64, different "
                  f"values on rank(s) {others} vs 1", tp=n * m)
    assert all(rec["error"] is None for rec in records(out, "inputs_ids_second_first"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_declared_inputs_replace_the_arguments(runs, layout):
    """guard.declare_inputs: ranks given different ids that declare the same batch pass (forward 1);
    declaring their own different ids is refused (forward 2), whatever the arguments."""
    out, dp, n, m = runs(layout)
    others = ", ".join(str(r) for r in range(n * m) if r != 1)
    check_refused(out, "inputs_declared", "at forward call 2", "input_ids: same shape (3, 12) int64, different "
                  f"values on rank(s) {others} vs 1", tp=n * m)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_checks_every_sampled_token(runs, layout):
    """Rank 1's 3rd generated token differs: its layer group is refused at forward call 4 under the
    default guard; the other group (2 x 1 x 2) generates on. Without differences every one of the 6
    forwards is checked, and generate()'s output once more (the last token)."""
    out, dp, n, m = runs(layout)
    check_refused(out, "inputs_decode", "at forward call 4", "input_ids: same shape (3, 1) int64",
                  tp=n * m, refused=list(range(n * m)))
    agree = records(out, "inputs_agree")
    assert all(rec["error"] is None and rec["guard"] == [6, 7] for rec in agree), agree[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_with_one_rank_fed_other_rows_at_step_3_is_refused(runs, layout):
    """``ds_twolevel.initialize`` + ZeRO-2 under the default guard: tp rank 1 of the first layer group
    trains on other rows at step 3. Every rank of the job (the data-parallel replicas too) raises the
    same GuardError at that forward, before its backward: 2 steps done, none after."""
    out, dp, n, m = runs(layout)
    recs = records(out, "inputs_training_step3")
    errors = [rec["error"] for rec in recs]
    assert all(e is not None and e["type"] == "GuardError" for e in errors), [e and e["trace"] for e in errors]
    assert len({e["message"] for e in errors}) == 1, "ranks disagree"
    others = ", ".join(str(r) for r in range(n * m) if r != 1)
    for fragment in ("inputs differ between the ranks", "at forward call 3",
                     f"input_ids: same shape (2, 12) int64, different values on rank(s) {others} vs 1",
                     "labels: same shape"):
        assert fragment in errors[0]["message"], (fragment, errors[0]["message"])
    assert all(len(rec["losses"]) == 2 for rec in recs)


def test_replicas_may_get_different_inputs(runs):
    out, *_ = runs("dp2xn1xm2")
    recs = records(out, "inputs_replicas")
    assert all(rec["error"] is None and rec["logits_shape"] == [3, R.SEQ, R.VOCAB] for rec in recs)


# -- shards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_overwritten_or_unequal_shards_are_refused_and_a_load_is_not(runs, layout):
    out, dp, n, m = runs(layout)
    check_refused(out, "shards_broadcast", "14 of 14 partitioned tensor(s) hold the same values on ranks",
                  "own different slices", "a wrapper broadcast one rank's shards", tp=n * m)
    check_refused(out, "shards_seeds", "refused patching", "the dense weights differ between the ranks",
                  f"{n * m} different copies", tp=n * m)  # patch_model's probe step, before any forward
    check_refused(out, "shards_settings", "refused patching", "patch with different settings",
                  "reduce_dtype=None", "reduce_dtype=torch.float32", tp=n * m)  # before any module is touched
    assert all(rec["error"] is None for rec in records(out, "shards_load"))


# -- pure: configs the ecosystem reads, the autotp rule, options, fingerprints (no process group) ----
TRAINING_CONFIGS = sorted(p for p in (REPO / "ds_configs").glob("*.json") if "inference" not in p.name)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def _trainer_kwargs(ds: dict) -> dict:
    """TrainingArguments matching a shipped config (the Trainer refuses mismatches with its own message)."""
    opt = ds["optimizer"]["params"]
    sched = ds.get("scheduler", {}).get("params", {})
    return dict(per_device_train_batch_size=ds["train_micro_batch_size_per_gpu"],
                gradient_accumulation_steps=ds["gradient_accumulation_steps"], max_grad_norm=ds["gradient_clipping"],
                learning_rate=opt["lr"], adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1],
                adam_epsilon=opt["eps"], weight_decay=opt["weight_decay"], warmup_steps=sched.get("warmup_num_steps", 0),
                report_to=[])  # bf16/fp16 stay off: the Trainer refuses them without a GPU (the configs decide)


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=[p.name for p in TRAINING_CONFIGS])
def test_shipped_config_loads_through_accelerate_and_the_trainer(path, tmp_path, fresh_accelerate_state):
    """DeepSpeedPlugin(hf_ds_config=path) and TrainingArguments(deepspeed=path) read every training config:
    no "auto" left to fill, the "two_level" section intact, tensor_parallel.autotp_size = n*m."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers import TrainingArguments

    from ds_twolevel.deepspeed.config import load_deepspeed_config

    tl, ds = load_deepspeed_config(path)
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=False)
    plugin.deepspeed_config_process(must_match=False)  # raises "`<key>` not found in kwargs" on an "auto"
    assert load_deepspeed_config(plugin.deepspeed_config)[0] == tl
    assert plugin.deepspeed_config["tensor_parallel"]["autotp_size"] == tl.n * tl.m
    args = TrainingArguments(str(tmp_path), deepspeed=str(path), **_trainer_kwargs(ds))
    # the GPU configs' precision: TrainingArguments refuses bf16/fp16 without a GPU, so it is set afterwards
    args.bf16, args.fp16 = (bool((ds.get(k) or {}).get("enabled")) for k in ("bf16", "fp16"))
    args.hf_deepspeed_config.mismatches = []
    args.hf_deepspeed_config.trainer_config_process(args)  # what TrainingArguments ran, now with that precision
    args.hf_deepspeed_config.trainer_config_finalize(args, R.build_model(), num_training_steps=10)
    assert load_deepspeed_config(args.hf_deepspeed_config.config)[0] == tl
    assert args.hf_deepspeed_config.config["tensor_parallel"]["autotp_size"] == tl.n * tl.m


def test_autotp_size_must_be_the_layer_group():
    from ds_twolevel.accelerate import deepspeed_config
    from ds_twolevel.deepspeed.config import check_deepspeed_config, load_deepspeed_config

    cfg = R.ds_config(2, 2, 2, autotp=False)
    filled = deepspeed_config(cfg, world_size=8)
    assert filled["tensor_parallel"] == {"autotp_size": 4} and filled["two_level"]["n"] == 2
    tl, ds = load_deepspeed_config(filled)
    assert check_deepspeed_config(tl, ds, 8).dp == 2
    for wrong in (2, 8):
        tl, ds = load_deepspeed_config({**cfg, "tensor_parallel": {"autotp_size": wrong}})
        with pytest.raises(ValueError, match=rf'"tensor_parallel.autotp_size" = {wrong} contradicts "two_level" '
                                             r'\(n\*m = 2\*2 = 4 ranks share each layer\); set it to 4'):
            check_deepspeed_config(tl, ds, 8)


def test_guard_options_are_validated():
    from ds_twolevel.guard import GuardOptions

    with pytest.raises(ValueError, match=r"check_inputs must be one of \('first', 'always', 'never'\), got 'sometimes'"):
        GuardOptions(check_inputs="sometimes")
    with pytest.raises(ValueError, match="check_shards must be True or False"):
        GuardOptions(check_shards="yes")


def test_fingerprints_are_exact_and_fixed_size():
    from ds_twolevel.sharding import fingerprint as fp

    x = torch.randn(5, 7)
    assert fp.tensor_hash(x) == fp.tensor_hash(x.clone()) and fp.tensor_hash(x) != fp.tensor_hash(x.t().contiguous())
    y = x.clone()
    y[3, 2] = torch.nextafter(y[3, 2], torch.tensor(10.0))  # one ulp
    assert fp.tensor_hash(x) != fp.tensor_hash(y)
    shapes = [(2, 12), (3, 12), (3, 10), (1, 1, 1, 1, 1, 1, 1, 2)]
    rows = [fp.input_descriptor({"input_ids": torch.zeros(s, dtype=torch.long), "use_cache": True}) for s in shapes]
    assert {r.shape for r in rows} == {(fp.DESCRIPTOR_SIZE,)} and len({tuple(r.tolist()) for r in rows}) == len(rows)
    assert fp.describe_slot(rows[1][:fp.SLOT_WIDTH].tolist()) == "(3, 12) int64"


def test_input_lanes_are_fixed_size_and_tell_every_argument_apart():
    """One int64 lane per argument slot (+ one for the rest): equal for equal inputs, and a change in
    any value, shape or dtype of any argument changes that argument's lane only."""
    from ds_twolevel.sharding import fingerprint as fp

    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    base = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}
    lanes = fp.input_lanes(base, torch.device("cpu"))
    assert lanes.shape == (fp.LANES,) and lanes.dtype == torch.int64
    assert torch.equal(lanes, fp.input_lanes({k: v.clone() if torch.is_tensor(v) else v for k, v in base.items()},
                                             torch.device("cpu")))
    one_token = ids.clone()
    one_token[1, 7] += 1
    changes = {"input_ids": one_token, "attention_mask": torch.ones(2, 11, dtype=torch.long),
               "labels": ids.to(torch.int32), "use_cache": True}
    for name, value in changes.items():
        other = fp.input_lanes({**base, name: value}, torch.device("cpu"))
        slot = fp.INPUT_SLOTS.index(name) if name in fp.INPUT_SLOTS else fp.LANES - 1
        assert (other != lanes).nonzero().flatten().tolist() == [slot], name


def test_accelerate_and_hf_trainer_resolve_lazily_after_import_ds_twolevel():
    """``import ds_twolevel`` imports neither accelerate nor transformers; the attributes resolve on use."""
    code = ("import sys, ds_twolevel\n"
            "assert not {'accelerate', 'transformers'} & set(sys.modules), sorted({'accelerate', 'transformers'} & set(sys.modules))\n"
            "assert callable(ds_twolevel.accelerate.accelerator) and callable(ds_twolevel.accelerate.deepspeed_config)\n"
            "assert ds_twolevel.hf_trainer.TwoLevelTrainer.__name__ == 'TwoLevelTrainer'\n"
            "try:\n    ds_twolevel.no_such_module\nexcept AttributeError as err:\n    print('ok', err)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok module 'ds_twolevel' has no attribute 'no_such_module'" in proc.stdout, \
        proc.stdout + proc.stderr[-3000:]


def test_plain_trainer_save_refuses_at_once_and_two_level_trainer_saves_dense(tmp_path, fresh_accelerate_state):
    """The HF Trainer writes on rank 0 only; a patched model's save_pretrained would wait for the other
    ranks forever. One process (n = m = 1, no process group) is enough to see which call is refused."""
    from transformers import Qwen3ForCausalLM, Trainer, TrainingArguments

    from ds_twolevel import TwoLevelLayout
    from ds_twolevel.hf_trainer import TwoLevelTrainer
    from hf_integration import patch_model

    model = R.build_model()
    patch_model(model, TwoLevelLayout(n=1, m=1).build())
    args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to=[], save_strategy="no")
    with pytest.raises(ValueError, match=r"Trainer saves on rank 0 only, but Qwen3ForCausalLM is partitioned.*"
                                         r"use ds_twolevel.hf_trainer.TwoLevelTrainer"):
        Trainer(model=model, args=args).save_model(str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "model.safetensors").exists()
    TwoLevelTrainer(model=model, args=args).save_model(str(tmp_path / "dense"))
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "dense").state_dict()
    dense = R.build_model().state_dict()
    assert loaded.keys() == dense.keys() and all(torch.equal(loaded[k], dense[k]) for k in dense)


def test_an_auto_value_would_be_caught(tmp_path, fresh_accelerate_state):
    """What the shipped-config test guards against: accelerate treats any "auto" string as a placeholder."""
    from accelerate.utils import DeepSpeedPlugin

    cfg = R.ds_config(2, 2, 2)
    cfg["two_level"]["strategy"] = "auto"  # the old spelling of "cost_model"
    plugin = DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=False)
    with pytest.raises(ValueError, match="`two_level.strategy` not found in kwargs"):
        plugin.deepspeed_config_process(must_match=False)


def test_sequence_shard_loader_is_the_prepared_loader_but_for_its_batches():
    """What TwoLevelAccelerator.prepare returns under sequence parallelism: shard_batch of each batch; every
    other attribute the wrapped loader's; bare tensors refused with what a sequence-parallel loader needs."""
    from ds_twolevel.parallel.layout import AxisGroup
    from hf_integration.sequence_data import SequenceShardLoader, shard_batch

    rows = R.sp_rows(4)
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    tp = AxisGroup(name="tp", size=2, rank=1)  # shard_batch needs no process group
    wrapped = SequenceShardLoader(loader, tp)
    assert wrapped.dataset is rows and wrapped.batch_size == 2 and len(wrapped) == 2
    for got, whole in zip(wrapped, loader, strict=True):
        want = shard_batch(whole, tp)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert got["input_ids"].shape == (2, 7)  # 13 tokens padded to 14, this rank's second half
    with pytest.raises(ValueError, match=r"each batch must be a dict with input_ids \(b, s\).*the loader gave a Tensor"):
        next(iter(SequenceShardLoader(torch.utils.data.DataLoader(torch.zeros(4, 13, dtype=torch.long), batch_size=2), tp)))
