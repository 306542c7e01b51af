"""A first ArchSpec drafted from what a Hugging Face config already states: its ``base_model_tp_plan``.

transformers' tensor-parallel plan names, per decoder layer, the column-parallel projections (q, k,
v or a fused qkv; gate, up or a packed gate_up; an experts block's packed gate_up), the row-parallel
ones (o, down) and the per-head norms whose gradients are all-reduced (Qwen3's q_norm / k_norm)::

    "layers.*.self_attn.q_proj": "colwise"            -> AttentionLayout.q
    "layers.*.self_attn.qkv_proj": "colwise..."       -> AttentionLayout.fused (fused_layout "concat")
    "layers.*.self_attn.o_proj": "rowwise"            -> AttentionLayout.o
    "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce" -> q_norm (scope "head")
    "layers.*.mlp.gate_up_proj": "colwise..."         -> MLPLayout.gate_up
    "layers.*.mlp.experts": "moe_tp_experts"          -> MoELayout (+ the plan's dense gate/up/down: dense_mlp)

What a plan cannot say stays the caller's: the RoPE pairing and table (``rope_style``), what a q/k norm
computes (``norm_style``), settings to refuse (``unsupported``). The module classes, the forward
signature, biases and the attributes holding the scale and sliding window are read from the model's
first layer. :func:`draft_spec` only drafts: ``patch_model``'s shape checks and parity probe decide
whether the draft describes the model (a wrong ``rope_style`` is a ``ProbeError`` naming the layer).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import nn

from hf_integration.specs import ArchSpec, AttentionLayout, MLPLayout, MoELayout, QKNormStyle

COLUMN = ("colwise", "colwise_gather_output", "packed_colwise", "local_colwise")
"""plan styles of a column-parallel (output features split) projection."""
ROW = ("rowwise", "rowwise_split_input", "local_rowwise")
"""plan styles of a row-parallel (input features split) projection."""
ACTIVATIONS = ("act_fn", "activation_fn", "act")
"""attribute names an MLP's activation goes by in transformers."""


def layer_entries(plan: dict[str, str]) -> dict[str, dict[str, str]]:
    """Per-layer plan entries grouped by block: {"self_attn": {"q_proj": "colwise", ...}, "mlp": {...},
    "mlp.experts": {...}} (the block of a leaf is everything between ``layers.*.`` and the leaf)."""
    blocks: dict[str, dict[str, str]] = {}
    for key, style in plan.items():
        if not key.startswith("layers.*."):
            continue  # embeddings, lm_head: outside the partitioned layers
        block, _, leaf = key[len("layers.*."):].rpartition(".")
        blocks.setdefault(block, {})[leaf] = style
    return blocks


def _first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the first decoder layer (the module at ``*.layers.0``)."""
    for path, module in model.named_modules():
        if path.endswith("layers.0"):
            return path, module
    raise ValueError(f"{type(model).__name__}: no '*.layers.0' module; write the ArchSpec by hand")


def _signature(attention: nn.Module) -> tuple[str, ...]:
    """Positional parameters of the attention forward after ``hidden_states`` (no *args / **kwargs)."""
    params = list(inspect.signature(type(attention).forward).parameters.values())[2:]  # self, hidden_states
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _attention(block: nn.Module, entries: dict[str, str], norm_style: QKNormStyle) -> AttentionLayout:
    """The AttentionLayout of one attention block from its plan entries."""
    cols = [leaf for leaf, style in entries.items() if style in COLUMN]
    rows = [leaf for leaf, style in entries.items() if style in ROW]
    norms = [leaf for leaf, style in entries.items() if style == "replicated_with_grad_allreduce"]
    if len(rows) != 1 or len(cols) not in (1, 3):
        raise ValueError(f"{type(block).__name__}: the tp plan names column-parallel {cols} and row-parallel {rows}; "
                         f"expected q/k/v (or one fused qkv) and one output projection; write the AttentionLayout")
    qkv: dict[str, Any] = dict(q=None, k=None, v=None, fused=cols[0]) if len(cols) == 1 else dict(zip("qkv", cols))
    q_norm = next((n for n in norms if n.startswith("q")), None)
    k_norm = next((n for n in norms if n.startswith("k")), None)
    window = "sliding_window" if hasattr(block, "sliding_window") else None
    return AttentionLayout(owner=type(block).__name__, o=rows[0], q_norm=q_norm, k_norm=k_norm, norm_style=norm_style,
                           sliding_window=window, signature=_signature(block), **qkv)


def _mlp(block: nn.Module, entries: dict[str, str]) -> MLPLayout:
    """The MLPLayout of one dense MLP block from its plan entries (activation read from the module)."""
    cols = [leaf for leaf, style in entries.items() if style in COLUMN]
    rows = [leaf for leaf, style in entries.items() if style in ROW]
    act = next((name for name in ACTIVATIONS if hasattr(block, name)), None)
    if len(rows) != 1 or len(cols) not in (1, 2) or act is None:
        raise ValueError(f"{type(block).__name__}: the tp plan names column-parallel {cols} and row-parallel {rows}, "
                         f"activation attribute {act}; write the MLPLayout")
    if len(cols) == 2:
        gate, up = sorted(cols, key=lambda leaf: "gate" not in leaf)  # the gate first
        return MLPLayout(owner=type(block).__name__, gate=gate, up=up, down=rows[0], act=act)
    packed = "gate" in cols[0]  # GLM4 / Phi3 gate_up_proj
    return MLPLayout(owner=type(block).__name__, up=None if packed else cols[0], gate_up=cols[0] if packed else None,
                     down=rows[0], act=act)


def _moe(model: nn.Module, block: nn.Module, blocks: dict[str, dict[str, str]]) -> tuple[MoELayout, MLPLayout | None]:
    """The MoELayout of a fused-experts block and, when the plan also names a dense MLP under the same
    path (``mlp_only_layers``), that MLP's layout from the first such module."""
    config = model.config
    num = next(a for a in ("num_local_experts", "num_experts") if getattr(config, a, None) is not None)
    inter = "moe_intermediate_size" if getattr(config, "moe_intermediate_size", None) else "intermediate_size"
    moe = MoELayout(owner=type(block).__name__, num_experts_attr=num, intermediate_attr=inter)
    dense_entries = {leaf: style for leaf, style in blocks.get("mlp", {}).items()}
    dense = next((m for p, m in model.named_modules() if p.endswith(".mlp") and type(m) is not type(block)), None)
    if not dense_entries or dense is None:
        return moe, None
    return moe, dataclasses.replace(_mlp(dense, dense_entries), width="intermediate_size")


def draft_spec(model: nn.Module, *, rope_style: str = "half", norm_style: QKNormStyle = QKNormStyle(),
               **fields: Any) -> ArchSpec:
    """An ArchSpec for ``model`` drafted from ``model.config.base_model_tp_plan`` and its first layer.

    ``rope_style`` and ``norm_style`` are what a plan cannot say; ``fields`` are further ArchSpec fields
    (``unsupported``, ``notes``, ...). Biases are read from the first layer's modules.

    Example:
        >>> SPECS["glm4"] = draft_spec(model, rope_style="interleaved_half")
        >>> patch_model(model, mesh)   # shape checks and the parity probe judge the draft
    """
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    blocks = layer_entries(plan)
    attn_key = next((b for b in blocks if "attn" in b or "attention" in b), None)
    if attn_key is None:
        raise ValueError(f"{type(model).__name__}: config.base_model_tp_plan names no attention projections "
                         f"({sorted(plan)[:6]}); write the ArchSpec by hand (see docs/adding_an_architecture.md)")
    layer_path, layer = _first_layer(model)
    attn_block = layer.get_submodule(attn_key)
    attention = _attention(attn_block, blocks[attn_key], norm_style)
    dense_mlp = None
    if any(style == "moe_tp_experts" for style in blocks.get("mlp", {}).values()) or "mlp.experts" in blocks:
        mlp_block = next(m for p, m in model.named_modules() if p.endswith(".mlp") and hasattr(m, "experts"))
        mlp, dense_mlp = _moe(model, mlp_block, blocks)
    else:
        mlp_block = layer.get_submodule("mlp")
        mlp = _mlp(mlp_block, blocks["mlp"])
    first_qkv = attention.fused or attention.q
    mlp_bias = False if isinstance(mlp, MoELayout) else mlp_block.get_submodule(mlp.gate_up or mlp.up).bias is not None
    return ArchSpec(
        model.config.model_type, attention, mlp, rope_style=rope_style, dense_mlp=dense_mlp,
        qkv_bias=attn_block.get_submodule(first_qkv).bias is not None,
        o_bias=attn_block.get_submodule(attention.o).bias is not None, mlp_bias=mlp_bias,
        **{"notes": f"drafted from base_model_tp_plan ({layer_path})", **fields},
    )


__all__ = ["draft_spec", "layer_entries"]
