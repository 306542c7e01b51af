"""The fault matrix: load, train, save, generate x (SIGKILL, SIGSTOP, bad input) on one rank.

Every cell is a 2-rank job (n=1 x m=2, a tiny Llama loaded slice by slice from a sharded
safetensors checkpoint, DeepSpeed ZeRO-1 on gloo, process-group timeout ``TIMEOUT`` s). The
faulty rank is always rank 1 (rank 0 hosts the rendezvous store); it prints ``FAULT_AT <time>``
and then kills or stops itself at an instrumented point *inside* the phase:

- load: SIGKILL/SIGSTOP at its first tensor read (``SafetensorsReader.read``); bad input: its
  copy of one shard is truncated;
- train: at step 2, before the forward; bad input: its copy of the config is invalid;
- save: SIGKILL after DeepSpeed wrote its files into ``<tag>.partial``, SIGSTOP inside the
  export's gather; bad input: the writer (rank 0) cannot create the export directory;
- generate: at its 3rd forward (the 2nd decoding step); bad input: a token id outside the vocabulary on
  rank 1 only (the guard's input check refuses it on both ranks).

What must hold: every rank that is not stopped exits by itself within ``TIMEOUT + 30`` s of the
fault (a stopped rank is killed once the rest of its job ended, as the launchers do), with a
message naming rank 1: ``fail_fast``'s "rank 1 stopped responding (pid ..., exited|stopped)"
(exit 17), or the same ``AgreementError`` naming rank 1 and its file on every rank; and no
checkpoint or export is left half-written (``latest`` names a complete checkpoint, an export is
absent or complete). The three bad-input cells that end in the same error on both ranks share
one job with the fourth, so the matrix is 9 jobs, run ``PARALLEL`` at a time from one pre-imported "zygote"
(``ds_twolevel.testing.run_jobs``: forked ranks start in milliseconds).

The orphan test runs the real ``deepspeed`` launcher and ``torchrun`` side by side and kills the
launcher process alone: the ranks must exit with the watchdog's message.

This file is also the rank script of that test (``--scenario orphan``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TIMEOUT = 30
"""process-group timeout of every job (seconds): generous, so that a healthy peer slowed down by the
machine's load (other jobs, and 4 of these at once) never looks stalled."""
PARALLEL = 4
"""jobs running at once."""
BOUND = TIMEOUT + 30
"""every rank must have exited this long after the fault."""
VOCAB = 96
PRELOAD = ("torch", "accelerate", "safetensors.torch", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.generation.utils", "transformers.conversion_mapping", "transformers.core_model_loading",
           "transformers.utils.loading_report", "deepspeed", "deepspeed.comm", "deepspeed.runtime.engine",
           "deepspeed.runtime.zero.stage_1_and_2", "ds_twolevel", "hf_integration", "tests.test_fault_matrix")
"""imported once by the zygote the ranks are forked from (transformers and deepspeed import lazily)."""


def ds_config(timeout_s: float = TIMEOUT) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9,
            "two_level": {"n": 1, "m": 2, "strategy": "cost_model", "timeout_s": timeout_s}}


# -- rank side ------------------------------------------------------------------------------------
def _rank() -> int:
    return int(os.environ["RANK"])


def _fault(kind: str, where: str) -> None:
    """Rank 1 records the time and kills or stops itself."""
    print(f"FAULT_AT {time.time():.3f} {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)


def _on_call(obj, name: str, n: int, action) -> None:
    """Instrument ``obj.name`` so that its ``n``-th call runs ``action`` (before it, or after it
    when ``n`` is negative: -1 = after the first call)."""
    original, calls = getattr(obj, name), [0]

    @functools.wraps(original)  # the same signature: generate() inspects forward's to choose its inputs
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            action()
        out = original(*args, **kwargs)
        if calls[0] == -n:
            action()
        return out

    setattr(obj, name, wrapped)


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts: the first left-padded, the second with an all-zeros attention mask."""
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1] = 0
    return ids, mask


def rank_cell(phase: str, kind: str, work: str) -> None:
    """One cell of the matrix: build the mesh, then load -> (generate | train -> save)."""
    import ds_twolevel
    from hf_integration import dense_save as hf_checkpoint  # the export calls gather_dense_state from here
    from hf_integration import load_partitioned
    from hf_integration.weights import SafetensorsReader

    work, faulty = Path(work), _rank() == 1
    mesh = ds_twolevel.build_mesh(str(work.parent / "ds.json"))
    if phase == "load" and faulty:
        _on_call(SafetensorsReader, "read", 1, lambda: _fault(kind, "load"))
    with ds_twolevel.fail_fast(TIMEOUT, what="loading"):
        model, _ = load_partitioned(work.parent / "ckpt", mesh)
    if phase == "generate":
        if faulty:
            _on_call(model, "forward", 3, lambda: _fault(kind, "generate"))
        with ds_twolevel.fail_fast(TIMEOUT, what="generating"):
            model.generate(_prompt()[0][:1], max_new_tokens=8, do_sample=False)
        return
    engine, *_ = ds_twolevel.initialize(model=model, config=str(work.parent / "ds.json"), mesh=mesh)
    engine.train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with ds_twolevel.fail_fast(TIMEOUT, what="training"):
        for step in range(1, 4 if phase == "train" else 2):
            if phase == "train" and step == 2 and faulty:
                _fault(kind, "train")
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    with ds_twolevel.fail_fast(TIMEOUT, what="saving"):
        ds_twolevel.save_checkpoint(engine, work / "ckpt_out", tag="first")
        if kind == "kill":  # after this rank's files and layout record are in second.partial/, before the commit
            _on_call(engine, "save_checkpoint", -1, lambda: faulty and _fault(kind, "save_checkpoint"))
            ds_twolevel.save_checkpoint(engine, work / "ckpt_out", tag="second")
        else:  # in the middle of the export's layer-by-layer gather
            _on_call(hf_checkpoint, "gather_dense_state", 2, lambda: faulty and _fault(kind, "export"))
            ds_twolevel.export_dense(engine, work / "export")


def rank_bad_inputs(work: str) -> None:
    """The bad-input column: three agreed refusals (config, load, save) and a bad token id."""
    import ds_twolevel
    from ds_twolevel.parallel.agreement import AgreementError
    from hf_integration import load_partitioned

    work, rank = Path(work), _rank()
    try:  # train: this rank's copy of the DeepSpeed config (rank 1's says "timeout_s": NaN)
        ds_twolevel.build_mesh(str(work / f"ds_rank{rank}.json"))
        print("NOT REFUSED: config", flush=True)
    except AgreementError as err:
        print(f"REFUSED config: {err}", flush=True)
    mesh = ds_twolevel.build_mesh(str(work.parent / "ds.json"))
    try:  # load: rank 1 reads a node-local copy whose last shard is truncated
        load_partitioned(work / "ckpt_truncated" if rank == 1 else work.parent / "ckpt", mesh)
        print("NOT REFUSED: load", flush=True)
    except AgreementError as err:
        print(f"REFUSED load: {err}", flush=True)
    model, _ = load_partitioned(work.parent / "ckpt", mesh)
    _zero_mask_parity(model, work.parent / "ckpt")
    try:  # save: the writer (rank 0) cannot create the export directory (its parent is a file)
        ds_twolevel.export_dense(model, work / "not_a_dir" / "export")
        print("NOT REFUSED: save", flush=True)
    except RuntimeError as err:
        print(f"REFUSED save: {err}", flush=True)
    ids, _ = _prompt()
    ids = ids[:1].clone()
    if rank == 1:  # generate: a token id outside the vocabulary on one rank only
        ids[0, 0] = VOCAB
        print(f"FAULT_AT {time.time():.3f} generate", flush=True)
    with ds_twolevel.fail_fast(TIMEOUT, what="generating"):
        model.generate(ids, max_new_tokens=4, do_sample=False)


def _zero_mask_parity(model, ckpt: Path) -> None:
    """At n=1 x m=2: logits and greedy tokens against dense HF sdpa on a batch whose second row has
    an all-zeros attention mask."""
    import transformers

    from ds_twolevel.testing import rel_err

    dense = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    ids, mask = _prompt()
    with torch.no_grad():
        err = rel_err(model(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits)
    same = torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                       dense.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    print(f"ZERO_MASK rel={err:.3e} tokens_equal={same}", flush=True)


def scenario_orphan() -> None:
    """Under a real launcher: build the mesh, then all-reduce for 20 minutes (far longer than the test)."""
    import torch.distributed as dist

    import ds_twolevel

    ds_twolevel.build_mesh(ds_config(timeout_s=60))
    print(f"RANK {dist.get_rank()} PID {os.getpid()}", flush=True)
    start = time.time()
    with ds_twolevel.fail_fast(60, what="the orphan loop"):  # a peer that exits first is reported, not a traceback
        while time.time() - start < 1200:
            dist.all_reduce(torch.ones(1))
            time.sleep(0.1)
    print("FINISHED: the ranks outlived their launcher", flush=True)


# -- pytest side ----------------------------------------------------------------------------------
CELLS = [(phase, kind) for kind in ("stall", "kill") for phase in ("load", "train", "save", "generate")]
"""stalls first: their survivors wait a whole timeout, which the kill cells' work then overlaps."""


def _prepare(root: Path) -> None:
    """The shared inputs: a sharded tiny-Llama checkpoint, the config, per-cell folders."""
    from hf_integration.testing import tiny_model

    tiny_model("llama").save_pretrained(root / "ckpt", max_shard_size="100KB")
    assert len(list((root / "ckpt").glob("*.safetensors"))) >= 3
    (root / "ds.json").write_text(json.dumps(ds_config()))
    bad = root / "bad"
    bad.mkdir()
    (bad / "ds_rank0.json").write_text(json.dumps(ds_config()))
    (bad / "ds_rank1.json").write_text(json.dumps(ds_config()).replace(f'"timeout_s": {TIMEOUT}', '"timeout_s": NaN'))
    shutil.copytree(root / "ckpt", bad / "ckpt_truncated")
    last = sorted((bad / "ckpt_truncated").glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    (bad / "not_a_dir").write_text("a file where the export's parent directory should be")
    for phase, kind in CELLS:
        (root / f"{phase}_{kind}").mkdir()


def _fault_time(out: str) -> float:
    assert "FAULT_AT " in out, out[-3000:]
    return float(out.split("FAULT_AT ")[1].split()[0])


def _check_files(work: Path, phase: str, kind: str) -> None:
    """No checkpoint or export half-written: ``latest`` names a complete checkpoint; no export."""
    if phase != "save":
        return
    ckpt = work / "ckpt_out"
    # rank 1 dies after its files and the layout record of "second" are written (the last step each
    # rank takes): rank 0 may commit "second" before it learns of the death, or not; either way
    # `latest` names a complete checkpoint, and nothing else looks like one
    latest = (ckpt / "latest").read_text().strip()
    assert latest in ("first", "second") if kind == "kill" else latest == "first", latest
    files = sorted(p.name for p in (ckpt / latest).iterdir())
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "two_level.json"} <= set(files), files
    for name in files:  # every file complete: DeepSpeed's .pt files and the layout record (two_level.json)
        if name.endswith(".pt"):
            torch.load(ckpt / latest / name, weights_only=False)
        elif name.endswith(".json"):
            json.loads((ckpt / latest / name).read_text())
    assert latest == "second" or not (ckpt / "second").exists()
    assert not (work / "export").exists()


@pytest.fixture(scope="module")
def launchers():
    """The real `deepspeed` launcher and `torchrun`, each running 2 ranks of ``--scenario orphan``."""
    from ds_twolevel.testing import free_port

    script = [str(Path(__file__).resolve()), "--scenario", "orphan"]
    ports = free_port(), free_port()
    procs = {"deepspeed": _launch(["deepspeed", "--num_gpus", "2", "--master_port", str(ports[0]), *script], ports[0]),
             "torchrun": _launch(["torchrun", "--nproc_per_node", "2", "--master_port", str(ports[1]), *script],
                                 ports[1])}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_fault_matrix(tmp_path):
    """Every cell: the survivor names rank 1 and exits within TIMEOUT + 30 s; no half-written file."""
    from ds_twolevel.testing import run_jobs

    _prepare(tmp_path)
    jobs = [(rank_cell, 2, (phase, kind, str(tmp_path / f"{phase}_{kind}"))) for phase, kind in CELLS]
    jobs.append((rank_bad_inputs, 2, (str(tmp_path / "bad"),)))
    start = time.time()
    results = run_jobs(jobs, timeout=900, preload=PRELOAD, max_parallel=PARALLEL)
    wall = time.time() - start
    report = []
    for (phase, kind), (r0, r1) in zip(CELLS, results[:-1]):
        cell = f"{phase}/{kind}"
        context = f"{cell}: rank 0 {r0.returncode}, rank 1 {r1.returncode}\n--- rank 0:\n{r0.output[-2500:]}\n" \
                  f"--- rank 1:\n{r1.output[-1500:]}"
        assert "FAULT_AT " in r1.output, context
        fault_at = _fault_time(r1.output)
        state = "exited" if kind == "kill" else "stopped (SIGSTOP/SIGTSTP)"
        what = {"load": "loading", "train": "training", "save": "saving", "generate": "generating"}[phase]
        message = (f"[ds_twolevel] rank 0: a peer rank died or stopped responding during {what}: "
                   f"rank 1 stopped responding")
        assert r0.returncode == 17 and message in r0.output and state in r0.output, context
        assert r0.ended_at - fault_at < BOUND, (r0.ended_at - fault_at, context)
        assert (r1.returncode == -signal.SIGKILL) if kind == "kill" else r1.stopped, context
        _check_files(tmp_path / f"{phase}_{kind}", phase, kind)
        report.append(f"{cell}: rank 0 exit 17 after {r0.ended_at - fault_at:.1f} s")
    report.append(_check_bad_inputs(tmp_path / "bad", results[-1]))
    print(f"\nfault matrix: 9 jobs x 2 ranks in {wall:.0f} s (timeout {TIMEOUT} s)\n  " + "\n  ".join(report))


def _check_bad_inputs(work: Path, ranks) -> str:
    r0, r1 = ranks
    for r in (r0, r1):  # the same one-line error on both ranks, naming rank 1 (or the writer) and the file
        assert (f"REFUSED config: validating the DeepSpeed config failed on rank 1: ValueError: "
                f"'{work / 'ds_rank1.json'}': \"two_level.timeout_s\" must be a finite number in [1, 604800], "
                f"got NaN; e.g. \"timeout_s\": 600") in r.output, r.output[-3000:]
        assert (f"REFUSED load: loading a checkpoint (load_partitioned) failed on rank 1: ValueError: "
                f"{work / 'ckpt_truncated'}") in r.output and "the file is truncated" in r.output, r.output[-3000:]
        assert f"REFUSED save: rank 0 failed to write {work / 'not_a_dir' / 'export'}" in r.output, r.output[-3000:]
        assert "NOT REFUSED" not in r.output
    assert not (work / "not_a_dir").is_dir()
    zero = r0.output.split("ZERO_MASK ")[1].split()[:2]
    assert float(zero[0].split("=")[1]) <= 1e-5 and zero[1] == "tokens_equal=True", zero
    fault_at = _fault_time(r1.output)
    for r in (r0, r1):  # the guard compares every forward's inputs: refused on both ranks before the embedding
        assert r.returncode == 1 and ("GuardError: the two-level guard (LlamaForCausalLM) refused this forward on "
                                      "rank(s) 0, 1: inputs differ between the ranks [0, 1] of one layer at forward "
                                      "call") in r.output and "IndexError" not in r.output, r.output[-3000:]
        assert r.ended_at - fault_at < BOUND
    return (f"bad inputs: config, load, save refused on both ranks (agreement); generate: refused on both ranks by "
            f"the guard after {max(r0.ended_at, r1.ended_at) - fault_at:.1f} s; all-zeros mask at m=2 vs HF sdpa: "
            f"{' '.join(zero)}")


def _launch(cmd: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def test_killing_the_launcher_stops_its_ranks(launchers):
    """Table row: killing the deepspeed launcher alone left all ranks training to the end. The real
    `deepspeed` runner (the ranks' grandparent: above deepspeed.launcher.launch) and `torchrun`
    (their parent) are SIGKILLed while their 2 ranks all-reduce; the ranks must exit with the
    watchdog's message (exit 18)."""
    outputs = {name: _orphan_case(name, proc) for name, proc in launchers.items()}
    for name, (text, pids, seconds) in outputs.items():
        said = text.count(f"the launcher is gone (process {launchers[name].pid}, {name}, exited); stopping this rank "
                          f"(exit 18)")
        # the first rank whose watchdog looks says so; its peer may learn it first from the failed
        # all-reduce (fail_fast names the rank that left), or be killed by deepspeed's launch.py
        peer_said = text.count("a peer rank died or stopped responding during the orphan loop: rank ")
        assert said >= 1 and (said + peer_said == 2 or name == "deepspeed"), (name, said, text[-3000:])
        assert "FINISHED" not in text
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _state(pid) in ("Z", "X"), (name, pid)
        assert seconds < 60, (name, seconds)
    print("\n" + "; ".join(f"{name}: both ranks gone {sec:.1f} s after the launcher was killed"
                           for name, (_, _, sec) in outputs.items()))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _orphan_case(name: str, proc: subprocess.Popen) -> tuple[str, list[int], float]:
    """Wait for both ranks, SIGKILL the launcher, read until every writer of the pipe is gone."""
    lines, pids = [], []
    deadline = time.time() + 300
    while len(pids) < 2 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)  # the two ranks share the pipe: their lines may interleave mid-line
        pids = [int(pid) for pid in re.findall(r"RANK \d+ PID (\d+)", "".join(lines))]
    assert len(pids) == 2, (name, "".join(lines)[-3000:])
    proc.send_signal(signal.SIGKILL)  # the launcher alone
    killed = time.time()
    lines.append(proc.stdout.read())  # EOF once the ranks (and deepspeed's launch.py) have exited
    gone = time.time()
    while any(_state(pid) not in ("Z", "X") for pid in pids) and time.time() < killed + 120:
        time.sleep(0.2)
        gone = time.time()
    return "".join(lines), pids, gone - killed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--scenario", required=True, choices=["orphan"])
    parser.parse_args()
    torch.set_num_threads(1)
    scenario_orphan()


if __name__ == "__main__":
    main()
