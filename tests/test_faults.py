"""Bad input is refused before any collective; a dead or stuck rank ends the job, never a hang."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.parallel.collectives import CommCounter, all_reduce_both
from ds_twolevel.parallel.layout import TwoLevelLayout
from ds_twolevel.layers.mlp import TwoLevelMLP
from ds_twolevel.sharding.partition import AttentionSpec
from ds_twolevel.testing import RankFailure, run_distributed


def _bad_configs_on_rank() -> list[str]:
    """Every rank tries invalid layers on a valid 2x2 mesh; all must raise without communicating."""
    mesh = TwoLevelLayout(n=2, m=2).build()
    bad = [
        lambda: TwoLevelAttention(16, AttentionSpec(3, 3, 8), mesh),  # 3 heads, n=2
        lambda: TwoLevelAttention(16, AttentionSpec(4, 1, 8), mesh),  # MQA, n=2, no replication choice
        lambda: TwoLevelAttention(16, AttentionSpec(4, 4, 2, rope_style="half"), mesh),  # 1 RoPE pair, m=2
        lambda: TwoLevelAttention(16, AttentionSpec(4, 4, 8), mesh, strategy="ring"),
        lambda: TwoLevelMLP(16, 6, mesh.axes.tp),  # 6 features on 4 ranks
    ]
    messages = []
    with CommCounter() as comm:
        for make in bad:
            try:
                make()
                messages.append("no error")
            except ValueError as err:
                messages.append(str(err))
    messages.append(f"collectives issued: {len(comm.records)}")
    messages.append(_agreement_on_rank())
    return messages


def _agreement_on_rank() -> str:
    """Only rank 2 fails a step; every rank must raise the same AgreementError naming it."""
    from ds_twolevel.parallel.agreement import AgreementError, agreement

    with agreement(what="a step that passes"):
        pass
    try:
        with agreement(what="reading shard.safetensors"):
            if dist.get_rank() == 2:
                raise ValueError("shard.safetensors: truncated tensor data")
    except AgreementError as err:
        return str(err)
    return "no error"


def test_bad_layers_raise_before_any_collective():
    results = run_distributed(_bad_configs_on_rank, 4)
    for msgs in results:
        assert msgs[-2] == "collectives issued: 0"
        assert msgs[-1] == ("reading shard.safetensors failed on rank 2: ValueError: shard.safetensors: "
                            "truncated tensor data")
        assert "num_heads (3) is not divisible by n=2" in msgs[0] and "n=1 x m=4" in msgs[0]
        assert "kv_replication=True" in msgs[1]
        assert "1 RoPE pairs" in msgs[2] and "n=4 x m=1" in msgs[2]
        assert "strategy must be one of" in msgs[3]
        assert "intermediate_size (6) is not divisible by 4" in msgs[4]


def _world_mismatch() -> str:
    try:
        TwoLevelLayout(n=2, m=2, dp=2).build()
    except ValueError as err:
        return str(err)
    return "no error"


def test_world_size_mismatch_is_refused_on_every_rank():
    for msg in run_distributed(_world_mismatch, 2):
        assert "needs 8 ranks but the world has 2" in msg and "dp=1 x n=1 x m=2" in msg


def _dies_mid_job() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    x = torch.ones(1)
    dist.all_reduce(x)  # rank 0 would wait here forever without the launcher noticing


def test_dead_rank_ends_the_job_with_a_message():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] died with exit codes \[3\]"):
        run_distributed(_dies_mid_job, 2, timeout=60)
    assert time.monotonic() - start < 60


def _stuck_peer() -> str:
    mesh = TwoLevelLayout(n=1, m=2).build(timeout=datetime.timedelta(seconds=3))
    if mesh.axes.j == 1:
        time.sleep(8)  # never joins the collective below in time
        return "slept"
    start = time.monotonic()
    try:
        all_reduce_both(torch.ones(4), mesh.axes.seg, "scores")
    except RuntimeError as err:
        return f"timed out after {time.monotonic() - start:.0f}s: {str(err).splitlines()[0][:80]}"
    return "no timeout"


def test_segment_group_times_out_instead_of_hanging():
    results = run_distributed(_stuck_peer, 2, timeout=60)
    assert results[0].startswith("timed out after"), results[0]
    assert float(results[0].split()[3].rstrip("s:")) < 8


def _job_rank(kind: str) -> None:
    """For run_jobs: rank 1 stops itself, rank 0 raises, or rank 1 hangs."""
    import signal

    rank = int(os.environ["RANK"])
    print(f"rank {rank} of {os.environ['WORLD_SIZE']} on port {os.environ['MASTER_PORT']}", flush=True)
    if kind == "stop" and rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    if kind == "raise" and rank == 0:
        raise ValueError("bad input on rank 0")
    if kind == "hang" and rank == 1:
        time.sleep(120)


def test_run_jobs_lets_every_rank_end_on_its_own():
    """The fault-matrix harness: a failing rank does not end its job; a stopped rank is killed once
    its peers ended (as launchers do); a rank still running at the deadline is reported as None."""
    from ds_twolevel.testing import run_jobs

    stop, fail, hang = run_jobs([(_job_rank, 2, ("stop",)), (_job_rank, 2, ("raise",)), (_job_rank, 2, ("hang",))],
                                timeout=8, preload=("torch",))
    assert (stop[0].returncode, stop[1].returncode, stop[1].stopped) == (0, -9, True)
    assert fail[0].returncode == 1 and "ValueError: bad input on rank 0" in fail[0].output
    assert fail[1].returncode == 0 and fail[1].output.startswith("rank 1 of 2 on port ")
    assert hang[0].returncode == 0 and hang[1].returncode is None and not hang[1].stopped


def test_watchdog_stops_cleanly_at_exit():
    """The heartbeat thread ends, and drops its store client, when asked (``start`` registers this
    with atexit): a daemon thread left inside a TCPStore call at interpreter exit aborted a finished
    job ("terminate called without an active exception", exit -6)."""
    import threading

    from ds_twolevel.parallel import watchdog

    dog = watchdog.Watchdog(0, 1, [], None, interval=0.05)
    dog.store = object()  # stands for the store client (never called: the host check says it is gone)
    dog._host_alive = lambda: True
    calls = []
    dog._store_op = lambda op: calls.append(op)  # the beat still runs, without a store
    dog.start()
    while not calls:
        threading.Event().wait(0.01)
    dog.stop()
    assert not dog.is_alive() and dog.store is None and dog.stopping.is_set()
