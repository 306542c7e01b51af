"""From an architecture without a spec to an exact patch, on a tiny seeded GLM4 (one process, n = m = 1).

    python recipes/glm4_spec_walkthrough.py

Step 1: ``patch_model`` refuses the architecture (strict). Step 2: a spec drafted from the config's
``base_model_tp_plan`` with the default RoPE is refused by the parity probe, naming the layer. Step 3:
the RoPE style the plan cannot state (GLM4 rotates pairs (2t, 2t+1) with a half-layout cos/sin table:
``"interleaved_half"``) makes the probe accept it, and the patched logits match the dense model's.
"""
from __future__ import annotations

import copy

import torch

from ds_twolevel import TwoLevelLayout
from hf_integration import SPECS, draft_spec, patch_model
from hf_integration.testing import rel_err, sample_batch, tiny_model


def try_patch(model: torch.nn.Module) -> str:
    """patch_model on a copy (n = m = 1, parity probe on): "patched", or the refusal (its key part)."""
    try:
        patch_model(copy.deepcopy(model), TwoLevelLayout(n=1, m=1).build())
        return "patched"
    except ValueError as err:
        text = str(err)
        key = text.split("input: ")[1].split(". The ArchSpec")[0] if "input: " in text else text[:110] + "..."
        return f"{type(err).__name__}: {key}"


def main() -> None:
    model = tiny_model("glm4")  # Glm4ForCausalLM, 2 layers, hidden 64, partial rotary 0.5
    known = SPECS.pop("glm4")  # pretend GLM4 is a new architecture
    try:
        print("1. no spec:         ", try_patch(model))
        SPECS["glm4"] = draft_spec(model)  # rope_style="half": what most models use
        print("2. draft, half RoPE:", try_patch(model))
        SPECS["glm4"] = draft_spec(model, rope_style="interleaved_half")
        print("3. interleaved_half:", try_patch(model))
        draft = SPECS["glm4"]
        print("   draft == shipped spec: MLP layout", draft.mlp == known.mlp, "| q/k/v/o paths",
              [getattr(draft.attention, f) for f in "qkvo"] == [getattr(known.attention, f) for f in "qkvo"])
        patched = copy.deepcopy(model)
        patch_model(patched, TwoLevelLayout(n=1, m=1).build())
        ids, mask = sample_batch(1)
        with torch.no_grad():
            err = rel_err(patched(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
        print(f"   logits relative error vs dense: {err:.1e}")
    finally:
        SPECS["glm4"] = known


if __name__ == "__main__":
    main()
