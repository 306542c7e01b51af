"""The parity probe: every partitioned layer is compared with the dense Hugging Face module it
replaces, on a small input, before the model is handed back (``patch_model(..., probe=True)``).

A spec can describe a model wrongly in ways no shape check sees: a RoPE pairing, a norm's formula,
a score soft-cap the spec does not mention. The probe runs the HF modules as they are (their own
RoPE tables, masks, scaling, soft-cap, norms):

1. one dense forward of the whole model on ``PROBE_TOKENS`` seeded random token ids (b=1, the
   model's own dtype, eval mode, no grad, no cache); forward hooks record each layer's inputs and
   output. Local: no collective.
2. after the layers are replaced, each partitioned layer (collectives: every rank runs the same
   layers on the same recorded inputs) is run on its recorded inputs.
3. the relative errors (max |partitioned - dense| / max |dense|) are max-reduced over all ranks, so
   every rank takes the same decision; an error above the dtype's tolerance refuses the model on
   every rank with the layer name and the error (:class:`ProbeError`), after putting the dense
   modules back. An exception on any rank during 1 or 2 reaches every rank as an
   :class:`~ds_twolevel.parallel.agreement.AgreementError`.

``load_partitioned`` never holds a whole dense model: it probes every layer, one at a time, by gathering
its slices into a dense copy of the HF module (:func:`probe_loaded`). Every layer, because layers of
one class can differ in what the spec must describe (SmolLM3's NoPE layers, sliding and full layers,
dense MLPs among MoE blocks).

Cost: one dense forward of 8 tokens, plus one partitioned forward of every layer (``patch_model``)
or of the whole model, then every layer gathered and run dense on 8 tokens (``load_partitioned``: the
gathers move each partitioned weight once, as a dense ``save_pretrained`` does); memory: the recorded
(1, 8, H) inputs and outputs of every layer, and one gathered dense layer at a time.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from ds_twolevel.deepspeed.compat import tree_map
from ds_twolevel.parallel.agreement import agreement
from ds_twolevel.testing.ranks import rel_err

PROBE_TOKENS = 8
PROBE_SEED = 1234
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Largest relative error a correct partition shows on one layer, per dtype (reduction order and
rounding of the partial sums differ from the dense module's; measured errors are ~100x smaller)."""
DEFAULT_TOLERANCE = 5e-2


class ProbeError(ValueError):
    """The partitioned model computes something else than the dense one: raised on every rank."""


@dataclass
class LayerIO:
    """One module call recorded by the probe's dense forward."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


def tolerance(dtype: torch.dtype) -> float:
    """Relative error above which the probe refuses a layer of this dtype."""
    return TOLERANCES.get(dtype, DEFAULT_TOLERANCE)


def _first_tensor(output: Any) -> torch.Tensor:
    """The module's main output: the tensor itself, or the first element of a tuple (attention)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def probe_input_ids(model: nn.Module) -> torch.Tensor:
    """(1, PROBE_TOKENS) token ids, the same on every rank (own generator: the global RNG is untouched)."""
    embeddings = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(0, embeddings.num_embeddings, (1, PROBE_TOKENS), generator=gen)
    return ids.to(embeddings.weight.device)


def _run(model: nn.Module) -> None:
    """One no-grad forward on the probe ids, without a KV cache."""
    kwargs: dict[str, Any] = {"input_ids": probe_input_ids(model)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        model(**kwargs)


def record_calls(model: nn.Module, paths: list[str]) -> dict[str, LayerIO]:
    """Run ``model`` once on the probe ids; the first call of every module at ``paths`` (its inputs
    and main output, cloned). The model runs in eval mode; training flags are restored after."""
    records: dict[str, LayerIO] = {}

    def hook(path: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if path not in records:
                records[path] = LayerIO(_clone(args), _clone(kwargs), _first_tensor(output).detach().clone())
        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with evaluating(model):
            _run(model)
    finally:
        for h in handles:
            h.remove()
    return records


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside; every module's own training flag restored after (a module
    created inside takes the flag of its closest recorded ancestor)."""
    flags = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield model
    finally:
        for name, module in model.named_modules():
            module.training = flags.get(name, _ancestor_flag(flags, name))


def _ancestor_flag(flags: dict[str, bool], name: str) -> bool:
    while name:
        name = name.rpartition(".")[0]
        if name in flags:
            return flags[name]
    return flags.get("", False)


def layer_errors(model: nn.Module, records: dict[str, LayerIO]) -> list[float]:
    """Relative error of each recorded module's current output (partitioned) vs its recorded one."""
    errors = []
    with evaluating(model), torch.no_grad():
        for path, io in records.items():
            out = _first_tensor(model.get_submodule(path)(*io.args, **io.kwargs))
            errors.append(rel_err(out, io.output))
    return errors


def agreed(errors: list[float], device: torch.device) -> list[float]:
    """The worst error of each layer over all ranks (one all-reduce), so every rank decides alike."""
    values = torch.tensor(errors, dtype=torch.float64).nan_to_num(nan=float("inf"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and values.numel():
        backend_device = torch.device("cpu") if dist.get_backend() in ("gloo", "mpi") else device
        values = values.to(backend_device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.cpu().tolist()


def refusal(name: str, records: dict[str, LayerIO], errors: list[float], kinds: dict[str, str]) -> str | None:
    """The one-line refusal of every layer above its tolerance, None when all agree."""
    bad = []
    for (path, io), err in zip(records.items(), errors):
        tol = tolerance(io.output.dtype)
        if not err <= tol:
            bad.append(f"{path} ({kinds.get(path, '?')}): relative error {err:.1e} > {tol:.0e} "
                       f"({str(io.output.dtype).replace('torch.', '')})")
    if not bad:
        return None
    more = f" and {len(bad) - 3} more layer(s)" if len(bad) > 3 else ""
    return (f"{name}: the parity probe refuses this model, the partitioned layer computes something else than "
            f"the dense module on a {PROBE_TOKENS}-token input: {'; '.join(bad[:3])}{more}. The ArchSpec does not "
            f"describe this module (check rope_style, use_rope, norm_style, softcap, scaling); nothing was partitioned. Fix "
            f"the spec, or pass probe=False to skip this check")


def check_parity(model: nn.Module, records: dict[str, LayerIO], *, name: str, kinds: dict[str, str],
                 what: str = "parity probe") -> None:
    """Run every recorded (now partitioned) layer on its inputs and refuse on every rank on a mismatch."""
    with agreement(None, what=f"{name}: {what}"):
        errors = layer_errors(model, records)
    device = next(iter(records.values())).output.device if records else torch.device("cpu")
    message = refusal(name, records, agreed(errors, device), kinds)
    if message is not None:
        raise ProbeError(message)


def iter_meta(module: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """(owning module, attribute, dotted name) of every parameter still on the meta device."""
    for path, sub in module.named_modules():
        for attr, param in sub._parameters.items():
            if param is not None and param.is_meta:
                yield sub, attr, f"{path}.{attr}" if path else attr


def materialize_copy(copy: nn.Module, live: nn.Module, gathered: dict[str, torch.Tensor]) -> nn.Module:
    """Fill the meta parameters of ``copy`` (a meta-device copy of the HF module at the same path
    as ``live``): gathered dense tensors first, the live module's (replicated) ones otherwise."""
    from hf_integration.weights import assign_tensor

    for _, _, name in list(iter_meta(copy)):
        value = gathered.pop(name, None)  # the gathered tensor itself: no second copy
        if value is None:
            value = live.get_parameter(name).detach().clone()
        assign_tensor(copy, name, value)
    return copy


def probe_loaded(model: nn.Module, copies: dict[str, nn.Module], owners: list[tuple[str, nn.Module]], *,
                 name: str) -> None:
    """``load_partitioned``'s probe: record every partitioned layer on the probe ids, gather its slices
    into ``copies[path]`` (meta copies of the HF modules, made before patching), run the dense copy on
    the same inputs and refuse on every rank on a mismatch.

    ``owners``: (path of the HF module it replaced, partitioned layer) of every partitioned layer; the
    ones inside a probed module are gathered (collective over each layer's tensor-parallel axis).
    """
    kinds = {path: type(copy).__name__ for path, copy in copies.items()}
    with agreement(None, what=f"{name}: parity probe (partitioned forward)"):
        records = record_calls(model, list(copies))
        require_calls(records, list(copies), name=name)
        errors = []
        for path, io in records.items():  # one dense layer at a time: freed before the next is gathered
            dense = materialize_copy(copies.pop(path), model.get_submodule(path), gather_inside(path, owners))
            with evaluating(dense), torch.no_grad():
                errors.append(rel_err(io.output, _first_tensor(dense(*io.args, **io.kwargs))))
            del dense
    message = refusal(name, records, agreed(errors, next(iter(records.values())).output.device), kinds)
    if message is not None:
        raise ProbeError(message.replace("nothing was partitioned", "the model was not returned"))


def gather_inside(path: str, owners: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """Dense HF tensors (names relative to ``path``) of every partitioned layer inside the module at
    ``path`` (collective over each layer's tensor-parallel axis, one layer at a time)."""
    from ds_twolevel.sharding.gather import gather_dense_state

    from hf_integration.weights import to_hf_tensors

    out: dict[str, torch.Tensor] = {}
    for owner, layer in owners:
        if owner == path or owner.startswith(path + "."):
            prefix = owner[len(path) + 1:] + "." if owner != path else ""  # TensorMap keys: relative to owner
            tensors = to_hf_tensors(layer.tensor_maps, gather_dense_state(layer))
            out.update({prefix + key: value for key, value in tensors.items()})
    return out


def require_calls(records: dict[str, LayerIO], paths: list[str], *, name: str) -> None:
    """ValueError if the probe's forward did not call a module it must compare."""
    missing = [p for p in paths if p not in records]
    if missing:
        raise ValueError(f"{name}: the parity probe's forward (input_ids only) did not call {', '.join(missing[:4])}; "
                         f"pass probe=False to skip the probe for this model")
