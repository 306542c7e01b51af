"""The recipes end to end on CPU: recipes/train.py under the ``deepspeed`` launcher (a small Llama,
ZeRO-3 under zero.Init, 2 x 1 x 2 ranks) in two launches (4 steps, then ``--resume`` to 8 with
``--export``), its dense export through plain ``from_pretrained``, recipes/infer_deepspeed.py
(``ds_twolevel.init_inference``) under ``torchrun``, and their one-line refusals.

Ulysses composed with two-level through the launcher: the command of docs/which_parallelism.md ("Compose
two-level with Ulysses", ``ds_configs/zero2_sp2_n1_m2.json``: sp = 2 x 1x2, ZeRO-2) for 4 steps, and the same
command with ``ds_configs/zero3_sp2_n1_m2.json`` (ZeRO-3), each against the dense Llama trained in this process
from the same seed on the same batches (torch AdamW, DeepSpeed's WarmupLR, the same clipping): every step's loss
and gradient norm, and the exported weights, within 1e-5.

The two training launches are also the launcher test of DeepSpeed's CPU comm op: they run with
their own, fresh ``TORCH_EXTENSIONS_DIR`` that holds this environment's compiled objects but not the
library, so the first launch must build (link) ``deepspeed_shm_comm.so`` and say so; the second must
reach its first step without building anything.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_twolevel.deepspeed.env import SHM_OP, extensions_dir

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
PROMPT = "We hold these truths"
CONFIG = "ds_configs/zero3_init_n1_m2.json"
NOISE = ("Traceback", "FutureWarning", "Attempting to get learning rate from scheduler", "built successfully")


def _env(**extra: str) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", **extra}


def _run(cmd: list[str], timeout: float = 1800, check: bool = True, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
        noise = [n for n in NOISE if n in proc.stdout + proc.stderr]
        assert not noise, (noise, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc, time.time() - t0


def _seeded_extensions_dir(root: Path) -> Path:
    """A fresh extensions dir with this environment's compiled objects of the op but not its library
    (a link instead of 2 min of compiling; a full build when the environment has none yet)."""
    src = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or extensions_dir()) / SHM_OP
    dst = root / SHM_OP
    dst.mkdir(parents=True)
    for item in (src.iterdir() if src.is_dir() else []):
        if item.is_file() and item.name not in (f"{SHM_OP}.so", "lock"):
            shutil.copy2(item, dst / item.name)
    return root


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _train(out: Path, ext: Path, steps: int, *flags: str) -> tuple[str, float]:
    from ds_twolevel.testing import free_port

    proc, seconds = _run(["deepspeed", "--num_gpus", "4", "--master_port", str(free_port()), "recipes/train.py",
                          "--deepspeed_config", CONFIG, "--steps", str(steps), "--log_every", "4",
                          "--save_every", "4", "--out", str(out), *flags], TORCH_EXTENSIONS_DIR=str(ext))
    return proc.stdout + proc.stderr, seconds


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict:
    out, ext = tmp_path_factory.mktemp("recipe"), _seeded_extensions_dir(tmp_path_factory.mktemp("ext"))
    library = ext / SHM_OP / f"{SHM_OP}.so"
    first, t_first = _train(out, ext, STEPS // 2)
    stamp = _stamp(library)
    second, t_second = _train(out, ext, STEPS, "--resume", "--export")
    print(f"\nrecipes/train.py, 4 ranks: {STEPS // 2} steps (building the op) {t_first:.0f} s; "
          f"--resume to {STEPS} + export {t_second:.0f} s")
    return {"out": out, "ext": ext, "first": first, "second": second, "stamp": (stamp, _stamp(library))}


@pytest.fixture(scope="module")
def trained(launches) -> Path:
    return launches["out"]


def test_first_launch_says_what_it_builds_and_the_second_builds_nothing(launches):
    build_dir = launches["ext"] / SHM_OP
    first, second = launches["first"], launches["second"]
    said = "\n".join(line for line in first.splitlines() if "[ds_twolevel]" in line or "shm" in line.lower())
    assert first.count(f"[ds_twolevel] compiling DeepSpeed's CPU shared-memory comm op ({SHM_OP}) in {build_dir}") == 1, \
        (said, sorted(p.name for p in build_dir.iterdir()))
    assert first.count(f"[ds_twolevel] built {SHM_OP} in ") == 1  # local rank 0 speaks for the node
    assert f"({build_dir / f'{SHM_OP}.so'})" in first
    assert "[ds_twolevel]" not in second, second[-3000:]
    before, after = launches["stamp"]
    assert before == after  # the library was not rewritten
    assert "resumed from step 4" in second and "step     5  loss" in second  # it reached its first step


def test_train_recipe_logs_plots_and_checkpoints(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["layout"] == {"dp": 2, "sp": 1, "n": 1, "m": 2} and metrics["zero_stage"] == 3
    losses = metrics["losses"]
    assert len(losses) == STEPS and all(0 < x < 10 for x in losses)
    assert losses[-1] < losses[0]  # it learns
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "ckpt" / "latest").read_text().strip() == f"global_step{STEPS}"
    assert not list((trained / "ckpt").glob("*.partial"))


def test_metrics_have_grad_norm_lr_and_the_time_of_both_segments(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    norms, lrs = metrics["grad_norms"], metrics["lrs"]
    assert len(norms) == len(lrs) == STEPS and all(0 < g < 100 for g in norms)
    assert lrs[0] == pytest.approx(5e-5) and lrs == sorted(lrs) and lrs[-1] > lrs[0]  # warm-up from 5e-5, not 0
    assert metrics["resumed_from"] == 4 and metrics["steps_run"] == STEPS - 4
    states = sorted((trained / "ckpt" / "global_step4").glob("*mp_rank_00_model_states.pt"))  # ZeRO-3: zero_pp_rank_0_...
    state = torch.load(states[0], weights_only=False)  # DeepSpeed keeps client_state at the top level
    assert 0 < state["seconds"] < metrics["seconds"]  # the first segment's seconds are included
    assert state["losses"] == metrics["losses"][:4] and state["lrs"] == lrs[:4]


def test_exported_dense_checkpoint_loads_with_from_pretrained_and_matches(trained):
    from transformers import LlamaForCausalLM

    umask = os.umask(0)
    os.umask(umask)
    assert (trained / "dense").stat().st_mode & 0o777 == 0o777 & ~umask  # a normal directory, not 0700
    model = LlamaForCausalLM.from_pretrained(trained / "dense").eval()  # plain HF, no ds_twolevel
    probe = torch.load(trained / "probe.pt")  # logits of the trained, partitioned model
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    err = float((logits - probe["logits"]).abs().max() / probe["logits"].abs().max())
    assert err <= 1e-5, err


# -- Ulysses x two-level under the deepspeed launcher, against the dense run ---------------------------
COMPOSED_STEPS = 4
COMPOSED_CONFIG = "ds_configs/zero2_sp2_n1_m2.json"
"""the documented config; the ZeRO-3 one runs the same command."""
COMPOSED_CONFIGS = (COMPOSED_CONFIG, "ds_configs/zero3_sp2_n1_m2.json")


def _documented_command() -> list[str]:
    """docs/which_parallelism.md's launch of the composed config, as argv (its environment assignments dropped:
    :func:`_env` sets them)."""
    from tests.test_readme import readme_commands

    page = REPO / "docs" / "which_parallelism.md"
    found = [c.text for c in readme_commands(page.read_text(encoding="utf-8"), whole=True) if COMPOSED_CONFIG in c.text]
    assert len(found) == 1, found
    words = shlex.split(found[0])
    assert words[:2] == ["DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1"] and words[2:5] == ["deepspeed", "--num_gpus", "4"]
    return words[2:]


def _recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_recipe", REPO / "recipes" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dense_run(config: dict, steps: int, world: int, seq: int = 64, seed: int = 0) -> dict:
    """recipes/train.py's run on one dense Llama (its defaults: seq 64, seed 0): the same initial weights and
    global batches, torch AdamW with the config's parameters, DeepSpeed's WarmupLR, clipping at the config's norm."""
    from deepspeed.runtime.lr_schedules import WarmupLR
    from transformers import LlamaForCausalLM

    from ds_twolevel.deepspeed.env import drop_startup_lr_warning

    drop_startup_lr_warning()
    recipe = _recipe_module()
    torch.manual_seed(seed)  # as recipes/train.py's build() before it makes the model
    model = LlamaForCausalLM(recipe.model_config(seq)).train()
    opt_kw = config["optimizer"]["params"]
    opt = torch.optim.AdamW(model.parameters(), lr=opt_kw["lr"], betas=tuple(opt_kw["betas"]), eps=opt_kw["eps"],
                            weight_decay=opt_kw["weight_decay"])
    scheduler = WarmupLR(opt, **config["scheduler"]["params"])
    tl = config["two_level"]
    dp = world // (config["sequence_parallel_size"] * tl["n"] * tl["m"])
    rows = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * dp
    tokens, losses, norms = recipe.corpus(), [], []
    for step in range(1, steps + 1):
        # every replica's micro-batches at once: no padding, so their mean loss is the whole batch's
        ids = recipe.global_batch(tokens, step, rows, seq, seed)  # (rows, seq)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), config["gradient_clipping"])))
        opt.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "grad_norms": norms, "state": model.state_dict()}


@pytest.fixture(scope="module", params=COMPOSED_CONFIGS, ids=lambda path: Path(path).stem)
def composed(request, tmp_path_factory) -> dict:
    """The documented composed launch with one of the configs (4 steps, into a temporary --out) and the dense run
    of the same steps."""
    from ds_twolevel.testing import free_port

    out = tmp_path_factory.mktemp("composed")
    words = _documented_command()
    words = [*words[:3], "--master_port", str(free_port()), *words[3:]]
    words[words.index("--out") + 1] = str(out)
    words[words.index("--deepspeed_config") + 1] = request.param
    _, seconds = _run([*words, "--steps", str(COMPOSED_STEPS)])
    print(f"\n{request.param} under the deepspeed launcher, 4 ranks, {COMPOSED_STEPS} steps + export: {seconds:.0f} s")
    config = json.loads((REPO / request.param).read_text())
    return {"out": out, "config": config, "dense": _dense_run(config, COMPOSED_STEPS, world=4)}


def test_composed_launch_trains_exactly_like_the_dense_model(composed):
    """sp = 2 x 1x2 (ZeRO-2, ZeRO-3) under the deepspeed launcher: each step's loss and (pre-clip) gradient norm,
    and the exported weights after the run, within 1e-5 of the dense run. Weights are compared relative to the
    model's largest (the norm weights, 1.0): a weight whose gradient is near zero moves by up to lr in Adam's first
    steps whatever its size, so a per-tensor ratio would measure fp32 noise amplified by Adam."""
    from transformers import LlamaForCausalLM

    from ds_twolevel.testing import rel_err

    out, dense = composed["out"], composed["dense"]
    metrics = json.loads((out / "metrics.json").read_text())
    stage = composed["config"]["zero_optimization"]["stage"]
    assert metrics["layout"] == {"dp": 1, "sp": 2, "n": 1, "m": 2} and metrics["zero_stage"] == stage
    worst = {}
    for key in ("losses", "grad_norms"):
        errors = [rel_err(torch.tensor(a), torch.tensor(b)) for a, b in zip(metrics[key], dense[key], strict=True)]
        assert len(errors) == COMPOSED_STEPS and max(errors) <= 1e-5, (key, errors)
        worst[key] = max(errors)
    exported = LlamaForCausalLM.from_pretrained(out / "dense").state_dict()
    ref = dense["state"]
    scale = max(float(v.abs().max()) for v in ref.values())
    errors = {k: rel_err(exported[k], v, scale) for k, v in ref.items()}
    assert exported.keys() == ref.keys() and max(errors.values()) <= 1e-5, errors
    print(f"\ncomposed launch vs dense, relative errors: {worst}, weights {max(errors.values()):.1e}")


def test_inference_under_torchrun_generates_like_dense(trained, tmp_path):
    from transformers import LlamaForCausalLM

    from ds_twolevel.testing import free_port

    out = tmp_path / "gen.json"
    _, seconds = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                       "--master_port", str(free_port()), "recipes/infer_deepspeed.py", "--model",
                       str(trained / "dense"), "--deepspeed_config", "ds_configs/inference_n2_m2.json",
                       "--prompt", PROMPT, "--max_new_tokens", "24", "--out", str(out)])
    model = LlamaForCausalLM.from_pretrained(trained / "dense").eval()
    ids = torch.tensor([list(PROMPT.encode())])
    dense = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert json.loads(out.read_text())["ids"] == dense[0].tolist()
    print(f"\ninit_inference under torchrun (1 x 2 x 2): greedy tokens equal dense; {seconds:.0f} s")


def _one_line_refusal(proc: subprocess.CompletedProcess, *expected: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.stdout, proc.stderr)
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_inference_refuses_a_missing_model_directory_at_once():
    proc, _ = _run([sys.executable, "recipes/infer_deepspeed.py", "--model", "out/dense", "--deepspeed_config",
                    "ds_configs/inference_n2_m2.json"], check=False, HF_HUB_OFFLINE="0")
    _one_line_refusal(proc, "recipes/infer_deepspeed.py: error: --model out/dense: no such directory",
                      "recipes/out/dense")


def test_train_refuses_a_world_its_layout_does_not_divide_naming_layouts_the_model_takes():
    """What the launcher hands every rank (WORLD_SIZE, RANK): refused before the rendezvous, rank 0 says it."""
    cmd = [sys.executable, "recipes/train.py", "--deepspeed_config", "ds_configs/zero2_n2_m2.json"]
    proc, _ = _run(cmd, check=False, WORLD_SIZE="3", RANK="0", LOCAL_RANK="0")
    line = _one_line_refusal(proc, "world size 3 is not a multiple of n*m = 2*2 = 4 (ds_configs/zero2_n2_m2.json)",
                             "launch 4 or 8 ranks", "take: dp=3 x n=1 x m=1")
    assert "m=3" not in line and "n=3" not in line  # 8 heads x 16 dims take neither


def test_generate_recipe_lists_the_decoders_hf_integration_tests():
    """recipes/generate.py names its --arch choices without importing torch (its checks come first)."""
    import importlib.util

    from hf_integration.testing import DECODERS

    spec = importlib.util.spec_from_file_location("generate_recipe", REPO / "recipes" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ARCHS == DECODERS


SCHEDULED = [p for p in sorted((REPO / "ds_configs").glob("*.json")) if "scheduler" in json.loads(p.read_text())]


@pytest.mark.parametrize("path", SCHEDULED, ids=[p.name for p in SCHEDULED])
def test_shipped_warmup_starts_above_zero_and_rises_to_the_optimizer_lr(path):
    """DeepSpeed's own WarmupLR with each shipped config's parameters: step 1 no longer runs at lr 0."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    from ds_twolevel.deepspeed.env import drop_startup_lr_warning

    drop_startup_lr_warning()  # its constructor's record (tested below), not this test's subject
    config = json.loads(path.read_text())
    assert config["scheduler"]["type"] == "WarmupLR"
    params, peak = config["scheduler"]["params"], config["optimizer"]["params"]["lr"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = WarmupLR(optimizer, **params)
    lrs = []
    for _ in range(params["warmup_num_steps"] + 3):  # the lr each optimizer step uses, then the scheduler moves
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] > 0 and lrs == sorted(lrs) and lrs[-1] == pytest.approx(peak), lrs


def test_warmup_start_up_warning_is_dropped_and_nothing_else():
    import logging

    from deepspeed.runtime.lr_schedules import WarmupLR
    from deepspeed.utils import logger

    from ds_twolevel.deepspeed.env import _LR_FILTER, drop_startup_lr_warning

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    try:
        logger.removeFilter(_LR_FILTER)
        WarmupLR(optimizer, warmup_min_lr=1e-5, warmup_max_lr=1e-3)
        assert [r.getMessage() for r in records].count(
            "Attempting to get learning rate from scheduler before it has started") == 1  # DeepSpeed's own record
        records.clear()
        drop_startup_lr_warning()
        WarmupLR(optimizer, warmup_min_lr=1e-5, warmup_max_lr=1e-3)
        logger.warning("another warning")
        assert [r.getMessage() for r in records] == ["another warning"]
    finally:
        logger.removeHandler(handler)


# -- a bad config is refused (or warned about) before any collective ------------------------------------
_BEFORE_RANKS = """
import runpy, sys
import torch.distributed as dist

def _no_rendezvous(*args, **kwargs):  # the first collective of every launch path starts here
    print("INIT_PROCESS_GROUP", "transformers" in sys.modules, file=sys.stderr, flush=True)
    raise SystemExit(3)

dist.init_process_group = _no_rendezvous
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _edited(tmp_path: Path, source: str, edit) -> str:
    cfg = json.loads((REPO / source).read_text())
    edit(cfg)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _before_ranks(recipe: str, *flags: str) -> subprocess.CompletedProcess:
    """``recipe`` as rank 0 of 4 would run it, with ``init_process_group`` replaced by an exit (status 3)."""
    proc, _ = _run([sys.executable, "-c", _BEFORE_RANKS, f"recipes/{recipe}", *flags], check=False,
                   WORLD_SIZE="4", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT="29500")
    return proc


BAD_CONFIGS = [
    ("train.py", "ds_configs/zero2_n2_m2.json", lambda c: c["two_level"].update(stratgy="qk_allgather"),
     'unknown key "stratgy" in "two_level" (did you mean "strategy"?)'),
    ("train.py", "ds_configs/zero2_n2_m2.json", lambda c: c["optimizer"]["params"].update(lr="1e-3"),
     '"optimizer.params.lr" is the string "1e-3"'),
    ("train_hf_trainer.py", "ds_configs/zero2_n2_m2.json", lambda c: c["zero_optimization"].update(offload_optimizer="cpu"),
     '"zero_optimization.offload_optimizer": Input should be a valid dictionary'),
    ("train.py", "ds_configs/zero2_n2_m2.json", lambda c: c.update(gradient_clliping=1.0) or c["two_level"].update(
        strict_config=True), 'unknown key "gradient_clliping" in the DeepSpeed config (did you mean "gradient_clipping"?)'),
]


@pytest.mark.parametrize("recipe,source,edit,message", BAD_CONFIGS, ids=[f"{r}-{m[:24]}" for r, _, _, m in BAD_CONFIGS])
def test_a_bad_config_is_refused_before_any_collective_and_before_transformers(tmp_path, recipe, source, edit, message):
    proc = _before_ranks(recipe, "--deepspeed_config", _edited(tmp_path, source, edit))
    line = _one_line_refusal(proc, f"recipes/{recipe}: error: ", message)
    assert "INIT_PROCESS_GROUP" not in proc.stderr, line


def test_a_bad_inference_config_is_refused_before_the_model_is_read(tmp_path, trained):
    config = _edited(tmp_path, "ds_configs/inference_n2_m2.json", lambda c: c.update(dtype="fp64"))
    proc = _before_ranks("infer_deepspeed.py", "--model", str(trained / "dense"), "--deepspeed_config", config)
    _one_line_refusal(proc, "recipes/infer_deepspeed.py: error: ", '"dtype": ', "(DeepSpeed's DeepSpeedInferenceConfig)")


def test_an_unknown_top_level_key_is_warned_about_before_any_collective(tmp_path):
    config = _edited(tmp_path, "ds_configs/zero2_n2_m2.json", lambda c: c.update(gradient_clliping=1.0))
    proc = _before_ranks("train.py", "--deepspeed_config", config)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    warning = [i for i, line in enumerate(lines) if line.startswith("ds-twolevel: warning: unknown key "
                                                                    '"gradient_clliping" in the DeepSpeed config '
                                                                    '(did you mean "gradient_clipping"?)')]
    assert len(warning) == 1 and warning[0] < lines.index("INIT_PROCESS_GROUP True"), lines
