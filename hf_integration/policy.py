"""Injection policy (HF module class -> replacement function) and the ``patch_model`` entry point.

The replacement functions follow DeepSpeed's ``module_inject.replace_module`` contract,
``replace_fn(child, _policy, layer_id, prefix=..., state_dict=...) -> nn.Module``, so they can be
handed to DeepSpeed as well as applied by :func:`patch_model`.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ds_twolevel.costmodel.hardware import profile as hw_profile
from ds_twolevel.parallel.collectives import reduce_dtype as check_reduce_dtype
from ds_twolevel.deepspeed.compat import mark_autotp_parsed
from ds_twolevel.deepspeed.engine_hooks import install_when_imported
from ds_twolevel.layers.qk_norm import QKNorm
from ds_twolevel.parallel.agreement import agreement
from ds_twolevel.parallel.layout import TwoLevelMesh
from ds_twolevel.sharding.partition import AttentionSpec, check_partition, feasible_layouts
from ds_twolevel.strategies import registry

from hf_integration.dense_save import install_dense_save
from hf_integration.generation import install_fast_generation
from hf_integration.modules import HFTwoLevelAttention, HFTwoLevelMLP
from hf_integration.moe import HFTwoLevelExperts, experts_plan
from hf_integration.partitioned import PARTITIONED, partitioned_layers
from hf_integration.probe import check_parity, record_calls, require_calls
from hf_integration.vocab_parallel import install_vocab_parallel, vocab_plan
from hf_integration.specs import ArchSpec, AttentionLayout, MoELayout, get_path, set_path, spec_for, supported_architectures
from hf_integration.weights import (StateDictReader, TensorMap, attention_tensor_maps, check_tensor_shapes, load_shards,
                      mlp_tensor_maps, unplaced_parameters)

ReplaceFn = Callable[..., nn.Module]


@dataclass
class PatchReport:
    """What :func:`patch_model` / :func:`verify` found: replaced modules, dense leftovers, parameters.

    ``params_local`` counts this rank's parameters; ``params_dense`` the unpatched model's.
    """

    model: str
    """model class and model_type."""
    layout: tuple[int, int, int]
    """(dp, n, m)."""
    replaced: dict[str, int] = field(default_factory=dict)
    """HF class name -> modules partitioned."""
    left_dense: list[str] = field(default_factory=list)
    """paths of the outermost attention modules left dense (strict=False only): the same list
    ``verify(model)`` gives."""
    params_local: int = 0
    params_dense: int = 0
    strategy: str = registry.AUTO

    @property
    def share(self) -> float:
        """This rank's fraction of the dense model's parameters."""
        return self.params_local / max(self.params_dense, 1)

    def __str__(self) -> str:
        dp, n, m = self.layout
        swapped = ", ".join(f"{k} x{v}" for k, v in sorted(self.replaced.items())) or "nothing"
        dense = f"; left dense: {len(self.left_dense)}" if self.left_dense else ""
        return (f"{self.model} on dp={dp} x n={n} x m={m} ({self.strategy}): partitioned {swapped}{dense}; "
                f"parameters on this rank {self.params_local:,} of {self.params_dense:,} ({self.share:.1%})")


# -- validation (no module is touched, no collective issued) ------------------------------------
def model_name(model: nn.Module) -> str:
    """``LlamaForCausalLM (llama)`` for messages."""
    return f"{type(model).__name__} ({getattr(getattr(model, 'config', None), 'model_type', '?')})"


def attention_spec(model: nn.Module, arch: ArchSpec) -> AttentionSpec:
    """The core AttentionSpec of ``model`` named after it."""
    return arch.attention_spec(model.config, name=model_name(model))


def check_model_layout(model: nn.Module, arch: ArchSpec, n: int, m: int, *, kv_replication: bool) -> None:
    """ValueError naming the model, the numbers and the layouts that fit, if (n, m) cannot take it."""
    spec = attention_spec(model, arch)
    config = model.config
    problems = arch.problems(config)
    if problems:
        raise ValueError(f"{spec.name}: settings {', '.join(problems)} are not supported by the two-level "
                         f"integration; use the plain model or change them")
    if arch.attention.fused_layout == "per_head" and arch.attention.fused and spec.num_kv_heads != spec.num_heads:
        raise ValueError(f"{spec.name}: per-head fused QKV needs num_kv_heads == num_heads, got "
                         f"{spec.num_kv_heads} and {spec.num_heads}")
    check_partition(spec, n, m, kv_replication=kv_replication)
    for attr, inter in mlp_widths(config, arch).items():
        if inter % (n * m):
            raise ValueError(f"{spec.name}: {attr} ({inter}) is not divisible by n*m = {n}*{m} = {n * m} "
                             f"MLP ranks; layouts that fit this model: {fitting_layouts(spec, inter, kv_replication)}")


def mlp_widths(config: Any, arch: ArchSpec) -> dict[str, int]:
    """Config attribute -> every MLP width the config states (the dense MLP's, each expert's); a width
    read from a module (``MLPLayout.width``) is checked per layer by :func:`check_layers`."""
    widths: dict[str, int] = {}
    for lay in arch.mlp_layouts:
        if isinstance(lay, MoELayout):
            widths[lay.intermediate_attr] = int(getattr(config, lay.intermediate_attr))
        elif lay.width is None:
            widths["intermediate_size"] = intermediate_size(config)
        elif lay.width.startswith("config."):
            widths[lay.width[len("config."):]] = int(getattr(config, lay.width[len("config."):]))
    return widths


def fitting_layouts(spec: AttentionSpec, inter: int, kv_replication: bool, max_devices: int = 16) -> str:
    """Every n x m (n*m <= max_devices) that partitions both the attention and the MLP."""
    fits = [f"n={n} x m={m}" for p in range(2, max_devices + 1) if inter % p == 0
            for n, m in feasible_layouts(spec, p, kv_replication=kv_replication)]
    return ", ".join(fits) or "none"


def intermediate_size(config: Any) -> int:
    """MLP width: ``intermediate_size``, GPT-2's ``n_inner`` or 4*hidden."""
    return getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * config.hidden_size


def _unreplaceable(module: nn.Module) -> str | None:
    """Why an owner-class instance cannot be partitioned (cross-attention), None if it can."""
    if getattr(module, "is_cross_attention", False):
        return "cross-attention"
    return None


def find_owners(model: nn.Module, arch: ArchSpec) -> tuple[list[str], list[str], list[str]]:
    """(attention owner paths, MLP owner paths, attention-like paths it cannot replace)."""
    attn, mlp, refused = [], [], []
    covered: list[str] = []
    for path, module in model.named_modules():
        name = type(module).__name__
        if name == arch.attention.owner:
            (refused if _unreplaceable(module) else attn).append(path)
            covered.append(path + ".")
        elif any(name == lay.owner for lay in arch.mlp_layouts):
            mlp.append(path)
    # safety net for strict mode: an attention module the spec does not cover (e.g. a second kind
    # of attention in a multimodal model) must not be left dense silently
    for path, module in model.named_modules():
        if "Attention" in type(module).__name__ and path not in attn and path not in refused \
                and not any(path.startswith(c) for c in covered):
            refused.append(path)
    return attn, mlp, refused


# -- replacement functions ----------------------------------------------------------------------
def check_layers(model: nn.Module, arch: ArchSpec, attn_paths: list[str], mlp_paths: list[str],
                 ranks: int = 1) -> None:
    """Every layer agrees with the spec (tensor shapes, unplaced parameters, biases, the attributes it
    reads, an MLP width that ``ranks`` = n*m divides), checked on all of them before anything is
    replaced: ValueError naming the module path."""
    spec = attention_spec(model, arch)
    for path in attn_paths:
        attention_plan(model.get_submodule(path), model.config, arch, spec, where=path)
    for path in mlp_paths:
        inter = mlp_plan(model.get_submodule(path), model.config, arch, where=path)["intermediate_size"]
        if inter % ranks:
            raise ValueError(f"{path} ({type(model.get_submodule(path)).__name__}): intermediate size {inter} is not "
                             f"divisible by n*m = {ranks} MLP ranks; choose n*m dividing {inter}")


def _check_bias(owner: nn.Module, path: str, expected: bool, what: str, where: str) -> None:
    has = get_path(owner, path).bias is not None
    if has != expected:
        raise ValueError(f"{where} ({type(owner).__name__}.{path}): spec says {what} bias={expected}, the module has "
                         f"bias={has}; fix the ArchSpec")


def _check_placed(owner: nn.Module, maps: dict[str, TensorMap], target: str, identity: tuple[str, ...],
                  where: str) -> None:
    """Shapes of every tensor the spec implies, and no parameter left out of the spec."""
    check_tensor_shapes(maps, StateDictReader(dict(owner.state_dict(keep_vars=True))), where=where)
    left = unplaced_parameters(owner, maps, target, identity)
    if left:
        raise ValueError(f"{where} ({type(owner).__name__}): parameters {', '.join(left)} are not described by the "
                         f"ArchSpec, so a partitioned layer would drop them; add them to the spec (e.g. "
                         f"AttentionLayout.q_norm/k_norm) or fix its paths")


def read_attribute(owner: nn.Module, config: Any, path: str, *, field_name: str, where: str) -> Any:
    """``owner.<path>`` or, for "config.<name>", the config attribute; ValueError naming the spec
    field when it does not exist (a spec never falls back to a guessed default)."""
    obj, rest = (config, path[len("config."):]) if path.startswith("config.") else (owner, path)
    try:
        return get_path(obj, rest)
    except AttributeError:
        raise ValueError(f"{where} ({type(owner).__name__}): the spec's {field_name} = {path!r} names an attribute "
                         f"this module does not have; fix the ArchSpec") from None


def _qk_norm(owner: nn.Module, lay: AttentionLayout, where: str) -> QKNorm | None:
    """The core QKNorm of a layer: eps read from both norm modules (they must agree)."""
    if lay.q_norm is None:
        return None
    style = lay.norm_style
    eps = {read_attribute(owner, None, f"{path}.{style.eps}", field_name="AttentionLayout.norm_style.eps",
                          where=where) for path in (lay.q_norm, lay.k_norm)}
    if len(eps) != 1:
        raise ValueError(f"{where}: q_norm and k_norm have different eps {sorted(eps)}; one is supported")
    return QKNorm(float(eps.pop()), scope=style.scope, offset=1.0 if style.formula == "1+w" else 0.0,
                  weight_in_float=style.weight_in_float)


def attention_plan(owner: nn.Module, config: Any, arch: ArchSpec, spec: AttentionSpec, *,
                   where: str) -> dict[str, Any]:
    """Validated constructor options of one HF attention module's partitioned layer (no module touched)."""
    lay = arch.attention
    qkv_bias, o_bias = arch.flag(config, arch.qkv_bias), arch.flag(config, arch.o_bias)
    maps = attention_tensor_maps(lay, spec, config.hidden_size, qkv_bias=qkv_bias, o_bias=o_bias,
                                 qk_norm=lay.q_norm is not None, sinks=lay.sinks is not None)
    _check_placed(owner, maps, lay.target, lay.identity, where)
    _check_bias(owner, lay.fused or lay.q, qkv_bias, "qkv", where)
    _check_bias(owner, lay.o, o_bias, "output", where)

    def read(path: str | None, name: str) -> Any:
        return None if path is None else read_attribute(owner, config, path, field_name=f"AttentionLayout.{name}",
                                                        where=where)

    softcap, window = read(lay.softcap, "softcap"), read(lay.sliding_window, "sliding_window")
    return dict(
        rope=lay.use_rope is None or bool(read(lay.use_rope, "use_rope")),
        signature=lay.signature, post_dropout=read(lay.post_dropout, "post_dropout"), tensor_maps=maps,
        owner_class=type(owner).__name__, target=lay.target, qkv_bias=qkv_bias, o_bias=o_bias,
        qk_norm=_qk_norm(owner, lay, where), softcap=None if softcap is None else float(softcap),
        sliding_window=None if window is None else int(window), causal=arch.causal,
        dropout=float(read(lay.attention_dropout, "attention_dropout") or 0.0),
        scaling=float(read(lay.scaling, "scaling")), layer_idx=int(read(lay.layer_idx, "layer_idx") or 0),
        cache_args=lay.cache_args, sinks=lay.sinks is not None,
    )


def build_attention(owner: nn.Module, config: Any, arch: ArchSpec, spec: AttentionSpec, mesh: TwoLevelMesh, *,
                    strategy: str, kv_replication: bool, where: str | None = None,
                    hardware: Any = None, reduce_dtype: Any = torch.float32) -> HFTwoLevelAttention:
    """This rank's partition of one HF attention module (its weights sliced unless on meta)."""
    plan = attention_plan(owner, config, arch, spec, where=where or type(owner).__name__)
    if not plan.pop("rope"):  # a NoPE layer (SmolLM3's no_rope_layers): its dims need no RoPE pairing
        spec = dataclasses.replace(spec, rope_style="none", rotary_dim=None)
    weight = get_path(owner, arch.attention.fused or arch.attention.q).weight
    layer = HFTwoLevelAttention(config.hidden_size, spec, mesh, strategy=strategy, kv_replication=kv_replication,
                                hardware=hardware, reduce_dtype=reduce_dtype, device=weight.device, dtype=weight.dtype,
                                **plan)
    if not weight.is_meta:
        layer.to(weight.device)  # RoPE index buffers too
        load_shards(layer, plan["tensor_maps"], StateDictReader(dict(owner.state_dict(keep_vars=True))))
    return layer.train(owner.training)  # eval models stay in eval (no attention dropout)


def mlp_plan(owner: nn.Module, config: Any, arch: ArchSpec, *, where: str) -> dict[str, Any]:
    """Validated constructor options of one HF MLP's (or MoE block's) partitioned layer."""
    lay = arch.mlp_layout(type(owner).__name__)
    if isinstance(lay, MoELayout):
        return experts_plan(owner, config, lay, where=where)
    bias = arch.flag(config, arch.mlp_bias)
    inter = intermediate_size(config) if lay.width is None else int(
        read_attribute(owner, config, lay.width, field_name="MLPLayout.width", where=where))
    maps = mlp_tensor_maps(lay, config.hidden_size, inter, bias=bias)
    _check_placed(owner, maps, lay.target, lay.identity, where)
    _check_bias(owner, lay.up or lay.gate_up, bias, "MLP", where)

    def read(path: str | None, name: str) -> Any:
        return None if path is None else read_attribute(owner, config, path, field_name=f"MLPLayout.{name}",
                                                        where=where)

    return dict(intermediate_size=inter, gated=lay.gate is not None or lay.gate_up is not None, bias=bias,
                act_fn=read(lay.act, "act"), dropout=read(lay.dropout, "dropout"), tensor_maps=maps,
                owner_class=type(owner).__name__, target=lay.target)


def build_mlp(owner: nn.Module, config: Any, arch: ArchSpec, mesh: TwoLevelMesh, *,
              where: str | None = None, reduce_dtype: Any = torch.float32) -> nn.Module:
    """This rank's partition of one HF MLP or MoE block (its weights sliced unless on meta)."""
    plan = mlp_plan(owner, config, arch, where=where or type(owner).__name__)
    maps = plan["tensor_maps"]
    weight = get_path(owner, next(iter(maps.values())).key)
    cls = HFTwoLevelExperts if isinstance(arch.mlp_layout(type(owner).__name__), MoELayout) else HFTwoLevelMLP
    layer = cls(config.hidden_size, tp=mesh.axes.tp, reduce_dtype=reduce_dtype, device=weight.device,
                dtype=weight.dtype, **plan)
    if not weight.is_meta:
        load_shards(layer, maps, StateDictReader(dict(owner.state_dict(keep_vars=True))))
    return layer.train(owner.training)


def _install(owner: nn.Module, target: str, identity: tuple[str, ...], layer: nn.Module) -> nn.Module:
    """Put ``layer`` at ``target`` inside ``owner`` (or return it to replace the owner)."""
    if not target:
        return layer
    set_path(owner, target, layer)
    for path in identity:
        set_path(owner, path, nn.Identity())  # its projection now runs row-parallel inside ``layer``
    return owner


def injection_policy(model: nn.Module, mesh: TwoLevelMesh, *, strategy: str = registry.AUTO,
                     kv_replication: bool = False, hardware: Any = None,
                     reduce_dtype: Any = torch.float32) -> dict[type[nn.Module], ReplaceFn]:
    """HF class -> DeepSpeed-style replacement function for ``model``'s architecture.

    Example:
        >>> policy = injection_policy(model, mesh)
        >>> from deepspeed.module_inject.replace_module import replace_module
        >>> for cls, fn in policy.items(): replace_module(model, cls, fn, None)
    """
    arch = spec_for(model.config, model_name=model_name(model))
    spec = attention_spec(model, arch)
    classes = {type(mod).__name__: type(mod) for mod in model.modules()}
    config = model.config  # HF MLP modules keep no config of their own

    def replace_attention(child: nn.Module, _policy: Any = None, layer_id: int = 0, *, prefix: str = "",
                          state_dict: Any = None) -> nn.Module:
        layer = build_attention(child, config, arch, spec, mesh, strategy=strategy, kv_replication=kv_replication,
                                where=prefix or None, hardware=hardware, reduce_dtype=reduce_dtype)
        return _install(child, arch.attention.target, arch.attention.identity, layer)

    def replace_mlp(child: nn.Module, _policy: Any = None, layer_id: int = 0, *, prefix: str = "",
                    state_dict: Any = None) -> nn.Module:
        layer = build_mlp(child, config, arch, mesh, where=prefix or None, reduce_dtype=reduce_dtype)
        lay = arch.mlp_layout(type(child).__name__)
        return _install(child, lay.target, lay.identity, layer)

    policy: dict[type[nn.Module], ReplaceFn] = {}
    if arch.attention.owner in classes:
        policy[classes[arch.attention.owner]] = replace_attention
    for lay in arch.mlp_layouts:
        if lay.owner in classes:
            policy[classes[lay.owner]] = replace_mlp
    return policy


# -- entry point ------------------------------------------------------------------------------
def _refuse_or_warn(strict: bool, message: str) -> None:
    if strict:
        raise ValueError(message)
    warnings.warn(message + "; left dense (strict=False)", stacklevel=3)


def _apply(model: nn.Module, paths: list[str], fn: ReplaceFn, layout: Any, undo: list[Callable[[], None]]) -> None:
    """Replace the module at every path with ``fn(module, ...)`` (DeepSpeed's call convention);
    ``undo`` gets, per path, the function that puts the dense modules back."""
    for layer_id, path in enumerate(paths):
        child = model.get_submodule(path)
        inner = {p: get_path(child, p) for p in (layout.target, *layout.identity) if p}
        new = fn(child, None, layer_id, prefix=path, state_dict=None)
        if new is not child:
            set_path(model, path, new)
            undo.append(lambda path=path, child=child: set_path(model, path, child))
        else:  # the layer went inside the owner (target / identity): restore those submodules
            undo.append(lambda child=child, inner=inner: [set_path(child, p, m) for p, m in inner.items()])


def _revert(undo: list[Callable[[], None]]) -> None:
    """Put back every dense module replaced so far (the model is as it was before patching)."""
    for restore in reversed(undo):
        restore()
    undo.clear()


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _check_arguments(model: nn.Module, strategy: str, hardware: Any, reduce_dtype: Any) -> str:
    """:func:`patch_model`'s arguments checked (the canonical strategy name returned); a model already
    partitioned is refused."""
    strategy = registry.check_layer_strategy(strategy)
    if hardware is not None:
        hw_profile(hardware)  # an unknown name fails here, before any module is touched
    check_reduce_dtype(reduce_dtype)
    if partitioned_layers(model):
        raise ValueError(f"{model_name(model)} is already partitioned (verify(model) says what); patch a fresh "
                         f"model, or use save_pretrained + load_partitioned to change the layout")
    return strategy


def _check_modules(model: nn.Module, arch: ArchSpec, mesh: TwoLevelMesh, *, strict: bool, kv_replication: bool,
                   sequence_parallel: bool) -> tuple[list[str], list[str]]:
    """(attention paths, MLP paths) of ``model``, after checking the layout, the modules the spec finds
    and every layer's tensors against it (and what sequence parallelism needs)."""
    check_model_layout(model, arch, mesh.layout.n, mesh.layout.m, kv_replication=kv_replication)
    attn_paths, mlp_paths, refused = find_owners(model, arch)
    if refused:
        _refuse_or_warn(strict, f"{model_name(model)}: cannot partition {len(refused)} attention module(s) "
                                f"({', '.join(refused[:4])}); supported: self-attention of "
                                f"{', '.join(supported_architectures())}")
    if not attn_paths:
        _refuse_or_warn(strict, f"{model_name(model)}: no {arch.attention.owner} module found")
    check_layers(model, arch, attn_paths, mlp_paths, ranks=mesh.layout.n * mesh.layout.m)
    if sequence_parallel or mesh.layout.sp > 1:
        from hf_integration.sequence_parallel import check_supported

        check_supported(model, arch, attention_spec(model, arch), [] if strict else find_attention_like(model),
                        sp=mesh.layout.sp, n=mesh.layout.n, sequence_parallel=sequence_parallel,
                        kv_replication=kv_replication)
    return attn_paths, mlp_paths


def patch_model(model: nn.Module, mesh: TwoLevelMesh, *, strict: bool = True, strategy: str = registry.AUTO,
                kv_replication: bool = False, probe: bool = True, hardware: Any = None,
                reduce_dtype: Any = torch.float32, sequence_parallel: bool = False, vocab_parallel: bool = False) -> PatchReport:
    """Partition ``model``'s attention and MLP layers over ``mesh`` in place; return a report.

    Validates everything (architecture, layout, config settings, and every layer's tensors against
    the spec: shapes, biases, parameters the spec leaves out) before any module is touched or any
    collective issued. ``strategy="cost_model"`` picks, per call, the strategy with the least predicted time
    on ``hardware`` (a cost-model profile or its name, e.g. "h100"; None: the profile of the weights'
    device). ``reduce_dtype``: the dtype every sum over ranks runs in when wider than the model's
    (default fp32: a bf16 model's partial outputs are added in fp32 and rounded once, as its dense matmul
    does; "input": in the model's dtype, half those bytes; see
    :class:`~ds_twolevel.layers.attention.TwoLevelAttention`). Then, with ``probe`` (the default), the parity probe
    (:mod:`hf_integration.probe`): the dense model runs once on 8 seeded random tokens, every layer is
    replaced and run on the inputs its dense module saw, and a mismatch beyond the dtype's tolerance
    puts the dense modules back and raises :class:`~hf_integration.probe.ProbeError` on every rank
    (collective: every rank must call patch_model). ``probe=False`` skips it (huge models; meta models
    are never probed here, ``load_partitioned`` probes them after loading). It creates no process group
    (the mesh built the KV-replication sub-groups). The model stays the same PreTrainedModel object: forward,
    ``generate()`` and ``save_pretrained`` (which then gathers and writes a dense checkpoint) work. ``vocab_parallel``:
    also split the input embedding and the LM head by vocab rows over the layer's n*m ranks, with the causal-LM loss
    computed from the shards (:mod:`hf_integration.vocab_parallel`: with ``labels``, the output's ``logits`` is None).

    ``sequence_parallel``: between sublayers each rank of a layer holds s/(n*m) tokens; the forward then
    takes this rank's shard of the batch (:mod:`hf_integration.sequence_parallel`,
    :func:`hf_integration.sequence_data.shard_batch`).

    Example:
        >>> mesh = TwoLevelLayout(n=2, m=2).build()
        >>> report = patch_model(model, mesh)   # model is now partitioned on this rank
    """
    strategy = _check_arguments(model, strategy, hardware, reduce_dtype)
    layout = mesh.layout
    report = PatchReport(model_name(model), (layout.dp, layout.n, layout.m), strategy=strategy)
    try:
        arch = spec_for(model.config, model_name=model_name(model))
    except ValueError as err:
        _refuse_or_warn(strict, str(err))
        return _finish(model, mesh, report)
    attn_paths, mlp_paths = _check_modules(model, arch, mesh, strict=strict, kv_replication=kv_replication,
                                           sequence_parallel=sequence_parallel)
    vocab = vocab_plan(model, mesh, name=model_name(model)) if vocab_parallel else None
    from ds_twolevel.guard import check_same_settings

    settings = {"strategy": strategy, "hardware": None if hardware is None else hw_profile(hardware).name,
                "reduce_dtype": check_reduce_dtype(reduce_dtype), "kv_replication": kv_replication,
                **({"sequence_parallel": True} if sequence_parallel else {}),
                **({"vocab_parallel": True} if vocab_parallel else {})}
    check_same_settings(mesh, settings, name=model_name(model))
    _replace_and_probe(model, mesh, arch, attn_paths, mlp_paths, strategy=strategy, kv_replication=kv_replication,
                       probe=probe and not _on_meta(model), hardware=hardware, reduce_dtype=reduce_dtype)
    if vocab is not None:
        install_vocab_parallel(model, mesh, vocab, reduce_dtype=reduce_dtype)
    report = _finish(model, mesh, report)
    if sequence_parallel or layout.sp > 1:  # sp > 1: Ulysses' shards (hf_integration.sequence_parallel)
        from hf_integration.sequence_parallel import enable

        enable(model, mesh)
    return report


def _replace_and_probe(model: nn.Module, mesh: TwoLevelMesh, arch: ArchSpec, attn_paths: list[str],
                       mlp_paths: list[str], *, strategy: str, kv_replication: bool, probe: bool,
                       hardware: Any = None, reduce_dtype: Any = torch.float32) -> None:
    """Replace every layer; with ``probe``, compare each with its dense module (dense modules back on refusal)."""
    name = model_name(model)
    records: dict[str, Any] = {}
    if probe:
        from ds_twolevel.guard import check_same_dense_weights

        check_same_dense_weights([model], mesh, name=name)  # else the probe would blame the spec
        with agreement(None, what=f"{name}: parity probe (dense forward)"):
            records = record_calls(model, mlp_paths + attn_paths)
            require_calls(records, mlp_paths + attn_paths, name=name)
    policy = injection_policy(model, mesh, strategy=strategy, kv_replication=kv_replication, hardware=hardware,
                              reduce_dtype=reduce_dtype)
    by_name = {cls.__name__: fn for cls, fn in policy.items()}
    undo: list[Callable[[], None]] = []
    try:
        # MLP owners first: BERT's MLP owner (BertLayer) contains the attention owner
        kinds = {p: type(model.get_submodule(p)).__name__ for p in mlp_paths + attn_paths}
        for lay in arch.mlp_layouts:
            paths = [p for p in mlp_paths if kinds[p] == lay.owner]
            _apply(model, paths, by_name.get(lay.owner), lay, undo)
        _apply(model, attn_paths, by_name.get(arch.attention.owner), arch.attention, undo)
        if probe:
            check_parity(model, records, name=name, kinds=kinds)
    except BaseException:
        _revert(undo)
        raise


def find_attention_like(model: nn.Module) -> list[str]:
    """Paths of modules whose class name says attention (for reports on unsupported models)."""
    return [p for p, mod in model.named_modules() if "Attention" in type(mod).__name__]


def dense_leftovers(model: nn.Module) -> list[str]:
    """Outermost attention modules (class name says attention) that are not partitioned and hold no
    partitioned layer: what :func:`patch_model` left dense (strict=False). The one definition that
    both the patch report and :func:`verify` use."""
    out: list[str] = []
    for path, mod in model.named_modules():
        if isinstance(mod, PARTITIONED) or "Attention" not in type(mod).__name__:
            continue
        if any(path == p or path.startswith(p + ".") for p in out):
            continue  # inside a module already listed
        if any(isinstance(c, PARTITIONED) for c in mod.modules()):
            continue  # e.g. BertAttention, whose .self is the partitioned layer
        out.append(path)
    return out


def _finish(model: nn.Module, mesh: TwoLevelMesh, report: PatchReport) -> PatchReport:
    install_when_imported()  # DeepSpeed's save/load methods, right for two-level engines
    model._twolevel_mesh = mesh
    model._twolevel_strategy = report.strategy
    install_dense_save(model)
    install_fast_generation(model)
    _install_guard(model, mesh)
    counted = verify(model)
    report.replaced, report.params_local, report.params_dense = (counted.replaced, counted.params_local,
                                                                 counted.params_dense)
    report.left_dense = counted.left_dense  # one definition: the report and verify(model) agree
    return report


def _install_guard(model: nn.Module, mesh: TwoLevelMesh) -> None:
    """The guard (wrappers, shards and inputs checked on the first forward: ds_twolevel.guard), and the
    mark that makes DeepSpeed's AutoTP leave the partitioned model alone (accelerate, the Trainer)."""
    from ds_twolevel import guard

    guard.install(model, mesh)
    guard.refuse_rank0_only_save(model)
    mark_autotp_parsed(model)


def verify(model: nn.Module) -> PatchReport:
    """Report what is partitioned in ``model``: counts per HF class and this rank's parameter share.

    Example:
        >>> print(verify(model))
        LlamaForCausalLM (llama) on dp=1 x n=2 x m=2 (auto): partitioned LlamaAttention x2, LlamaMLP x2; ...
    """
    mesh = getattr(model, "_twolevel_mesh", None)
    layout = (mesh.layout.dp, mesh.layout.n, mesh.layout.m) if mesh is not None else (1, 1, 1)
    report = PatchReport(model_name(model), layout, strategy=getattr(model, "_twolevel_strategy", "auto"))
    params = {id(p): p for p in model.parameters()}
    local = sum(p.numel() for p in params.values())
    dense = local
    for _, layer in partitioned_layers(model):
        report.replaced[layer.owner_class] = report.replaced.get(layer.owner_class, 0) + 1
        dense += layer.dense_numel() - sum(p.numel() for p in layer.parameters())
    report.params_local, report.params_dense = local, dense
    report.left_dense = dense_leftovers(model)
    return report


def dense_copies(model: nn.Module) -> dict[str, nn.Module]:
    """Deep copies of every attention and MLP module of ``model`` (on the meta device: free), for
    ``load_partitioned``'s probe; {} for an architecture without a spec.

    Every layer, not one of each kind: layers of one class can differ in what a spec must say (a NoPE
    layer, a sliding window, a dense MLP among MoE blocks), and a spec wrong on one layer only must be
    refused as :func:`patch_model`'s probe refuses it."""
    from hf_integration.specs import SPECS

    arch = SPECS.get(getattr(model.config, "model_type", None))
    if arch is None:
        return {}
    attn, mlp, _ = find_owners(model, arch)
    return {path: copy.deepcopy(model.get_submodule(path)) for path in mlp + attn}


__all__ = ["PatchReport", "check_layers", "check_model_layout", "dense_leftovers", "injection_policy", "patch_model",
           "partitioned_layers", "verify"]
