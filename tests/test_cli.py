"""The main job as a user runs it: the console script spawns its own ranks."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)


def test_console_script_demo_default_layout():
    exe = shutil.which("ds-twolevel")
    assert exe, "ds-twolevel console script not installed (run: bash install.sh)"
    proc = _run(exe, "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dp=1 x n=2 x m=2" in out
    rows = re.findall(r"^\s+(\d) \((\d), (\d), (\d)\)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)/(\d+)", out, re.M)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    for row in rows:
        assert max(float(e) for e in row[4:7]) <= 1e-5
    assert "all_gather/m/q" in out or "/m/scores" in out
    assert out.strip().endswith("(OK)")


@pytest.mark.parametrize("flags", [["--m", "4", "--n", "1", "--dp", "2", "--strategy", "score_allreduce",
                                    "--qk-norm", "--kv-heads", "2"]])
def test_module_demo_with_flags(flags):
    proc = _run(sys.executable, "-m", "ds_twolevel", "demo", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # s = 16 causal prefill at m = 4: 8 causal blocks, reduce-scatter of scores; at d = 16 gathering V
    # and all-to-all'ing the output rows sends fewer bytes than gathering the probabilities
    assert "dp=2 x n=1 x m=4" in proc.stdout and "reduce_scatter/m/scores" in proc.stdout
    assert "all_gather/m/v" in proc.stdout and "all_to_all/m/attn_rows" in proc.stdout
    assert "all_gather/m/probs" not in proc.stdout
    assert "all_reduce/m/q_sumsq" in proc.stdout


def test_demo_refuses_bad_layout_with_the_fix():
    proc = _run(sys.executable, "-m", "ds_twolevel", "demo", "--n", "3")
    assert proc.returncode == 2
    assert "num_heads (8) is not divisible by n=3" in proc.stderr and "n=2 x m=3" not in proc.stderr
    assert "nearest that fit: 4 devices: n=4 x m=1, n=2 x m=2, n=1 x m=4; 8 devices: n=4 x m=2" in proc.stderr
