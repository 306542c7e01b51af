"""Two jobs started on one master port: the second is refused in one line on each of its ranks before
it joins anything, and the first trains on unharmed.

Job A is a two-node job on this machine: ``deepspeed.launcher.launch`` (what the ``deepspeed`` runner
starts on each node over ssh) run by hand once per node, one rank each, with ``DS_TWOLEVEL_JOB_ID`` set
on both nodes. It builds its mesh and holds the port. Job B (the ``deepspeed`` runner, 2 ranks on one
node) starts on the same port: its rank 0 cannot bind the port ("port P is in use by another job; pass
--master_port"), its rank 1 reaches A's store and finds A's job token there instead of its own. Then A
all-reduces over its 2 ranks: the sum is its own, nothing of B mixed in.

This file is also the rank script (``--role hold|join``).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
          "two_level": {"n": 1, "m": 2, "timeout_s": 120}}


def rank_main(role: str, work: Path) -> None:
    import torch
    import torch.distributed as dist

    import ds_twolevel
    from ds_twolevel.deepspeed.rendezvous import RendezvousError
    from ds_twolevel.parallel.watchdog import node_rank

    rank = int(os.environ["RANK"])
    try:
        ds_twolevel.build_mesh(CONFIG)
    except RendezvousError as err:
        print(f"REFUSED {err}", flush=True)
        return
    if role == "join":
        print("JOINED", flush=True)
        return
    (work / f"ready{rank}").write_text("1")
    deadline = time.time() + 600
    while not (work / "release").exists() and time.time() < deadline:
        time.sleep(0.2)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    print(f"SUM {float(total):g} WORLD {dist.get_world_size()} NODE {node_rank()}", flush=True)


def _env(job_id: str | None) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    env.pop("DS_TWOLEVEL_JOB_ID", None)
    return env if job_id is None else {**env, "DS_TWOLEVEL_JOB_ID": job_id}


def _node(port: int, node: int, work: Path) -> subprocess.Popen:
    """One node of job A: DeepSpeed's per-node launcher, as its runner would start it over ssh."""
    hosts = base64.urlsafe_b64encode(json.dumps({"localhost": [0], "127.0.0.1": [0]}).encode()).decode()
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={hosts}", f"--node_rank={node}",
           "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--role", "hold", "--work", str(work)]
    return subprocess.Popen(cmd, env=_env("job-a"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)


def _runner(port: int, work: Path) -> subprocess.Popen:
    """Job B: the ``deepspeed`` runner, 2 ranks on this node, no job id."""
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
           __file__, "--role", "join", "--work", str(work)]
    return subprocess.Popen(cmd, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def test_two_jobs_on_one_port(tmp_path):
    from ds_twolevel.testing import free_port

    port = free_port()
    nodes = [_node(port, k, tmp_path) for k in (0, 1)]
    deadline = time.time() + 600
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        if any(p.poll() is not None for p in nodes) or time.time() > deadline:
            for p in nodes:
                p.kill()
            pytest.fail("job A did not start:\n" + "\n".join(p.communicate()[0][-3000:] for p in nodes))
        time.sleep(0.5)
    try:
        joiner = _runner(port, tmp_path)
        out_b = joiner.communicate(timeout=600)[0]
    finally:
        (tmp_path / "release").write_text("1")
    out_a = [p.communicate(timeout=600)[0] for p in nodes]
    for node, (proc, out) in enumerate(zip(nodes, out_a)):
        assert proc.returncode == 0 and f"SUM 3 WORLD 2 NODE {node}" in out, out[-4000:]
    refused = [line for line in out_b.splitlines() if "REFUSED" in line]
    assert len(refused) == 2 and "JOINED" not in out_b, out_b[-4000:]
    busy = f"port {port} is in use by another job; pass --master_port"
    assert any(f"REFUSED rank 0: {busy}" in line for line in refused), refused
    assert any(f"REFUSED rank 1: {busy}" in line and "belongs to a job of 2 ranks whose rank 0 runs under id job-a, "
               "this rank (of 2) under launcher pid" in line for line in refused), refused
    assert "Traceback" not in out_b and "EADDRINUSE" not in out_b, out_b[-4000:]
    print("\n" + "\n".join(refused))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--role", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    rank_main(args.role, Path(args.work))
