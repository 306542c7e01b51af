"""Injection policy (HF module class -> replacement function) and the ``patch_model`` entry point.

The replacement functions follow DeepSpeed's ``module_inject.replace_module`` contract,
``replace_fn(child, _policy, layer_id, prefix=..., state_dict=...) -> nn.Module``, so they can be
handed to DeepSpeed as well as applied by :func:`patch_model`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ds_twolevel.layout import TwoLevelMesh
from ds_twolevel.partition import AttentionSpec, check_partition, feasible_layouts

from .modules import HFTwoLevelAttention, HFTwoLevelMLP
from .specs import ArchSpec, get_path, set_path, spec_for, supported_architectures
from .weights import StateDictReader, attention_tensor_maps, load_shards, mlp_tensor_maps

ReplaceFn = Callable[..., nn.Module]
STRATEGIES = ("auto", "score_allreduce", "qk_allgather")
DROPOUT_ATTRS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


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
    """paths of attention modules left dense (strict=False only)."""
    params_local: int = 0
    params_dense: int = 0
    strategy: str = "auto"

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
    inter = intermediate_size(config)
    if inter % (n * m):
        raise ValueError(f"{spec.name}: intermediate_size ({inter}) is not divisible by n*m = {n}*{m} = {n * m} "
                         f"MLP ranks; layouts that fit this model: {fitting_layouts(spec, inter, kv_replication)}")


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
        elif name == arch.mlp.owner:
            mlp.append(path)
    # safety net for strict mode: an attention module the spec does not cover (e.g. a second kind
    # of attention in a multimodal model) must not be left dense silently
    for path, module in model.named_modules():
        if "Attention" in type(module).__name__ and path not in attn and path not in refused \
                and not any(path.startswith(c) for c in covered):
            refused.append(path)
    return attn, mlp, refused


# -- replacement functions ----------------------------------------------------------------------
def _attention_dropout(config: Any) -> float:
    return float(next((getattr(config, a) for a in DROPOUT_ATTRS if getattr(config, a, None) is not None), 0.0))


def check_biases(model: nn.Module, arch: ArchSpec, attn_paths: list[str], mlp_paths: list[str]) -> None:
    """The spec's bias flags agree with every module (checked before anything is replaced)."""
    config, lay = model.config, arch.attention
    for path in attn_paths:
        owner = model.get_submodule(path)
        _check_bias(owner, lay.fused or lay.q, arch.flag(config, arch.qkv_bias), "qkv")
        _check_bias(owner, lay.o, arch.flag(config, arch.o_bias), "output")
    for path in mlp_paths:
        _check_bias(model.get_submodule(path), arch.mlp.up, arch.flag(config, arch.mlp_bias), "MLP")


def _check_bias(owner: nn.Module, path: str, expected: bool, what: str) -> None:
    has = get_path(owner, path).bias is not None
    if has != expected:
        raise ValueError(f"{type(owner).__name__}.{path}: spec says {what} bias={expected}, the module has "
                         f"bias={has}; fix the ArchSpec")


def build_attention(owner: nn.Module, config: Any, arch: ArchSpec, spec: AttentionSpec, mesh: TwoLevelMesh, *,
                    strategy: str, kv_replication: bool) -> HFTwoLevelAttention:
    """This rank's partition of one HF attention module (its weights sliced unless on meta)."""
    lay = arch.attention
    qkv_bias, o_bias = arch.flag(config, arch.qkv_bias), arch.flag(config, arch.o_bias)
    _check_bias(owner, lay.fused or lay.q, qkv_bias, "qkv")
    _check_bias(owner, lay.o, o_bias, "output")
    maps = attention_tensor_maps(lay, spec, config.hidden_size, qkv_bias=qkv_bias, o_bias=o_bias,
                                 qk_norm=lay.q_norm is not None)
    weight = get_path(owner, lay.fused or lay.q).weight
    eps = None if lay.q_norm is None else float(getattr(get_path(owner, lay.q_norm), "variance_epsilon", 1e-6))
    layer = HFTwoLevelAttention(
        config.hidden_size, spec, mesh, signature=lay.signature,
        post_dropout=get_path(owner, lay.post_dropout) if lay.post_dropout else None, tensor_maps=maps,
        owner_class=type(owner).__name__, target=lay.target, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm_eps=eps,
        causal=arch.causal, strategy=strategy, dropout=_attention_dropout(config),
        scaling=float(get_path(owner, lay.scaling)), kv_replication=kv_replication,
        layer_idx=int(get_path(owner, lay.layer_idx) or 0), device=weight.device, dtype=weight.dtype,
    )
    if not weight.is_meta:
        layer.to(weight.device)  # RoPE index buffers too
        load_shards(layer, maps, StateDictReader(dict(owner.state_dict(keep_vars=True))))
    return layer.train(owner.training)  # eval models stay in eval (no attention dropout)


def build_mlp(owner: nn.Module, config: Any, arch: ArchSpec, mesh: TwoLevelMesh) -> HFTwoLevelMLP:
    """This rank's partition of one HF MLP (its weights sliced unless on meta)."""
    lay = arch.mlp
    bias = arch.flag(config, arch.mlp_bias)
    _check_bias(owner, lay.up, bias, "MLP")
    inter = intermediate_size(config)
    maps = mlp_tensor_maps(lay, config.hidden_size, inter, bias=bias)
    weight = get_path(owner, lay.up).weight
    layer = HFTwoLevelMLP(
        config.hidden_size, inter, mesh.axes.tp, gated=lay.gate is not None, bias=bias,
        act_fn=get_path(owner, lay.act), dropout=get_path(owner, lay.dropout) if lay.dropout else None,
        tensor_maps=maps, owner_class=type(owner).__name__, target=lay.target, device=weight.device,
        dtype=weight.dtype,
    )
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


def injection_policy(model: nn.Module, mesh: TwoLevelMesh, *, strategy: str = "auto",
                     kv_replication: bool = False) -> dict[type[nn.Module], ReplaceFn]:
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
        layer = build_attention(child, config, arch, spec, mesh, strategy=strategy, kv_replication=kv_replication)
        return _install(child, arch.attention.target, arch.attention.identity, layer)

    def replace_mlp(child: nn.Module, _policy: Any = None, layer_id: int = 0, *, prefix: str = "",
                    state_dict: Any = None) -> nn.Module:
        return _install(child, arch.mlp.target, arch.mlp.identity, build_mlp(child, config, arch, mesh))

    policy: dict[type[nn.Module], ReplaceFn] = {}
    if arch.attention.owner in classes:
        policy[classes[arch.attention.owner]] = replace_attention
    if arch.mlp.owner in classes:
        policy[classes[arch.mlp.owner]] = replace_mlp
    return policy


# -- entry point ------------------------------------------------------------------------------
def _refuse_or_warn(strict: bool, message: str) -> None:
    if strict:
        raise ValueError(message)
    warnings.warn(message + "; left dense (strict=False)", stacklevel=3)


def _apply(model: nn.Module, paths: list[str], fn: ReplaceFn) -> None:
    """Replace the module at every path with ``fn(module, ...)`` (DeepSpeed's call convention)."""
    for layer_id, path in enumerate(paths):
        child = model.get_submodule(path)
        new = fn(child, None, layer_id, prefix=path, state_dict=None)
        if new is not child:
            set_path(model, path, new)


def patch_model(model: nn.Module, mesh: TwoLevelMesh, *, strict: bool = True, strategy: str = "auto",
                kv_replication: bool = False) -> PatchReport:
    """Partition ``model``'s attention and MLP layers over ``mesh`` in place; return a report.

    Validates everything (architecture, layout, biases, config settings) before any module is
    touched or any collective issued; patching sends no data (with n > KV heads it creates the
    KV-replication sub-group on every rank). The model stays the same PreTrainedModel object: forward,
    ``generate()`` and ``save_pretrained`` (which then gathers and writes a dense checkpoint) work.

    Example:
        >>> mesh = TwoLevelLayout(n=2, m=2).build()
        >>> report = patch_model(model, mesh)   # model is now partitioned on this rank
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    layout = mesh.layout
    if partitioned_layers(model):
        raise ValueError(f"{model_name(model)} is already partitioned (verify(model) says what); patch a fresh "
                         f"model, or use save_pretrained + load_partitioned to change the layout")
    report = PatchReport(model_name(model), (layout.dp, layout.n, layout.m), strategy=strategy)
    try:
        arch = spec_for(model.config, model_name=model_name(model))
    except ValueError as err:
        _refuse_or_warn(strict, str(err))
        report.left_dense = find_attention_like(model)
        return _finish(model, mesh, report)
    check_model_layout(model, arch, layout.n, layout.m, kv_replication=kv_replication)
    attn_paths, mlp_paths, refused = find_owners(model, arch)
    if refused:
        _refuse_or_warn(strict, f"{model_name(model)}: cannot partition {len(refused)} attention module(s) "
                                f"({', '.join(refused[:4])}); supported: self-attention of "
                                f"{', '.join(supported_architectures())}")
    if not attn_paths:
        _refuse_or_warn(strict, f"{model_name(model)}: no {arch.attention.owner} module found")
    check_biases(model, arch, attn_paths, mlp_paths)
    policy = injection_policy(model, mesh, strategy=strategy, kv_replication=kv_replication)
    by_name = {cls.__name__: fn for cls, fn in policy.items()}
    # MLP owners first: BERT's MLP owner (BertLayer) contains the attention owner
    _apply(model, mlp_paths, by_name.get(arch.mlp.owner))
    _apply(model, attn_paths, by_name.get(arch.attention.owner))
    report.left_dense = refused
    return _finish(model, mesh, report)


def find_attention_like(model: nn.Module) -> list[str]:
    """Paths of modules whose class name says attention (for reports on unsupported models)."""
    return [p for p, mod in model.named_modules() if "Attention" in type(mod).__name__]


def _finish(model: nn.Module, mesh: TwoLevelMesh, report: PatchReport) -> PatchReport:
    from ds_twolevel.deepspeed_compat import install_when_imported

    from .checkpoint import install_dense_save  # local import: checkpoint imports this module

    install_when_imported()  # DeepSpeed's save/load methods, right for two-level engines
    model._twolevel_mesh = mesh
    model._twolevel_strategy = report.strategy
    install_dense_save(model)
    _install_guard(model, mesh)
    counted = verify(model)
    report.replaced, report.params_local, report.params_dense = (counted.replaced, counted.params_local,
                                                                 counted.params_dense)
    return report


def _install_guard(model: nn.Module, mesh: TwoLevelMesh) -> None:
    """The guard (wrappers, shards and inputs checked on the first forward: ds_twolevel.guard), and the
    mark that makes DeepSpeed's AutoTP leave the partitioned model alone (accelerate, the Trainer)."""
    from ds_twolevel import guard

    guard.install(model, mesh)
    guard.refuse_rank0_only_save(model)
    model.ds_autotp_parsed = True


def partitioned_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every partitioned layer, in module order."""
    return [(p, mod) for p, mod in model.named_modules() if isinstance(mod, (HFTwoLevelAttention, HFTwoLevelMLP))]


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
    arch_owner = {s.attention.owner for s in _all_specs()}
    report.left_dense = [p for p, mod in model.named_modules() if type(mod).__name__ in arch_owner
                         and not isinstance(mod, HFTwoLevelAttention)
                         and not any(isinstance(c, HFTwoLevelAttention) for c in mod.children())]
    return report


def _all_specs() -> list[ArchSpec]:
    from .specs import SPECS

    return list(SPECS.values())


__all__ = ["PatchReport", "check_model_layout", "injection_policy", "patch_model", "partitioned_layers", "verify"]
