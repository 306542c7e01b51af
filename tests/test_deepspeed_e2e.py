"""End-to-end: ds_twolevel.initialize under the real ``deepspeed`` launcher (CPU, gloo) vs dense.

The model is a real ``transformers`` Qwen3ForCausalLM (seeded, built from ``Qwen3Config``: GQA
4 heads / 2 KV heads, head_dim 8, per-head q_norm/k_norm, 2 layers, untied LM head), partitioned
by the real injection policy (``hf_integration.patch_model``, through ``ds_twolevel.initialize``);
the loss is the model's own ``labels=`` loss (mean over the micro-batch's tokens). Every
micro-batch has the same token count, so DeepSpeed's 1/GAS scaling and dp averaging make the
gradient that of the mean loss over the whole global batch — what the dense reference computes.

Each launch runs many cases in one process group (starting ranks costs seconds): the file is
both the pytest module and the rank script (``python tests/test_deepspeed_e2e.py --scenario ...``
under ``deepspeed --num_gpus N``). Ranks write per-case metrics and final dense weights to a
work directory; pytest compares them with a dense single-process run of the same model, data
and seed: torch AdamW + the same clipping + the full global batch.

Tolerances (fp32): relative error <= 1e-5 for every step's loss, the pre-clip gradient norm and
every final weight (max-abs error / max-abs value of each tensor) in every case, ZeRO-3 and
zero.Init included; every rank must end with a bit-identical dense model; the exported checkpoint
loads with plain ``Qwen3ForCausalLM.from_pretrained`` into bit-identical weights whose logits are
within 1e-5 of the partitioned model's. Adam moves a weight by lr/eps per unit of gradient error
where the gradient is near zero, so the final weights carry fp32 summation-order noise: the
*dense* run against itself with its batch split into 2-8 accumulated micro-batches differs by up
to 9.2e-6 with lr 1e-3 / eps 1e-6 (from zero_init_model's init draw; 4.2e-6 from the seeded one)
but by <= 1.6e-6 with eps 1e-5 — hence eps 1e-5 here, which keeps 1e-5 meaningful for all stages.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402  (before any zero.Init)

TOL = 1e-5
STEPS = 10
SAVE_AT = 5
SEQ = 16
MICRO = 2
GAS = 2
LR = 1e-3
CLIP = 0.5
EPS = 1e-5  # Adam amplifies fp32 noise on near-zero gradients by lr/eps: see the module docstring
SEED = 0
VOCAB = 64
MODEL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, attention_dropout=0.0, tie_word_embeddings=False,
             max_position_embeddings=64)
ATTN = "sdpa"  # the dense reference's attention; the partitioned one replaces it


# -- shared by ranks and the dense reference ---------------------------------------------------------
def build_model(seed: int = SEED) -> Qwen3ForCausalLM:
    """The dense Qwen3 of the tests, its weights drawn from ``seed`` (HF's own init)."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**MODEL, attn_implementation=ATTN))


def probe_ids() -> torch.Tensor:
    """Token ids on which the exported checkpoint's logits are compared: (2, SEQ)."""
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def global_batch(step: int, dp: int) -> torch.Tensor:
    """Token ids of optimizer step ``step``: (MICRO * GAS * dp, SEQ), replica r owns rows block r."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (MICRO * GAS * dp, SEQ), generator=gen)


def ds_config(stage: int, n: int, m: int, *, zero_init: bool = False, timeout_s: float = 120,
              bf16: bool = False, extra: dict | None = None) -> dict:
    """The DeepSpeed JSON of a case (train_batch_size left to DeepSpeed: MICRO x GAS x dp), plus ``extra``."""
    return {
        **(extra or {}),
        **({"bf16": {"enabled": True}} if bf16 else {}),
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": EPS,
                                                   "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})},
        "steps_per_print": 10 ** 9,
        "two_level": {"n": n, "m": m, "strategy": "cost_model", "timeout_s": timeout_s, "zero_init": zero_init},
    }


# -- rank side ------------------------------------------------------------------------------------
def _make_model(cfg: dict, mesh, zero_init: bool, seed: int = SEED) -> Qwen3ForCausalLM:
    """The dense Qwen3; under ``zero.Init`` (dp-partitioned, HF init on gathered parameters) if asked."""
    import ds_twolevel

    if zero_init:
        return ds_twolevel.zero_init_model(lambda: build_model(seed), cfg, mesh)
    return build_model(seed)


def _train(engine, mesh, first: int, last: int, dp: int, save: tuple[Path, int, Path] | None = None) -> dict:
    """Steps ``first..last``; per step the mean loss over the global batch and the pre-clip grad norm.
    ``save = (dir, step, ref)``: checkpoint at ``step``, and the engine's own dense fp32 weights and
    Adam moments (the reference for the checkpoint's conversion and resharding) into ``ref``."""
    import torch.distributed as dist

    import ds_twolevel

    losses, norms = [], []
    for step in range(first, last + 1):
        rows = ds_twolevel.replica_rows(global_batch(step, dp), mesh)  # (MICRO*GAS, SEQ), same on tp ranks
        total = torch.zeros(())
        for micro in rows.split(MICRO):
            loss = engine(input_ids=micro, labels=micro).loss  # HF's own mean next-token loss
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        total /= GAS
        dist.all_reduce(total, group=mesh.get_data_parallel_group())
        losses.append(float(total) / dp)
        norms.append(float(engine.get_global_grad_norm()))
        if save is not None and step == save[1]:
            ds_twolevel.save_checkpoint(engine, save[0], tag=f"step{step}", client_state={"step": step})
            _save_rank0(_live_state(engine), save[2])
    return {"losses": losses, "grad_norms": norms}


def _live_state(engine) -> dict:
    """The engine's dense fp32 master weights and Adam moments, gathered from the live optimizer
    (DeepSpeed's tensor-fragment API), not from any file; and ``dense_state_dict``."""
    import ds_twolevel
    from ds_twolevel.deepspeed import checkpoint as checkpointing, engine_state

    state = engine_state.dense_state(engine, checkpointing.mesh_of(engine), checkpointing.current_manifest(engine))
    return {**state, "dense_state_dict": ds_twolevel.dense_state_dict(engine)}  # the module's own (16-bit) weights


def _save_rank0(obj: dict, path: Path) -> None:
    """``torch.save`` on global rank 0 only (every rank holds the same dense tensors)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(obj, path)


def _export_case(engine, out: Path, name: str) -> None:
    """Export a plain HF checkpoint and record the partitioned model's logits on :func:`probe_ids`."""
    import ds_twolevel

    ds_twolevel.export_dense(engine, out / f"{name}.dense")
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe_ids()).logits
    engine.train()
    _save_rank0({"logits": logits.detach().clone()}, out / f"{name}.probe.pt")


def _sixteen_bit_case(engine, out: Path, name: str, state: dict) -> str:
    """DeepSpeed's own 16-bit paths (what the HF Trainer and accelerate call): ``save_16bit_model``
    writes ``{name}.16bit/pytorch_model.bin``; the consolidated state dicts must equal ``state``
    (``dense_state_dict``) bit for bit on rank 0 and be None elsewhere. Returns "equal" or what differs."""
    import torch.distributed as dist

    assert engine.save_16bit_model(str(out / f"{name}.16bit"), "pytorch_model.bin")
    getters = [engine._consolidated_16bit_state_dict]
    if engine.zero_optimization_stage() == 3:
        getters.append(engine._zero3_consolidated_16bit_state_dict)
    for get in getters:
        got = get()
        if dist.get_rank() != 0:
            if got is not None:
                return f"{get.__name__} returned a state dict on rank {dist.get_rank()}"
            continue
        if got.keys() != state.keys() or not all(torch.equal(got[k], state[k]) for k in state):
            return f"{get.__name__} differs from dense_state_dict"
    return "equal"


def _finish_case(engine, out: Path, name: str, metrics: dict, export: bool = False) -> None:
    """Dense weights (rank 0 writes them), rank agreement, optional export; then the metrics."""
    import torch.distributed as dist

    import ds_twolevel

    state = ds_twolevel.dense_state_dict(engine)
    # every rank's view of the dense model (its replicated parameters + gathered shards) must be
    # bit-identical: replicated parameters get identical gradients on the tp ranks of a replica
    flat = torch.cat([state[k].flatten() for k in sorted(state)])
    views = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(views, flat)
    metrics["rank_divergence"] = max(float((v - views[0]).abs().max()) for v in views)
    if export:
        _export_case(engine, out, name)
        metrics["consolidated"] = _sixteen_bit_case(engine, out, name, state)
    if dist.get_rank() == 0:
        torch.save(state, out / f"{name}.weights.pt")
        (out / f"{name}.json").write_text(json.dumps(metrics))
    dist.barrier()


def _scenario_setup(args) -> tuple[Path, Any, int, list[tuple[str, int, bool]]]:
    """(output folder, mesh, dp, [(case, ZeRO stage, zero.Init?)]) of a parity or resume launch."""
    import ds_twolevel

    mesh = ds_twolevel.build_mesh(ds_config(0, args.n, args.m))
    cases = [(case, int(case[0]), case.endswith("i")) for case in args.cases.split(",")]
    return Path(args.out), mesh, mesh.get_data_parallel_world_size(), cases


def scenario_parity(args) -> None:
    """Every ZeRO stage (+ stage 3 under zero.Init) on one layout; save at SAVE_AT for the resume launch."""
    import ds_twolevel

    out, mesh, dp, cases = _scenario_setup(args)
    for case, stage, zero_init in cases:
        cfg = ds_config(stage, args.n, args.m, zero_init=zero_init)
        t0 = time.time()
        engine, *_ = ds_twolevel.initialize(model=_make_model(cfg, mesh, zero_init), config=cfg, mesh=mesh)
        # the starting point, gathered: the seeded dense model, or zero_init_model's own HF init draw
        _save_rank0(ds_twolevel.dense_state_dict(engine), out / f"{args.tag}_{case}.init.pt")
        name = f"{args.tag}_{case}"
        save = (out / f"ckpt_{name}", SAVE_AT, out / f"{name}.step{SAVE_AT}.pt") if args.checkpoint else None
        metrics = _train(engine, mesh, 1, STEPS, dp, save)
        metrics["seconds"] = time.time() - t0
        _finish_case(engine, out, name, metrics, export=True)
        engine.destroy()
    if args.relayout:
        scenario_relayout(args, out)


def scenario_resume(args) -> None:
    """Fresh processes: load the step-SAVE_AT checkpoints, train to STEPS."""
    import torch.distributed as dist

    import ds_twolevel

    out, mesh, dp, cases = _scenario_setup(args)
    for (case, stage, zero_init), window in zip(cases, KILLED_RESAVE):
        ckpt = out / f"ckpt_w8_{case}"
        killed = None
        if dist.get_rank() == 0:  # what a save killed midway leaves behind: must be ignored
            (ckpt / f"step{SAVE_AT + 2}.partial").mkdir(exist_ok=True)
            (ckpt / f"step{SAVE_AT + 2}.partial" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
            killed = _killed_resave(ckpt, f"step{SAVE_AT}", window)
        dist.barrier()
        cfg = ds_config(stage, args.n, args.m, zero_init=zero_init)
        model = _make_model(cfg, mesh, zero_init, seed=99)  # different init: everything must come from the checkpoint
        engine, *_ = ds_twolevel.initialize(model=model, config=cfg, mesh=mesh)
        _, client = ds_twolevel.load_checkpoint(engine, ckpt)
        metrics = _train(engine, mesh, client["step"] + 1, STEPS, dp)
        metrics["resumed_from"] = client["step"]
        metrics["killed"] = killed
        _finish_case(engine, out, f"resume_{case}", metrics)
        engine.destroy()
    _cross_cases(args, out, mesh, "cross")


KILLED_RESAVE = ("linked", "latest_old", "removing", "removed", "replaced")
"""Per resumed case, the window of a re-save of its tag that is SIGKILLed first (see ``checkpointing``)."""


def _killed_resave(ckpt: Path, tag: str, window: str) -> list:
    """A finished run saving its last tag again (``--resume``), SIGKILLed at ``window``: a forked
    child of rank 0 (file operations only) commits a copy of the tag and kills itself there.
    Returns [window, the signal the child died of, what ``latest`` then names]."""
    import shutil
    import signal

    from ds_twolevel.deepspeed import checkpoint as checkpointing

    shutil.copytree(ckpt / tag, ckpt / f"{tag}.partial")  # what DeepSpeed writes again: the same state
    pid = os.fork()
    if pid == 0:
        os.environ[checkpointing.KILL_ENV] = window
        checkpointing.commit(ckpt, tag)
        os._exit(0)  # not reached: the window kills the child
    _, status = os.waitpid(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    return [window, int(sig == signal.SIGKILL), checkpointing.read_latest(ckpt)]


def _resume_case(engine, mesh, ckpt: Path, out: Path, name: str) -> None:
    """Load ``ckpt`` (any layout), record the loaded state (``{name}.loaded.pt``), train to STEPS.
    The cases of :data:`ENGINE_LOAD` call DeepSpeed's own ``engine.load_checkpoint`` (what the HF
    Trainer and accelerate call; deepspeed_compat routes it through the layout check)."""
    import ds_twolevel

    if name in ENGINE_LOAD:
        _, client = engine.load_checkpoint(str(ckpt))
    else:
        _, client = ds_twolevel.load_checkpoint(engine, ckpt)
    _save_rank0(_live_state(engine), out / f"{name}.loaded.pt")
    metrics = _train(engine, mesh, client["step"] + 1, STEPS, mesh.get_data_parallel_world_size())
    metrics["resumed_from"] = client["step"]
    metrics["loaded_by"] = "engine.load_checkpoint" if name in ENGINE_LOAD else "ds_twolevel.load_checkpoint"
    _finish_case(engine, out, name, metrics)


def _cross_cases(args, out: Path, mesh, prefix: str) -> None:
    """``--cross src:stage,...``: the 4-rank launch's (dp2 x n1 x m2) ZeRO-``src`` checkpoints resumed
    on ``mesh`` with ZeRO ``stage``: resharded, never loaded into the wrong coordinates."""
    import ds_twolevel

    for pair in filter(None, args.cross.split(",")):
        src, stage = pair.split(":")
        cfg = ds_config(int(stage), mesh.layout.n, mesh.layout.m)
        engine, *_ = ds_twolevel.initialize(model=build_model(seed=99), config=cfg, mesh=mesh)
        _resume_case(engine, mesh, out / f"ckpt_w4_{src}", out, f"{prefix}_{src}to{stage}")
        engine.destroy()


def scenario_relayout(args, out: Path) -> None:
    """The same 4 ranks at another n x m (``--relayout``): the cross-layout resumes of ``--cross``; a
    GPT-NeoX (fused QKV, partial rotary, ZeRO-2) and a bf16 Qwen3 (ZeRO-2 -> ZeRO-1) saved at n1 x m2
    and resumed here; the refusals."""
    import ds_twolevel

    n, m = (int(v) for v in args.relayout.split("x"))
    mesh = ds_twolevel.build_mesh(ds_config(0, n, m))  # a second mesh over the same process group
    from hf_integration.testing import tiny_model

    _cross_cases(args, out, mesh, "relayout")
    saved_at = ds_twolevel.build_mesh(ds_config(0, args.n, args.m))
    _saved_and_loaded(out, "neox", lambda seed: tiny_model("gpt_neox", seed=seed).train(), (2, 2), saved_at, mesh)
    _saved_and_loaded(out, "bf16", build_model, (2, 1), saved_at, mesh, bf16=True)
    _refusals(out, mesh, saved_at)


def _saved_and_loaded(out: Path, name: str, make_model, stages: tuple[int, int], save_mesh, load_mesh,
                      bf16: bool = False) -> None:
    """2 steps of ``make_model(seed)`` at ``save_mesh`` (ZeRO ``stages[0]``), saved; loaded at
    ``load_mesh`` (ZeRO ``stages[1]``) into another draw; the live states into ``{name}.step2.pt`` and
    ``{name}.loaded.pt``."""
    import ds_twolevel

    cfg = ds_config(stages[0], save_mesh.layout.n, save_mesh.layout.m, bf16=bf16)
    engine, *_ = ds_twolevel.initialize(model=make_model(0), config=cfg, mesh=save_mesh)
    _train(engine, save_mesh, 1, 2, save_mesh.get_data_parallel_world_size(),
           save=(out / f"ckpt_{name}", 2, out / f"{name}.step2.pt"))
    engine.destroy()
    cfg = ds_config(stages[1], load_mesh.layout.n, load_mesh.layout.m, bf16=bf16)
    engine, *_ = ds_twolevel.initialize(model=make_model(5), config=cfg, mesh=load_mesh)
    ds_twolevel.load_checkpoint(engine, out / f"ckpt_{name}")
    _save_rank0(_live_state(engine), out / f"{name}.loaded.pt")
    engine.destroy()


def _refusals(out: Path, mesh, saved_at) -> None:
    """Checkpoints that must be refused, on every rank with the same one line, before anything is
    loaded (the engine's weights are unchanged): another model, no layout record, a missing file
    (at ``mesh``); at the saved layout ``saved_at``, an optimizer file of tp rank 1, truncated."""
    import shutil

    import torch.distributed as dist

    if dist.get_rank() == 0:
        for name, source, damage in (("nomanifest", "ckpt_w4_1", "two_level.json"),
                                     ("incomplete", "ckpt_w4_2", "zero_pp_rank_1_mp_rank_01_optim_states.pt"),
                                     ("truncated", "ckpt_w4_1", "zero_pp_rank_1_mp_rank_01_optim_states.pt")):
            shutil.copytree(out / source, out / name)
            path = out / name / f"step{SAVE_AT}" / damage
            if name == "truncated":
                path.write_bytes(path.read_bytes()[:1000])
            else:
                path.unlink()
    dist.barrier()
    messages = _refused(out, mesh, 2, ("ckpt_neox", "nomanifest", "incomplete"))
    messages.update(_refused(out, saved_at, 1, ("truncated",)))
    # a layout change this engine cannot reshard (ZeRO-0 bf16 keeps its fp32 state in DeepSpeed's wrapper),
    # and a config asking DeepSpeed for a universal checkpoint: the ZeRO-1 checkpoint of dp2 x n1 x m2
    t0 = time.time()
    messages.update(_refused(out, mesh, 0, ("ckpt_w4_1",), bf16=True, label="zero0_bf16"))
    messages.update(_refused(out, mesh, 1, ("ckpt_w4_1",), extra={"checkpoint": {"load_universal": True}},
                             label="load_universal"))
    if dist.get_rank() == 0:  # what these two engines add to the launch (reported by the test)
        (out / "refusals_added_seconds.txt").write_text(f"{time.time() - t0:.1f}")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, messages)
    if dist.get_rank() == 0:
        (out / "refusals.json").write_text(json.dumps(gathered))


def _refused(out: Path, mesh, stage: int, names: tuple[str, ...], *, bf16: bool = False, extra: dict | None = None,
             label: str = "") -> dict[str, str]:
    """Each checkpoint's error on this rank (or NOT REFUSED), and whether the weights stayed as they were;
    keys ``{label}{name}`` (``label``: the engine's settings, when several engines load one checkpoint)."""
    import ds_twolevel

    cfg = ds_config(stage, mesh.layout.n, mesh.layout.m, bf16=bf16, extra=extra)
    engine, *_ = ds_twolevel.initialize(model=build_model(seed=99), config=cfg, mesh=mesh)
    before, messages = ds_twolevel.dense_state_dict(engine), {}
    for name in names:
        try:
            ds_twolevel.load_checkpoint(engine, out / name)
            messages[label + name] = "NOT REFUSED"
        except ValueError as err:
            messages[label + name] = str(err)
    after = ds_twolevel.dense_state_dict(engine)
    messages[f"unchanged_{label}{names[0]}"] = str(all(torch.equal(before[k], after[k]) for k in before))
    engine.destroy()
    return messages


def scenario_fault(args) -> None:
    """The last rank stalls (sleeps) or dies (exit status 0, so the launcher does not step in) at
    step 2; the others must stop with a clear message within the timeout."""
    import torch.distributed as dist

    import ds_twolevel

    cfg = ds_config(1, args.n, args.m, timeout_s=args.timeout)
    mesh = ds_twolevel.build_mesh(cfg)
    dp = mesh.get_data_parallel_world_size()
    engine, *_ = ds_twolevel.initialize(model=build_model(), config=cfg, mesh=mesh)
    with ds_twolevel.fail_fast(args.timeout):
        for step in range(1, STEPS + 1):
            if step == 2 and dist.get_rank() == dist.get_world_size() - 1:
                print(f"rank {dist.get_rank()}: FAULT_AT {time.time():.3f}", flush=True)
                if args.fault == "die":
                    os._exit(0)
                time.sleep(3600)
            ids = ds_twolevel.replica_rows(global_batch(step, dp), mesh)[:MICRO]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()


def scenario_badworld(args) -> None:
    """n*m does not divide the world: refused before any collective, with the fix."""
    import ds_twolevel

    try:
        ds_twolevel.build_mesh(ds_config(0, args.n, args.m))
    except ValueError as err:
        print(f"REFUSED: {err}", flush=True)
        sys.exit(2)
    print("NOT REFUSED", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--out", default=".")
    parser.add_argument("--layout", default="2x2", help="n x m, e.g. 2x2 (--n would clash with the launcher's options)")
    parser.add_argument("--cases", default="0,1,2,3")
    parser.add_argument("--tag", default="case")
    parser.add_argument("--checkpoint", action="store_true", help="save at step SAVE_AT")
    parser.add_argument("--cross", default="", help="src:stage,... 4-rank checkpoints to resume at another layout")
    parser.add_argument("--relayout", default="", help="n x m of the same ranks for the --cross resumes")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--fault", choices=["stall", "die"], default="stall")
    args = parser.parse_args()
    args.n, args.m = (int(v) for v in args.layout.split("x"))
    torch.set_num_threads(1)
    globals()[f"scenario_{args.scenario}"](args)


# -- pytest side ----------------------------------------------------------------------------------
def launch(ranks: int, *script_args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    """``deepspeed --num_gpus ranks`` this file on CPU with a free port; (result, seconds)."""
    from ds_twolevel.testing import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(Path(__file__).resolve()),
           *script_args]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    seconds = time.time() - t0
    # DeepSpeed's CPU shm workspace (69 MB per rank) must not outlive the job (release_shm_workspace)
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"DeepSpeed shared-memory workspaces leaked: {[p.name for p in leaked]}"
    return proc, seconds


def dense_run(dp: int, init_state: dict | None = None) -> dict:
    """The reference: unpatched Qwen3 (seeded, or loaded from ``init_state``), torch AdamW,
    clip_grad_norm_, the whole global batch in one forward (HF's mean loss over all its tokens)."""
    model = build_model()
    if init_state is not None:
        model.load_state_dict(init_state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.01)
    losses, norms, states = [], [], {}
    for step in range(1, STEPS + 1):
        ids = global_batch(step, dp)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "grad_norms": norms, "weights": states[STEPS]}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def weight_error(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    return max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ref)


def check_export(out: Path, name: str) -> float:
    """Plain ``from_pretrained`` of the exported checkpoint: bit-identical weights to the gathered
    trained model, and logits within 1e-5 (relative) of the partitioned model's; returns that error."""
    model = Qwen3ForCausalLM.from_pretrained(out / f"{name}.dense").eval()  # plain HF, no ds_twolevel
    trained = torch.load(out / f"{name}.weights.pt")
    state = model.state_dict()
    assert state.keys() == trained.keys(), sorted(set(state) ^ set(trained))
    assert all(torch.equal(state[k], trained[k]) for k in trained), name
    probe = torch.load(out / f"{name}.probe.pt")["logits"]
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits
    err = float((logits - probe).abs().max() / probe.abs().max())
    assert err <= TOL, f"{name}: exported logits relative error {err:.2e} > {TOL:.0e}"
    return err


def compare(out: Path, name: str, ref: dict, tol: float, first_step: int = 1) -> dict:
    metrics = json.loads((out / f"{name}.json").read_text())
    ref_losses, ref_norms = ref["losses"][first_step - 1:], ref["grad_norms"][first_step - 1:]
    assert len(metrics["losses"]) == len(ref_losses) == STEPS - first_step + 1
    errs = {"loss": max(rel(a, b) for a, b in zip(metrics["losses"], ref_losses)),
            "grad_norm": max(rel(a, b) for a, b in zip(metrics["grad_norms"], ref_norms)),
            "weights": weight_error(torch.load(out / f"{name}.weights.pt"), ref["weights"])}
    for what, err in errs.items():
        assert err <= tol, f"{name}: {what} relative error {err:.2e} > {tol:.0e}"
    return errs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds_e2e")


def _check_launch(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def parity_launch(workdir):
    """Run the parity launch of a layout once per module (the resume test reuses the 8-rank one)."""
    done: dict[int, float] = {}

    def run(ranks: int, n: int, m: int) -> float:
        if ranks not in done:
            extra = ["--relayout", RELAYOUT, "--cross", RELAYOUT_CROSS] if ranks == 4 else []
            proc, done[ranks] = launch(ranks, "--scenario", "parity", "--out", str(workdir), "--layout",
                                       f"{n}x{m}", "--cases", PARITY_CASES[ranks], "--tag", f"w{ranks}",
                                       "--checkpoint", *extra)
            _check_launch(proc)
        return done[ranks]

    return run


PARITY_CASES = {8: "0,1,2,3,3i", 4: "0,1,2,3"}
RELAYOUT, RELAYOUT_CROSS = "2x1", "3:3,1:1"
"""The 4-rank launch (dp2 x n1 x m2) also resumes its own ZeRO-3 and ZeRO-1 checkpoints at dp2 x n2 x m1."""
ENGINE_LOAD = ("relayout_1to1",)
"""Cross-layout resumes that call DeepSpeed's own ``engine.load_checkpoint(dir)``: dp2 x n1 x m2 -> dp2 x n2 x m1
at ZeRO-1 have the same file names (mp_rank_00/01, 2 dp ranks), so DeepSpeed's load alone would find every file
and put the m-segments where the n-groups go."""
CROSS = "0:2,1:3,2:0,3:1"
"""The 8-rank resume launch (dp2 x n2 x m2) also resumes the 4-rank checkpoints, each at another ZeRO stage."""


@pytest.fixture(scope="module")
def resume_launch(workdir, parity_launch):
    """The 8-rank resume launch: the 8-rank checkpoints as saved, the 4-rank ones at 8 ranks."""
    parity_launch(8, 2, 2)
    parity_launch(4, 1, 2)
    proc, seconds = launch(8, "--scenario", "resume", "--out", str(workdir), "--layout", "2x2",
                           "--cases", PARITY_CASES[8], "--cross", CROSS)
    _check_launch(proc)
    return seconds


def check_16bit(out: Path, name: str) -> None:
    """``engine.save_16bit_model``'s file, beside the exported config.json, loads with plain
    ``from_pretrained`` into weights bit-identical to ``dense_state_dict``."""
    shutil.copy(out / f"{name}.dense" / "config.json", out / f"{name}.16bit" / "config.json")
    state = Qwen3ForCausalLM.from_pretrained(out / f"{name}.16bit").state_dict()
    trained = torch.load(out / f"{name}.weights.pt")
    assert state.keys() == trained.keys(), sorted(set(state) ^ set(trained))
    assert all(torch.equal(state[k], trained[k]) for k in trained), name
    assert json.loads((out / f"{name}.json").read_text())["consolidated"] == "equal", name


def assert_states_equal(got: dict, ref: dict, what: str) -> None:
    """{"fp32": dense, "exp_avg": dense, ...} equal bit for bit, every state and tensor."""
    assert got.keys() == ref.keys(), (what, sorted(got), sorted(ref))
    for state in ref:
        assert got[state].keys() == ref[state].keys(), (what, state, sorted(set(got[state]) ^ set(ref[state])))
        bad = [k for k in ref[state] if not torch.equal(got[state][k], ref[state][k])]
        assert not bad, f"{what}: {state} differs in {bad[:4]}"


@pytest.mark.parametrize("ranks,n,m", [(8, 2, 2), (4, 1, 2)], ids=["dp2xn2xm2", "dp2xn1xm2"])
def test_zero_stages_match_dense(workdir, parity_launch, ranks, n, m):
    """ZeRO 0/1/2/3 (+3 under zero.Init) under the launcher: every loss, grad norm, final weight."""
    cases = PARITY_CASES[ranks]
    seconds = parity_launch(ranks, n, m)
    dp = ranks // (n * m)
    ref, seeded = dense_run(dp), build_model().state_dict()
    report = {}
    for case in cases.split(","):
        name = f"w{ranks}_{case}"
        init = torch.load(workdir / f"{name}.init.pt")
        assert init.keys() == seeded.keys(), sorted(set(init) ^ set(seeded))
        if case.endswith("i"):  # zero_init_model draws its own HF init: the reference starts there
            case_ref = dense_run(dp, init_state=init)
        else:  # patching (and the gather back) loses nothing: the start is the seeded model, bit for bit
            assert all(torch.equal(init[k], seeded[k]) for k in seeded), case
            case_ref = ref
        report[case] = compare(workdir, name, case_ref, TOL)
        report[case]["export_logits"] = check_export(workdir, name)
        check_16bit(workdir, name)
        report[case]["rank_divergence"] = json.loads((workdir / f"{name}.json").read_text())["rank_divergence"]
        assert report[case]["rank_divergence"] == 0.0, (case, report[case])
    print(f"\n{ranks} ranks (dp x n x m = {ranks // (n * m)} x {n} x {m}), launch {seconds:.0f} s:", report)


def test_resume_reproduces_uninterrupted_run(workdir, resume_launch):
    """Checkpoints saved at step 5 by the 8-rank parity launch, resumed in fresh processes; before
    each resume a re-save of the same tag is SIGKILLed in one of the windows where the old save
    protocol left no loadable ``latest`` (and a stale ``*.partial`` lies beside it)."""
    cases, seconds = PARITY_CASES[8], resume_launch
    for case in cases.split(","):
        uninterrupted = json.loads((workdir / f"w8_{case}.json").read_text())
        resumed = json.loads((workdir / f"resume_{case}.json").read_text())
        assert resumed["resumed_from"] == SAVE_AT
        assert resumed["killed"][1] == 1, resumed["killed"]  # the re-save of step5 died of SIGKILL first
        # exact: same ranks, same reductions, same order
        assert resumed["losses"] == uninterrupted["losses"][SAVE_AT:], case
        assert resumed["grad_norms"] == uninterrupted["grad_norms"][SAVE_AT:], case
        a, b = torch.load(workdir / f"resume_{case}.weights.pt"), torch.load(workdir / f"w8_{case}.weights.pt")
        assert all(torch.equal(a[k], b[k]) for k in b), case
    killed = {c: json.loads((workdir / f"resume_{c}.json").read_text())["killed"] for c in cases.split(",")}
    print(f"\nresume launch {seconds:.0f} s: steps {SAVE_AT + 1}..{STEPS} bit-identical for {cases}; re-saves "
          f"killed first (window, SIGKILL, latest): {killed}")


def test_resume_at_another_layout_is_exact(workdir, resume_launch):
    """A checkpoint saved at dp2 x n1 x m2 resumed at dp2 x n2 x m2 (8 ranks, each at another ZeRO
    stage) and at dp2 x n2 x m1 (the same 4 ranks): right after the load the dense fp32 weights and
    Adam moments are bit-identical to those of the saving engine at step 5; steps 6..10 match the
    dense run. Also GPT-NeoX (fused QKV, partial rotary) and bf16 (ZeRO-2 -> ZeRO-1), n1 x m2 -> n2 x m1."""
    ref, report = dense_run(2), {}
    for prefix, pairs in (("cross", CROSS), ("relayout", RELAYOUT_CROSS)):
        for pair in pairs.split(","):
            src, stage = pair.split(":")
            name = f"{prefix}_{src}to{stage}"
            assert_states_equal(torch.load(workdir / f"{name}.loaded.pt"),
                                torch.load(workdir / f"w4_{src}.step{SAVE_AT}.pt"), name)
            metrics = json.loads((workdir / f"{name}.json").read_text())
            assert metrics["resumed_from"] == SAVE_AT
            assert metrics["loaded_by"] == ("engine.load_checkpoint" if name in ENGINE_LOAD else
                                            "ds_twolevel.load_checkpoint"), (name, metrics["loaded_by"])
            report[name] = compare(workdir, name, ref, TOL, first_step=SAVE_AT + 1)
    for name in ("neox", "bf16"):
        assert_states_equal(torch.load(workdir / f"{name}.loaded.pt"), torch.load(workdir / f"{name}.step2.pt"), name)
    print(f"\ncross-layout resumes (8-rank launch {resume_launch:.0f} s): {report}")


def test_checkpoints_that_cannot_be_resumed_are_refused(workdir, parity_launch):
    """Another model, no layout record, a missing file, a truncated optimizer file of tp rank 1 (at the
    saved layout, DeepSpeed's own load): the same one line on every rank, nothing loaded."""
    parity_launch(4, 1, 2)
    per_rank = json.loads((workdir / "refusals.json").read_text())
    assert all(r == per_rank[0] for r in per_rank), per_rank
    got = per_rank[0]
    assert got["unchanged_ckpt_neox"] == got["unchanged_truncated"] == "True"
    assert all("\n" not in v for v in got.values()), got
    assert got["ckpt_neox"].startswith(f"loading checkpoint {workdir / 'ckpt_neox'} failed on rank 0, 1, 2, 3: "
                                       f"ValueError: {workdir / 'ckpt_neox' / 'step2'} holds another model than this "
                                       f"job's ("), got["ckpt_neox"]
    assert "resume it with the model it was saved from (GPTNeoXForCausalLM)" in got["ckpt_neox"]
    assert f"{workdir / 'nomanifest' / 'step5'} has no two_level.json: it was not written by ds_twolevel" in \
        got["nomanifest"], got["nomanifest"]
    assert got["incomplete"].endswith(f"{workdir / 'incomplete' / 'step5'} is incomplete: 1 file(s) missing "
                                      f"(zero_pp_rank_1_mp_rank_01_optim_states.pt); resume from another checkpoint")
    source = workdir / "ckpt_w4_1"
    assert got["unchanged_zero0_bf16ckpt_w4_1"] == got["unchanged_load_universalckpt_w4_1"] == "True"
    print(f"\nreshard / load_universal refusals: {(workdir / 'refusals_added_seconds.txt').read_text()} s of the launch")
    assert got["zero0_bf16ckpt_w4_1"] == (
        f"loading checkpoint {source} failed on rank 0, 1, 2, 3: ValueError: {source / 'step5'} was saved at "
        "dp=2 x n=1 x m=2 with ZeRO 1, this job runs dp=2 x n=2 x m=1 with ZeRO 0 and cannot be resharded "
        "(resharding a checkpoint needs ZeRO stage 1-3 with fp16/bf16 (stage 0 wraps the optimizer in DeepSpeed's "
        "fp16/bf16 optimizer, whose state is not per tensor); use ZeRO stage 1 or fp32); resume at dp=2 x n=1 x m=2 "
        f"with ZeRO 1, or start from its dense weights: ds-twolevel convert {source} OUT"), got["zero0_bf16ckpt_w4_1"]
    assert got["load_universalckpt_w4_1"] == (
        f"loading checkpoint {source} failed on rank 0, 1, 2, 3: ValueError: \"checkpoint\": {{\"load_universal\": "
        "true} is not supported for two-level models; remove it: ds_twolevel.load_checkpoint reshards a checkpoint "
        "to any dp x n x m itself"), got["load_universalckpt_w4_1"]
    # verified against the manifest's record by the ranks whose DeepSpeed load reads it (tp rank 1, both dp ranks)
    assert got["truncated"].startswith(f"loading checkpoint {workdir / 'truncated'} failed on rank 1, 3: ValueError: "
                                       "step5/zero_pp_rank_1_mp_rank_01_optim_states.pt (tp rank 1, dp rank 1): 1000 "
                                       "bytes, the manifest records "), got["truncated"]
    assert got["truncated"].endswith("resume from another tag, or restore the file"), got["truncated"]


CONVERTED = ["w8_0", "w8_1", "w8_2", "w8_3", "w8_3i", "w4_0", "w4_1", "w4_2", "w4_3", "neox", "bf16"]


def test_checkpoints_convert_to_dense(workdir, parity_launch):
    """Every checkpoint (ZeRO 0-3, 8 and 4 ranks, GPT-NeoX, bf16) read back without any engine: dense
    fp32 master weights and Adam moments bit-identical to the saving engine's own (live) ones."""
    from ds_twolevel.deepspeed.checkpoint import dense_from_checkpoint
    from ds_twolevel.deepspeed.convert import resolve_tag_dir

    parity_launch(8, 2, 2)
    parity_launch(4, 1, 2)
    for name in CONVERTED:  # the checkpoint a resume would take (the resume launch may have killed a re-save)
        tag_dir = resolve_tag_dir(workdir / f"ckpt_{name}")
        got = dense_from_checkpoint(tag_dir, states=("fp32", "exp_avg", "exp_avg_sq"))
        ref = torch.load(workdir / f"{name}.step{2 if name in ('neox', 'bf16') else SAVE_AT}.pt")
        module = ref.pop("dense_state_dict")  # fp32: the masters themselves; bf16: the masters rounded
        assert_states_equal(got, ref, name)
        assert_states_equal({"w": {k: v.to(module[k].dtype) for k, v in got["fp32"].items()}}, {"w": module}, name)


def test_deepspeed_conversion_tools_on_two_level_checkpoints(workdir, parity_launch, tmp_path):
    """``ds-twolevel convert`` (then plain from_pretrained), the ``zero_to_fp32.py`` / ``zero_to_torch.py``
    beside the checkpoint, ``get_fp32_state_dict_from_zero_checkpoint``: the dense weights. DeepSpeed's
    own script fails on these files; ``ds_to_universal`` refuses them with the way that works."""
    import runpy

    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.utils import zero_to_fp32
    from safetensors.torch import load_file

    from ds_twolevel.deepspeed import engine_hooks as deepspeed_compat
    from ds_twolevel.tools import cli
    from ds_twolevel.deepspeed.convert import resolve_tag_dir

    parity_launch(8, 2, 2)
    ckpt, ref = workdir / "ckpt_w8_2", torch.load(workdir / f"w8_2.step{SAVE_AT}.pt")["dense_state_dict"]
    assert cli.main(["convert", str(ckpt), str(tmp_path / "hf")]) == 0
    assert_states_equal({"fp32": Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").state_dict()}, {"fp32": ref}, "hf")
    for script, extra, dtype in (("zero_to_fp32.py", ["--safe_serialization"], torch.float32),
                                 ("zero_to_torch.py", ["--dtype", "bf16", "--safe_serialization"], torch.bfloat16)):
        argv = sys.argv
        sys.argv = [script, str(ckpt), str(tmp_path / script), *extra]
        try:
            runpy.run_path(str(ckpt / script), run_name="__main__")
        finally:
            sys.argv = argv
        got = load_file(tmp_path / script / "model.safetensors")
        assert_states_equal({"w": got}, {"w": {k: v.to(dtype) for k, v in ref.items()}}, script)
    deepspeed_compat.install()
    assert_states_equal({"w": zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt))}, {"w": ref}, "fp32 fn")
    with pytest.raises(ValueError, match=r"Expected 2 of '\*_optim_states.pt' .* but found 8 files"):
        deepspeed_compat.original("get_fp32_state_dict_from_zero_checkpoint")(str(ckpt))
    for case in ("w8_2", "w8_3"):  # ZeRO-1/2 and ZeRO-3 take different paths in ds_to_universal
        args = argparse.Namespace(input_folder=str(resolve_tag_dir(workdir / f"ckpt_{case}")),
                                  output_folder=str(tmp_path / f"uc_{case}"), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with pytest.raises(ValueError, match="not supported for .*: ds_twolevel two-level shards .*`ds-twolevel convert"):
            ds_to_universal.main(args)


@pytest.mark.parametrize("fault", ["stall", "die"])
def test_lost_rank_stops_the_others_within_timeout(fault):
    """2 ranks (1 x 1 x 2): rank 1 stops answering (sleeps) or dies with exit status 0 at step 2 —
    neither is noticed by the launcher. Rank 0 must say so and exit within the timeout."""
    timeout = 8
    proc, seconds = launch(2, "--scenario", "fault", "--layout", "1x2", "--timeout", str(timeout),
                           "--fault", fault, timeout=180)
    ended = time.time()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    fault_at = float(text.split("FAULT_AT ")[1].split()[0])
    assert "[ds_twolevel] rank 0: a peer rank died or stopped responding during training" in text, text[-4000:]
    if fault == "stall":
        assert f"Timed out waiting {timeout * 1000}ms" in text  # the configured timeout reached the backend
    if fault == "die":  # the heartbeat names the dead rank (a sleeping one still beats: it is alive)
        assert "rank 1 stopped responding (pid" in text and "exited" in text, text[-4000:]
    assert ended - fault_at < timeout + 30, ended - fault_at
    print(f"\n{fault}: job ended {ended - fault_at:.1f} s after the fault (timeout {timeout} s); launch {seconds:.0f} s")


def test_world_size_that_does_not_factor_is_refused(workdir):
    proc, _ = launch(3, "--scenario", "badworld", "--layout", "2x2", timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # every rank joins the rendezvous and the ranks agree: the same line on all three
    assert text.count("REFUSED: validating the DeepSpeed config failed on rank 0, 1, 2: ValueError: world size 3 is "
                      "not a multiple of n*m = 2*2 = 4") == 3, text[-3000:]
    assert "NOT REFUSED" not in text


if __name__ == "__main__":
    main()
