"""Two nodes on one machine: two ``torchrun`` node agents on localhost (c10d rendezvous, 4 ranks each),
8 ranks at dp x n x m = 2 x 2 x 2 through ``ds_twolevel.initialize`` with ZeRO-3, then ZeRO-2.

- with each, every step's loss and gradient norm and every final weight match a dense single-process
  run (torch AdamW + clip_grad_norm_, each step's global batch in one forward) within 1e-5;
- the checkpoint they save resumes on 1 node x 4 ranks (dp 1, resharded): the weights are bit-equal,
  and the next step matches the dense run's next step;
- then the second node's agent is killed (SIGKILL): its ranks stop (their launcher is gone), and the
  first node's ranks exit with a message naming the ranks and the node that stopped (the first to see
  it prints it and exits 17; its torchrun agent then stops the others).

The first agent hosts the rendezvous store (``is_host=1``), the second joins it (``is_host=0``), as on
two machines. This file is also the rank script (``--phase train|resume``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import ecosystem_ranks as R  # noqa: E402

STEPS = 3
"""steps on 2 nodes; one more after the resume on 1 node."""
TOL = 1e-5
TIMEOUT_S = 120
"""process-group timeout of the job (seconds): generous, a healthy peer on a loaded machine can lag; a
dead peer is seen at once (its connections close)."""


def config(stage: int = 2) -> dict:
    return {"train_micro_batch_size_per_gpu": R.MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": R.CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": R.LR, "betas": list(R.BETAS), "eps": R.EPS,
                                                      "weight_decay": 0.01, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
            "two_level": {"n": 2, "m": 2, "strategy": "cost_model", "timeout_s": TIMEOUT_S}}


def global_rows(step: int) -> torch.Tensor:
    """The global batch of ``step`` (1-based): 2 * MICRO rows, whatever the number of replicas."""
    data = R.rows((STEPS + 1) * 2 * R.MICRO, seed=31)
    return data[(step - 1) * 2 * R.MICRO:step * 2 * R.MICRO]


# -- rank side ---------------------------------------------------------------------------------------
def _train(engine, mesh, steps: range, record: dict) -> None:
    import ds_twolevel

    for step in steps:
        batch = ds_twolevel.replica_rows(global_rows(step), mesh)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        record["losses"].append(R.global_loss(loss, mesh))
        record["grad_norms"].append(float(engine.get_global_grad_norm()))


def rank_main(phase: str, work: Path) -> None:
    import torch.distributed as dist

    import ds_twolevel

    mesh = ds_twolevel.build_mesh(config())
    rank = dist.get_rank()
    record = {"rank": rank, "node": os.environ.get("GROUP_RANK"), "agent": os.getppid(), "dp": mesh.layout.dp,
              "losses": [], "grad_norms": []}
    if phase == "train":  # ZeRO-3 first (a fresh model), then ZeRO-2, whose checkpoint is resumed
        engine, *_ = ds_twolevel.initialize(model=R.build_model(), config=config(3), mesh=mesh)
        record["zero3"] = {"losses": [], "grad_norms": []}
        _train(engine, mesh, range(1, STEPS + 1), record["zero3"])
        zero3 = ds_twolevel.dense_state_dict(engine)
        if rank == 0:
            torch.save(zero3, work / "train_zero3.pt")
        engine, *_ = ds_twolevel.initialize(model=R.build_model(), config=config(), mesh=mesh)
        _train(engine, mesh, range(1, STEPS + 1), record)
        ds_twolevel.save_checkpoint(engine, work / "ckpt")
        weights = ds_twolevel.dense_state_dict(engine)
    else:
        engine, *_ = ds_twolevel.initialize(model=R.build_model(), config=config(), mesh=mesh)
        ds_twolevel.load_checkpoint(engine, work / "ckpt")
        resumed = ds_twolevel.dense_state_dict(engine)
        _train(engine, mesh, range(STEPS + 1, STEPS + 2), record)
        weights = ds_twolevel.dense_state_dict(engine)
        if rank == 0:
            torch.save(resumed, work / "resumed.pt")
    if rank == 0:
        torch.save(weights, work / f"{phase}.pt")
    (work / f"{phase}.rank{rank}.json").write_text(json.dumps(record))
    if phase == "train":  # wait, in collectives, for the test to kill the second node's agent
        total = torch.ones(1)
        with ds_twolevel.fail_fast(TIMEOUT_S, what="the multi-node loop"):
            for _ in range(3000):
                dist.all_reduce(total)
                time.sleep(0.2)
        return
    # leave together and tear the process group down before the interpreter does (a gloo group destroyed
    # by interpreter exit while a peer is still leaving can abort the process)
    dist.barrier()
    dist.destroy_process_group()


# -- test side ---------------------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(args: list[str], phase: str, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, __file__, "--phase", phase, "--work", str(work)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _records(work: Path, phase: str, world: int) -> list[dict]:
    return [json.loads((work / f"{phase}.rank{r}.json").read_text()) for r in range(world)]


def _dense(steps: int) -> tuple[list[float], list[float], dict]:
    from tests.test_ecosystem import dense_run

    ref = dense_run([global_rows(s) for s in range(1, steps + 1)], weight_decay=0.01)
    return ref["losses"], ref["grad_norms"], ref["weights"]


def _max_rel(got: dict, ref: dict) -> float:
    from tests.test_ecosystem import weight_error

    return weight_error(got, ref)


def test_two_nodes_train_exactly_resume_on_one_and_a_lost_node_is_named(tmp_path):
    from ds_twolevel.testing import free_port

    port = free_port()
    node = ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"127.0.0.1:{port}", "--rdzv_id", f"twolevel{port}", "--max_restarts", "0"]
    first = _torchrun(node + ["--node_rank", "0", "--rdzv_conf", "is_host=1"], "train", tmp_path)
    second = _torchrun(node + ["--node_rank", "1", "--rdzv_conf", "is_host=0"], "train", tmp_path)
    deadline = time.time() + 900
    while not all((tmp_path / f"train.rank{r}.json").exists() for r in range(8)):
        if first.poll() is not None or second.poll() is not None or time.time() > deadline:
            for proc in (first, second):
                proc.kill()
            pytest.fail("training on 2 nodes did not finish:\n" + first.communicate()[0][-5000:] +
                        second.communicate()[0][-5000:])
        time.sleep(1)
    recs = _records(tmp_path, "train", 8)
    lost = sorted(r["rank"] for r in recs if r["agent"] == second.pid)
    lost_node = {r["node"] for r in recs if r["agent"] == second.pid}
    assert len(lost) == 4 and len(lost_node) == 1 and {r["dp"] for r in recs} == {2}, recs
    second.send_signal(signal.SIGKILL)
    killed_at = time.time()
    out_first = first.communicate(timeout=600)[0]
    out_second = second.communicate(timeout=120)[0]
    ended = time.time() - killed_at

    # the lost node: the first node's ranks name its ranks and its node; its own ranks saw the agent go
    # (the first rank of the first node to see it exits 17; its agent then stops the others, as torchrun does)
    named = [line for line in out_first.splitlines() if "a peer rank died or stopped responding during the "
             "multi-node loop" in line]
    assert named and first.returncode != 0, out_first[-5000:]
    for rank in lost:
        assert all(f"rank {rank} stopped responding (pid" in line for line in named), named
    assert all(f"on this host (node {next(iter(lost_node))}), exited)" in line for line in named), named
    assert "the launcher is gone" in out_second, out_second[-5000:]

    # exact against dense on 2 nodes
    losses, norms, weights = _dense(STEPS + 1)
    train = recs[0]
    err_loss = max(abs(a - b) / abs(b) for a, b in zip(train["losses"], losses[:STEPS]))
    err_norm = max(abs(a - b) / abs(b) for a, b in zip(train["grad_norms"], norms[:STEPS]))
    dense_after = _dense(STEPS)[2]
    err_w = _max_rel(torch.load(tmp_path / "train.pt"), dense_after)
    assert max(err_loss, err_norm, err_w) <= TOL, (err_loss, err_norm, err_w)
    z3 = train["zero3"]
    err_z3 = max(max(abs(a - b) / abs(b) for a, b in zip(z3["losses"], losses[:STEPS])),
                 max(abs(a - b) / abs(b) for a, b in zip(z3["grad_norms"], norms[:STEPS])),
                 _max_rel(torch.load(tmp_path / "train_zero3.pt"), dense_after))
    assert err_z3 <= TOL, err_z3

    # resume on 1 node x 4 ranks (dp 1): resharded, bit-equal weights, the next step exact
    resume = _torchrun(["--standalone", "--nproc_per_node", "4"], "resume", tmp_path)
    out_resume = resume.communicate(timeout=900)[0]
    assert resume.returncode == 0, out_resume[-6000:]
    trained, resumed = torch.load(tmp_path / "train.pt"), torch.load(tmp_path / "resumed.pt")
    assert trained.keys() == resumed.keys() and all(torch.equal(trained[k], resumed[k]) for k in trained)
    rec = _records(tmp_path, "resume", 4)[0]
    assert rec["dp"] == 1
    err_next = max(abs(rec["losses"][0] - losses[STEPS]) / abs(losses[STEPS]),
                   abs(rec["grad_norms"][0] - norms[STEPS]) / abs(norms[STEPS]),
                   _max_rel(torch.load(tmp_path / "resume.pt"), weights))
    assert err_next <= TOL, err_next
    print(f"\n2 nodes x 4 ranks, dp 2 x 2 x 2, ZeRO-2: loss {err_loss:.1e}, grad norm {err_norm:.1e}, weights "
          f"{err_w:.1e} vs dense; ZeRO-3: {err_z3:.1e} (largest); resumed on 1 node x 4 (dp 1): bit-equal, next "
          f"step {err_next:.1e}; node of ranks {lost} killed: first node's ranks exited {ended:.0f} s later\n"
          f"  {named[0]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    rank_main(args.phase, Path(args.work))
