"""What the guard's input check costs per forward: bytes, and CPU time against a tiny training step.

Four gloo ranks (dp x n x m = 2 x 1 x 2 and 1 x 2 x 2), a tiny Qwen3 (2 layers, hidden 32, batch 2 x 12),
patched; torch AdamW steps (forward, backward, step) with ``check_inputs="always"`` (the default) and
with ``"never"``, in alternating blocks. For each setting: the mean process CPU time of a step on rank 0,
the CPU time spent inside the guard's forward pre-hook (with ``"never"`` it still looks for new wrappers
on the call stack; the difference is the input check), and the bytes of its all-gather (counted from the
gathered table). Printed as one table; docs/guard.md quotes it.

    python recipes/measure_guard.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 40
"""measured steps per setting (after 3 warm-up steps), in blocks of 5 alternating with the other setting."""


def _rank(n: int, m: int) -> dict:
    import torch.distributed as dist
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ds_twolevel import TwoLevelLayout, guard
    from hf_integration import patch_model

    mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=n, m=m).build()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         tie_word_embeddings=False, attn_implementation="sdpa"))
    patch_model(model, mesh)
    model.train()
    state = model._twolevel_guard
    hook_cpu = [0.0]
    inner = state.pre_forward

    def timed(*args, **kwargs):
        t0 = time.process_time()
        inner(*args, **kwargs)
        hook_cpu[0] += time.process_time() - t0

    state.handle.remove()
    state.handle = model.register_forward_pre_hook(timed, with_kwargs=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(mesh.axes.dp.rank))
    totals = {"always": [0.0, 0.0, 0], "never": [0.0, 0.0, 0]}

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    for block in range(2 * STEPS // 5):
        setting = "always" if block % 2 == 0 else "never"
        guard.configure(model, check_inputs=setting)
        dist.barrier()
        for _ in range(5):
            hook_cpu[0] = 0.0
            t0 = time.process_time()
            step()
            totals[setting][0] += time.process_time() - t0
            totals[setting][1] += hook_cpu[0]
            totals[setting][2] += 1
    from ds_twolevel.sharding.fingerprint import LANES

    row_bytes = (4 + LANES) * 8  # the guard's plan lanes and input digest lanes, int64
    return {k: (v[0] / v[2], v[1] / v[2]) for k, v in totals.items()} | {"row_bytes": row_bytes,
                                                                         "world": dist.get_world_size()}


def main() -> None:
    from ds_twolevel.testing import run_distributed

    print("| layout (dp x n x m) | step CPU ms, always | step CPU ms, never | hook CPU ms, always | hook CPU ms, "
          "never | input check / step | bytes sent per rank per forward | gathered table bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for n, m in ((1, 2), (2, 2)):
        out = run_distributed(_rank, 4, n, m, timeout=900)[0]
        (always, hook), (never, hook_never) = out["always"], out["never"]
        dp = 4 // (n * m)
        print(f"| {dp} x {n} x {m} | {always * 1e3:.2f} | {never * 1e3:.2f} | {hook * 1e3:.3f} | "
              f"{hook_never * 1e3:.3f} | {(hook - hook_never) / always:.1%} | {out['row_bytes']} | "
              f"{out['row_bytes'] * out['world']} |")


if __name__ == "__main__":
    main()
