"""The recipes end to end on CPU: recipes/train.py under the ``deepspeed`` launcher (a small Llama,
ZeRO-3 under zero.Init, 2 x 1 x 2 ranks), its dense export through plain ``from_pretrained``, and
recipes/infer_deepspeed.py (``ds_twolevel.init_inference``) under ``torchrun``.
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
STEPS = 8
PROMPT = "We hold these truths"


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from ds_twolevel.testing import free_port

    out = tmp_path_factory.mktemp("recipe")
    proc, seconds = _run(["deepspeed", "--num_gpus", "4", "--master_port", str(free_port()), "recipes/train.py",
                          "--deepspeed_config", "ds_configs/zero3_init_n1_m2.json", "--steps", str(STEPS),
                          "--log_every", "4", "--save_every", "4", "--out", str(out), "--export"])
    print(f"\nrecipes/train.py, 4 ranks, {STEPS} steps: {seconds:.0f} s")
    return out


def test_train_recipe_logs_plots_and_checkpoints(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["layout"] == {"dp": 2, "n": 1, "m": 2} and metrics["zero_stage"] == 3
    losses = metrics["losses"]
    assert len(losses) == STEPS and all(0 < x < 10 for x in losses)
    assert losses[-1] < losses[0]  # it learns
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "ckpt" / "latest").read_text().strip() == f"global_step{STEPS}"
    assert not list((trained / "ckpt").glob("*.partial"))


def test_exported_dense_checkpoint_loads_with_from_pretrained_and_matches(trained):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(trained / "dense").eval()  # plain HF, no ds_twolevel
    probe = torch.load(trained / "probe.pt")  # logits of the trained, partitioned model
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    err = float((logits - probe["logits"]).abs().max() / probe["logits"].abs().max())
    assert err <= 1e-5, err


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
