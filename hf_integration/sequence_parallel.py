"""Sequence parallelism for a patched Hugging Face decoder: each rank of a layer's n*m ranks holds
s/(n*m) tokens between sublayers (DESIGN.md section 8).

:func:`enable` (``patch_model(..., sequence_parallel=True)`` calls it) makes the model's forward take
this rank's shard of every sequence, as :func:`hf_integration.sequence_data.shard_batch` cuts it:

- ``input_ids`` (b, s/p), ``position_ids`` (b, s/p) global positions (required), an optional 2-D
  ``attention_mask`` (b, s/p), ``labels``/``shift_labels`` shifted before the cut, and
  ``num_items_in_batch`` (the group's count of real label tokens).
- A pre-hook gathers the positions and the padding mask of the whole sequence (one all-gather of
  (b, s) integers, tag "positions"): Hugging Face computes RoPE's (cos, sin) for every position, and
  the attention layers apply the whole sequence's causal + padding mask (HF's own mask, built from
  local shapes, is replaced by a placeholder its mask functions return as is).
- Embedding, norms, residual adds and the LM head act on local tokens; the loss is this rank's share
  ``sum of its token losses / num_items_in_batch``; the shares add up to the loss of the whole batch,
  and each rank backpropagates its own (no gradient is scaled by the group size).
- Replicated parameters (embedding, norms, LM head, router) see this rank's tokens only: a gradient
  hook sums them over tp (:func:`~ds_twolevel.parallel.sequence.sum_replicated_grads`).
- A call with a KV cache (``generate``) runs with sequence parallelism off: every rank passes the
  whole prompt, as without it.

The same hook serves Ulysses outside the layer (a mesh with sp > 1, DeepSpeed's
``"sequence_parallel_size"``): the shards are then cut over the sp axis (the n*m ranks of a layer hold the
same s/sp tokens), positions stay local (RoPE is applied before the all-to-alls), the attention layers run
:func:`~ds_twolevel.layers.attention.ulysses_forward`, and no gradient hook is installed: DeepSpeed's engine
sums every gradient over sp (its sequence-data-parallel group, see ``ds_twolevel.parallel.layout.UlyssesMesh``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelMesh
from ds_twolevel.parallel.ulysses import check_ulysses
from ds_twolevel.parallel.sequence import gather_tokens_no_grad, sum_replicated_grads

from hf_integration.modules import HFTwoLevelAttention
from hf_integration.partitioned import PARTITIONED

CACHE_KWARGS = ("cache", "past_key_values")
FEEDERS = ("hf_integration.sequence_data.shard_batch / SequenceShardLoader cut it; through accelerate, "
           "ds_twolevel.accelerate.accelerator(cfg).prepare(model, optimizer, loader), and the Hugging Face "
           "Trainer, ds_twolevel.hf_trainer.TwoLevelTrainer, feed the shards")
"""the ways that give each rank its shard, named by the errors of a forward that got a whole batch."""
SHARDED_INPUTS = ("input_ids", "inputs_embeds", "labels", "shift_labels")
"""per-token inputs whose values differ between the ranks of a layer (shapes agree)."""


@dataclass
class SequenceParallelState:
    """``model._twolevel_sequence_parallel``: the mesh and whether the current call is sharded."""

    mesh: TwoLevelMesh
    ulysses: bool = False
    """the shards are cut over the sp axis (Ulysses), not over the layer's n*m ranks."""
    active: bool = False
    """the last forward ran sequence-parallel (read again by the gradient hooks in its backward)."""
    layers: list[nn.Module] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    paused: bool = False
    """inside :func:`whole_sequence`: every call runs the whole sequence on every rank."""

    @property
    def axis(self) -> AxisGroup:
        """The ranks that hold different tokens of one sequence: sp (Ulysses) or the layer's n*m."""
        return self.mesh.axes.sp if self.ulysses else self.mesh.axes.tp


def check_supported(model: nn.Module, arch: Any, spec: Any, left_dense: list[str], *, sp: int = 1,
                    n: int = 1, sequence_parallel: bool = True, kv_replication: bool = False) -> None:
    """ValueError naming what cannot run sequence-parallel (or Ulysses at ``sp`` > 1) exactly, before any
    module is touched."""
    name = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    if sp > 1 and sequence_parallel:
        raise ValueError(f"{name}: Ulysses (sequence_parallel_size={sp}) and \"two_level.sequence_parallel\" "
                         f"together are not supported; set \"two_level.sequence_parallel\": false (the n*m ranks of "
                         f"a layer then hold the same s/sp tokens)")
    if sp > 1:
        check_ulysses(name, heads=spec.num_heads, kv_heads=spec.num_kv_heads, n=n, sp=sp,
                      head_dim=spec.head_dim, v_head_dim=spec.dv, kv_replication=kv_replication)
    if not arch.causal or not spec.rot_dim:
        raise ValueError(f"{name}: sequence_parallel supports causal decoders with rotary positions (Llama, Qwen, "
                         f"Mistral, GPT-NeoX, ...); this model {'is an encoder' if not arch.causal else 'adds learned position embeddings'}; "
                         f"patch it with sequence_parallel=False")
    if left_dense:
        raise ValueError(f"{name}: sequence_parallel needs every attention layer partitioned; left dense: "
                         f"{', '.join(left_dense[:4])}; patch with strict=True")


def enable(model: nn.Module, mesh: TwoLevelMesh) -> SequenceParallelState:
    """Switch a patched model to sequence-parallel training and prefill (see the module docstring); over
    the sp axis when the mesh has sp > 1 (Ulysses).

    Example:
        >>> patch_model(model, mesh, sequence_parallel=True)   # calls enable(model, mesh)
        >>> out = model(**shard_batch(batch, mesh))             # this rank's tokens
    """
    state = SequenceParallelState(mesh, ulysses=mesh.layout.sp > 1)
    layers = [mod for mod in model.modules() if isinstance(mod, PARTITIONED)]
    state.layers = layers
    inside = {id(p) for layer in layers for p in layer.parameters()}
    replicated = [p for p in model.parameters()
                  if id(p) not in inside and not getattr(p, "tensor_model_parallel", False)]
    if not state.ulysses:  # under Ulysses DeepSpeed sums every gradient over sp
        state.handles = sum_replicated_grads(replicated, mesh.axes.tp, when=lambda: state.active)
    state.handles.append(model.register_forward_pre_hook(
        lambda module, args, kwargs: _pre_forward(state, module, args, kwargs), with_kwargs=True, prepend=True))
    model._twolevel_sequence_parallel = state
    return state


@contextlib.contextmanager
def whole_sequence(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model's forward takes the whole sequence on every rank, as without sequence parallelism
    (``load_partitioned``'s parity probe runs the same probe ids on every rank); a model without the switch
    is left as it is.

    Example:
        >>> with whole_sequence(model):
        ...     logits = model(input_ids=ids).logits   # ids: the whole sequence, the same on every rank
    """
    state = getattr(model, "_twolevel_sequence_parallel", None)
    if state is None:
        yield model
        return
    state.paused = True
    try:
        yield model
    finally:
        state.paused = False


def sequence_parallel_state(model: Any) -> SequenceParallelState | None:
    """The state of a model patched with ``sequence_parallel=True``, or of the model a wrapper holds
    (a DeepSpeed engine's or DDP's ``module``); None when it has none.

    Example:
        >>> sequence_parallel_state(engine).mesh      # the mesh patch_model was given
    """
    while model is not None:
        state = getattr(model, "_twolevel_sequence_parallel", None)
        if state is not None:
            return state
        model = getattr(model, "module", None)
    return None


def _set_active(state: SequenceParallelState, active: bool, mask: torch.Tensor | None = None) -> None:
    state.active = active
    for layer in state.layers:
        if not state.ulysses:
            layer.sequence_parallel = active
        elif isinstance(layer, TwoLevelAttention):
            layer.ulysses = active
        if isinstance(layer, HFTwoLevelAttention):
            layer.sequence_mask = mask if active else None


def _pre_forward(state: SequenceParallelState, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Decide whether this call is sharded; gather the whole sequence's positions and mask."""
    tp = state.axis
    if state.paused or tp.size == 1 or any(kwargs.get(k) is not None for k in CACHE_KWARGS):
        _set_active(state, False)  # generation: the whole prompt on every rank
        return args, kwargs
    kwargs = dict(kwargs)
    if args:  # input_ids given by position
        kwargs["input_ids"], args = args[0], args[1:]
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    _check_call(model, kwargs, tokens, positions, mask, tp.size)
    batch = _agree_on_batch(model, kwargs, tokens, mask, tp)  # (p, BATCH_FIELDS): before any shaped collective
    local = positions.expand(tokens.shape[0], -1).long()  # (b, s/p)
    stacked = local.unsqueeze(0) if mask is None else torch.stack([local, mask.long()])  # (1|2, b, s/p)
    whole = gather_tokens_no_grad(stacked, tp, "positions", dim=2)  # (1|2, b, s)
    chunks = whole[0].chunk(tp.size, dim=1)
    if all(torch.equal(c, chunks[0]) for c in chunks[1:]):
        raise ValueError(f"{type(model).__name__}: sequence_parallel: every rank of the {'sp group' if state.ulysses else 'layer'} "
                         f"passed the same position_ids {tuple(local.shape)}; pass each rank its shard of the sequence "
                         f"({FEEDERS}), or a KV cache to run the whole sequence")
    full_mask = None if mask is None or bool(whole[1].all()) else whole[1].bool()  # (b, s)
    _set_active(state, True, full_mask)
    if not state.ulysses:  # Ulysses rotates q/k on the local tokens, before its all-to-alls
        kwargs["position_ids"] = whole[0]
    # HF's mask functions return a 4-D mask as is; the partitioned layers apply ``full_mask`` instead
    kwargs["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=tokens.device)
    kwargs["use_cache"] = False
    if kwargs.get("labels") is not None and kwargs.get("num_items_in_batch") is None:
        kwargs["num_items_in_batch"] = batch[:, LABEL_COUNT].sum().to(torch.float32)  # the whole batch's labels
    return args, kwargs


def _check_call(model: nn.Module, kwargs: dict, tokens: Any, positions: Any, mask: Any, p: int) -> None:
    """ValueError (same on every rank of a well-formed call) before any collective."""
    name = type(model).__name__
    if tokens is None:
        raise ValueError(f"{name}: pass input_ids or inputs_embeds")
    if positions is None:
        raise ValueError(f"{name}: sequence_parallel: pass position_ids, the global positions of this rank's "
                         f"{tokens.shape[1]} tokens ({FEEDERS}), or a KV cache to run the whole sequence on every rank")
    if positions.shape[-1] != tokens.shape[1]:
        raise ValueError(f"{name}: sequence_parallel: position_ids cover {positions.shape[-1]} tokens, the input "
                         f"{tokens.shape[1]}; both are this rank's shard")
    if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(tokens.shape[:2])):
        raise ValueError(f"{name}: sequence_parallel takes a 2-D padding mask of this rank's tokens "
                         f"{tuple(tokens.shape[:2])}, got {tuple(mask.shape)}; the whole sequence's causal mask is "
                         f"built from it")
    if kwargs.get("labels") is not None and kwargs.get("shift_labels") is None:
        raise ValueError(f"{name}: sequence_parallel: labels must be shifted before the sequence is cut (a shard's "
                         f"last token predicts the next shard's first); pass shift_labels "
                         f"(hf_integration.sequence_data.shard_batch gives them)")


BATCH_FIELDS = ("batch size", "tokens per rank", "padding mask", "hidden size of inputs_embeds", "labels",
                "num_items_in_batch", "label tokens")
"""what each rank of a layer says about its shard before the first collective whose shape depends on it."""
LABEL_COUNT = BATCH_FIELDS.index("label tokens")


def _batch_row(kwargs: dict, tokens: torch.Tensor, mask: Any, ignore_index: int = -100) -> torch.Tensor:
    """(1, BATCH_FIELDS) int64 on the tokens' device: this rank's shard described (-1: not given). No host
    read: the label count and ``num_items_in_batch`` stay on the device."""
    device = tokens.device
    shape = [tokens.shape[0], tokens.shape[1], int(mask is not None), tokens.shape[2] if tokens.dim() == 3 else 0,
             int(kwargs.get("labels") is not None)]
    items = kwargs.get("num_items_in_batch")
    items = torch.as_tensor(-1 if items is None else items, device=device).to(torch.int64).reshape(1)
    labels = kwargs.get("shift_labels")
    count = (labels != ignore_index).sum().reshape(1) if labels is not None else torch.zeros(1, device=device)
    row = torch.cat([torch.tensor(shape, dtype=torch.int64, device=device), items, count.to(torch.int64)])
    return row.unsqueeze(0)  # (1, fields)


def _agree_on_batch(model: nn.Module, kwargs: dict, tokens: torch.Tensor, mask: Any, tp: Any) -> torch.Tensor:
    """The ranks' shard descriptions (p, BATCH_FIELDS), one all-gather of a fixed size (tag "batch"): the
    ranks of a layer hold different tokens of ONE batch, so batch size, shard length, mask, labels and
    num_items_in_batch must agree; ValueError on every rank of the layer naming each rank's numbers."""
    table = gather_tokens_no_grad(_batch_row(kwargs, tokens, mask), tp, "batch", dim=0)  # (p, fields)
    agreed = table[:, :LABEL_COUNT]
    if bool((agreed == agreed[0]).all()):
        return table
    differ = [i for i in range(LABEL_COUNT) if bool((agreed[:, i] != agreed[0, i]).any())]
    ranks = "; ".join(f"tp rank {r}: " + ", ".join(f"{BATCH_FIELDS[i]} {_shown(int(agreed[r, i]))}" for i in differ)
                      for r in range(agreed.shape[0]))
    raise ValueError(f"{type(model).__name__}: sequence_parallel: the ranks of a layer were given shards of different "
                     f"batches ({ranks}); every rank of a layer must get its shard of the same whole batch: give the "
                     f"{agreed.shape[0]} ranks the same batch and cut it with hf_integration.sequence_data.shard_batch "
                     f"(the whole sequence is {agreed.shape[0]} x the tokens per rank)")


def _shown(value: int) -> str:
    return "none" if value == -1 else str(value)
