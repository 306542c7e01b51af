"""End to end through accelerate's notebook_launcher: the notebook is executed with nbclient; any
failing cell fails the test. (``recipes/generate.py`` under torchrun and the ``deepspeed`` launcher
runs as the README's Recipes commands, in tests/test_readme.py, with its tokens checked there.)"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.test_readme import NOISE

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "recipes" / "notebooks" / "two_level_accelerate.ipynb"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


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
    noise = [n for n in NOISE if n in text]
    assert not noise, (noise, text[-4000:])  # the README's rule, on every cell's stdout and stderr
    assert "MULTI_CPU with 4 processes" in text
    assert "greedy generation (16 new tokens, KV cache partitioned per rank): identical" in text
    assert "Launching training on 4 CPU processes (gloo)." in text and "CUDAs" not in text
    assert "DistributedType.DEEPSPEED, ZeRO-2, dp=1 x n=2 x m=2" in text
    assert "training through Accelerator + DeepSpeedPlugin matches the dense run" in text
