"""End to end through the real launchers: torchrun, deepspeed, and accelerate's notebook_launcher
(the notebook is executed with nbclient; any failing cell fails the test)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from ds_twolevel.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "recipes" / "notebooks" / "two_level_accelerate.ipynb"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_generate_recipe_under_torchrun():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                str(free_port()), "recipes/generate.py", "--groups", "2", "--segments", "2", "--arch", "qwen2"])
    assert "partitioned Qwen2Attention x2, Qwen2MLP x2" in out
    assert "identical to the unpatched model: True" in out


def test_generate_recipe_under_deepspeed_launcher():
    launcher = Path(sys.executable).with_name("deepspeed")
    out = _run([str(launcher), "--num_gpus", "4", "--master_port", str(free_port()), "recipes/generate.py",
                "--groups", "1", "--segments", "4", "--arch", "gpt_neox"])  # passes --local_rank=N
    assert "dp=1 x n=1 x m=4" in out and "identical to the unpatched model: True" in out


def test_accelerate_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    old = dict(os.environ)
    os.environ.update(_env())  # the kernel (and the processes it forks) inherit this environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "MULTI_CPU with 4 processes" in text
    assert "greedy generation (16 new tokens, KV cache partitioned per rank): identical" in text
    assert "Launching training on 4 CPU processes (gloo)." in text and "CUDAs" not in text
    assert "DistributedType.DEEPSPEED, ZeRO-2, dp=1 x n=2 x m=2" in text
    assert "training through Accelerator + DeepSpeedPlugin matches the dense run" in text
