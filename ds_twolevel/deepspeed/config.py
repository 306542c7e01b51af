"""The ``"two_level"`` section of a DeepSpeed JSON config: one dataclass, loaded and saved here only.

A DeepSpeed config for this package is an ordinary DeepSpeed JSON with one extra section::

    {
      "train_micro_batch_size_per_gpu": 2,
      "gradient_accumulation_steps": 1,
      "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 2},
      "two_level": {"n": 2, "m": 2, "strategy": "cost_model", "timeout_s": 600}
    }

``"strategy": "cost_model"`` chooses, per call, the strategy with the least predicted time on the
hardware profile. It is not spelled ``"auto"``: accelerate's DeepSpeedPlugin and the Hugging Face
Trainer treat every ``"auto"`` string in a DeepSpeed config as a placeholder to fill from their own
arguments, so a JSON ``"auto"`` is refused with the fix.

:func:`load_deepspeed_config` splits it into a validated :class:`TwoLevelConfig` and the plain
DeepSpeed dict (without ``"two_level"``) that ``deepspeed.initialize`` receives.
:func:`check_deepspeed_config` refuses, before any collective, the settings this package cannot
honour, each time with the numbers and the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ds_twolevel.deepspeed.config_schema import (AUTO, MAX_TIMEOUT_S, Key, check_key, check_object_keys, show,
                                                 unknown_key_message, validate_deepspeed_dict)
from ds_twolevel.parallel.layout import TwoLevelLayout

SECTION = "two_level"
REQUIRED = ("n", "m")
COST_MODEL = "cost_model"
"""the strategy chooser: the least predicted time per call (``ds_twolevel.strategies.registry.AUTO``)."""


def setting(default: Any, kind: str, example: str, **check: Any) -> Any:
    """A ``TwoLevelConfig`` field and its check (:class:`~ds_twolevel.deepspeed.config_schema.Key`):
    adding a ``"two_level"`` key is one ``name: type = setting(...)`` line plus its docstring."""
    return field(default=default, metadata={"key": Key("", kind, example, **check)})


def _strategies() -> tuple[str, ...]:
    from ds_twolevel.strategies import registry

    return tuple(registry.layer_choices())


def _profiles() -> tuple[str, ...]:
    from ds_twolevel.costmodel.hardware import PROFILES

    return tuple(sorted(PROFILES))


@dataclass(frozen=True)
class TwoLevelConfig:
    """How the attention (and MLP) of every layer is partitioned, and how the job fails.

    Example:
        >>> cfg = TwoLevelConfig.from_dict({"n": 2, "m": 2})
        >>> cfg.layout(world_size=8).dp
        2
    """

    n: int = setting(None, "int", "2", low=1)
    """head groups: each rank holds h/n query heads (and g/n KV heads). Required."""
    m: int = setting(None, "int", "2", low=1)
    """head-dim segments: each rank holds d/m dims of each of its heads. Required."""
    dp: int | None = setting(None, "int", "2", low=1, nullable=True)
    """expected data-parallel replicas; optional check, dp is always world_size / (n*m)."""
    strategy: str = setting(COST_MODEL, "str", '"cost_model"', choices=_strategies)
    """attention across segments: "cost_model" (the least predicted time per call on the hardware
    profile) or a strategy name: "score_allreduce", "qk_allgather", "seq_rows"."""
    hardware: str | None = setting(None, "str", '"h100"', nullable=True, choices=_profiles)
    """cost-model profile "cost_model" plans with ("cpu", "h100"); null: the profile of the weights' device."""
    reduce_dtype: str = setting("fp32", "str", '"fp32"', choices=("fp32", "input"))
    """dtype of every sum over ranks (partial scores, the o_proj / down_proj all-reduces) of a bf16/fp16
    model: "fp32" (added in fp32, rounded once: the dense model's error) or "input" (in the model's
    dtype: half those bytes, what Megatron and AutoTP do)."""
    kv_replication: bool = setting(False, "bool", "false")
    """allow n > num_key_value_heads by replicating KV heads across head groups (costs memory)."""
    sequence_parallel: bool = setting(False, "bool", "false")
    """between sublayers each of a layer's n*m ranks holds s/(n*m) tokens (Megatron-style sequence
    parallelism); the model then takes each rank's shard of the batch
    (``hf_integration.sequence_data.shard_batch``)."""
    vocab_parallel: bool = setting(False, "bool", "false")
    """split the input embedding and the LM head by vocab rows over the n*m ranks of a layer, with the
    causal-LM loss computed from the shards (no rank holds full-vocab logits in training)."""
    strict: bool = setting(True, "bool", "true")
    """refuse a model with attention/MLP modules the injection policy does not know."""
    timeout_s: float = setting(600.0, "number", "600", low=1, high=MAX_TIMEOUT_S)
    """seconds a collective may wait for a peer before this rank fails with a clear message."""
    dist_backend: str | None = setting(None, "str", '"gloo"', nullable=True)
    """torch.distributed backend; null: "gloo" on CPU, the accelerator's own (nccl, ...) otherwise."""
    zero_init: bool = setting(False, "bool", "false")
    """ZeRO stage 3 only: build the model under ``deepspeed.zero.Init`` (see ``ds_twolevel.zero_init``)."""
    sync_init: bool = setting(True, "bool", "true")
    """broadcast the dense weights from tensor-parallel rank 0 before partitioning, so every rank of
    a replica starts from the same model even if seeding differed."""
    probe: bool = setting(True, "bool", "true")
    """run the parity probe while patching (every layer vs its dense module on 8 tokens; a mismatch
    refuses the model on every rank); false skips it for huge models (hf_integration.probe)."""
    strict_config: bool = setting(False, "bool", "false")
    """a top-level DeepSpeed key DeepSpeed does not know is an error, not a warning."""

    def __post_init__(self) -> None:
        if self.strategy == "auto":  # Python callers' spelling; in JSON see from_dict
            object.__setattr__(self, "strategy", COST_MODEL)
        for key in keys():  # type and range of every field: one line naming key, value, example
            check_key(key, getattr(self, key.path.split(".", 1)[1]))

    @property
    def tp_size(self) -> int:
        """Ranks sharing one layer: n*m."""
        return self.n * self.m

    def layout(self, world_size: int, sp: int = 1) -> TwoLevelLayout:
        """The dp x sp x n x m layout for ``world_size`` ranks (ValueError naming the layouts that fit);
        ``sp``: DeepSpeed's ``"sequence_parallel_size"`` (Ulysses)."""
        layout = TwoLevelLayout.from_world_size(world_size, n=self.n, m=self.m, sp=sp)
        if self.dp is not None and self.dp != layout.dp:
            group = self.tp_size * sp
            raise ValueError(
                f'"two_level" says dp={self.dp} but {world_size} ranks / ({"sp*" if sp > 1 else ""}n*m = {group}) give '
                f"dp={layout.dp}; launch {self.dp * group} ranks or remove \"dp\"")
        return layout

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> "TwoLevelConfig":
        """Validate a ``"two_level"`` section; unknown or missing keys are errors."""
        check_object_keys(section, '"two_level"')
        known = [f.name for f in fields(cls)]
        for key in section:
            if key not in known:
                message = unknown_key_message(key, known, '"two_level"')
                raise ValueError(f"{message}; its keys: {', '.join(known)}")
        if section.get("strategy") == "auto":
            raise ValueError('"two_level.strategy": "auto" is read by accelerate and the Hugging Face Trainer as a '
                             'placeholder to fill; write "strategy": "cost_model" (the least predicted time per call)')
        missing = [k for k in REQUIRED if k not in section]
        if missing:
            raise ValueError(f'"two_level" needs {missing}, e.g. "two_level": {{"n": 2, "m": 2}} '
                             f"(n head groups x m head-dim segments per layer)")
        return cls(**dict(section))

    def to_dict(self) -> dict[str, Any]:
        """The JSON section."""
        return asdict(self)


def keys() -> tuple[Key, ...]:
    """The :class:`~ds_twolevel.deepspeed.config_schema.Key` of every ``"two_level"`` field, by dotted path.

    Example:
        >>> keys()[0].path
        'two_level.n'
    """
    return tuple(dataclasses.replace(f.metadata["key"], path=f"{SECTION}.{f.name}") for f in fields(TwoLevelConfig))


class ConfigNotFoundError(FileNotFoundError, ValueError):
    """The DeepSpeed config path names no file (both a FileNotFoundError and a ValueError: every
    config problem is a ValueError)."""


def read_json(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config given as a path or a dict, as a fresh dict (ValueError naming the file
    when it is not a JSON object)."""
    if isinstance(config, Mapping):
        check_object_keys(config, "the DeepSpeed config")
        return copy.deepcopy(dict(config))
    if not isinstance(config, (str, os.PathLike)):
        raise ValueError(f"a DeepSpeed config is a path or a dict, got {show(config)}")
    path = Path(config)
    if not path.is_file():
        raise ConfigNotFoundError(f"DeepSpeed config {str(path)!r} does not exist (or is not a file); pass the path "
                                  "of a JSON file or a dict")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from None
    check_object_keys(data, f"DeepSpeed config {str(path)!r}")
    return data


def load_deepspeed_config(config: str | os.PathLike | Mapping[str, Any], *,
                          inference: bool = False) -> tuple[TwoLevelConfig, dict[str, Any]]:
    """Split a DeepSpeed config into (``TwoLevelConfig``, the DeepSpeed dict without ``"two_level"``),
    both checked: ``"two_level"`` by its :func:`keys`, the rest by DeepSpeed's own parser (its
    inference config's with ``inference``; see ``config_schema.validate_deepspeed_dict``). Needs no
    process group: call it before any rank talks.

    Example:
        >>> tl, ds = load_deepspeed_config("ds_configs/zero2_n2_m2.json")
    """
    ds = read_json(config)
    if SECTION not in ds:
        raise ValueError(
            'the DeepSpeed config has no "two_level" section; add e.g. "two_level": {"n": 2, "m": 2} '
            "(n head groups x m head-dim segments; dp = world size / (n*m))")
    tl = TwoLevelConfig.from_dict(ds.pop(SECTION))
    validate_deepspeed_dict(ds, inference=inference, strict=tl.strict_config)
    return tl, ds


def check_config_file(config: str | os.PathLike, *, prog: str,
                      inference: bool = False) -> tuple[TwoLevelConfig, dict[str, Any]]:
    """:func:`load_deepspeed_config` for a script, called before it imports transformers or starts any
    rank: a refusal is one line ``<prog>: error: <config>: <reason>`` from rank 0 (every rank would say
    the same) and exit status 2.

    Example:
        >>> tl, ds = check_config_file(args.deepspeed_config, prog="recipes/train.py")
    """
    try:
        return load_deepspeed_config(config, inference=inference)
    except ValueError as err:
        if os.environ.get("RANK", "0") == "0":
            named = str(config) in str(err)
            print(f"{prog}: error: {err if named else f'{config}: {err}'}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def save_deepspeed_config(tl: TwoLevelConfig, ds: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the DeepSpeed dict with ``tl`` as its ``"two_level"`` section (atomically)."""
    out = {**copy.deepcopy(dict(ds)), SECTION: tl.to_dict()}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _zero(ds: Mapping[str, Any]) -> dict[str, Any]:
    return dict(ds.get("zero_optimization") or {})


def zero_stage(ds: Mapping[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed dict (0 when absent)."""
    return int(_zero(ds).get("stage", 0))


def check_deepspeed_config(tl: TwoLevelConfig, ds: Mapping[str, Any], world_size: int, *,
                           device_type: str = "cpu") -> TwoLevelLayout:
    """Refuse what this package cannot honour, before any collective; return the layout.

    ``tl`` and ``ds`` come from :func:`load_deepspeed_config` (which checked each key on its own);
    this checks them against each other and against the world size.

    Checks: world size factors into dp*sp*n*m (sp: DeepSpeed's ``"sequence_parallel_size"``, Ulysses outside
    the layer's n*m ranks); no second tensor-parallel scheme; ZeRO
    features whose groups span the world instead of the mpu's data-parallel group; batch sizes
    counted in data-parallel replicas; dtype supported on the device; ``zero_init`` only with
    stage 3.
    """
    sp = sequence_parallel_size(ds)
    _check_ulysses(tl, ds, sp, world_size)
    layout = tl.layout(world_size, sp)
    dp = layout.dp
    _check_autotp(tl, ds)
    if (ds.get("checkpoint") or {}).get("writer"):
        raise ValueError('"checkpoint.writer" (fast/decoupled checkpoint engine) asks the mpu for pipeline ranks and '
                         'data-parallel peer lists the two-level mesh does not provide; remove "checkpoint.writer" '
                         "(ds_twolevel.save_checkpoint is atomic with the default engine)")
    _check_zero(tl, ds, layout)
    _check_batch(ds, dp, world_size)
    if (ds.get("fp16") or {}).get("enabled") is True and device_type == "cpu":
        raise ValueError('"fp16.enabled" is not supported on CPU; use "bf16": {"enabled": true} or fp32 '
                         "(no fp16/bf16 section)")
    return layout


def sequence_parallel_size(ds: Mapping[str, Any]) -> int:
    """DeepSpeed's ``"sequence_parallel_size"`` (Ulysses' sp; 1 when absent), checked."""
    sp = ds.get("sequence_parallel_size", 1)
    if sp is None:
        return 1
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise ValueError(f'"sequence_parallel_size" must be an int >= 1, got {show(sp)}')
    return sp


def _check_ulysses(tl: TwoLevelConfig, ds: Mapping[str, Any], sp: int, world_size: int) -> None:
    """Ulysses (sp > 1) composes with two-level as dp x sp x n x m; refuse what it does not compose with."""
    if sp == 1:
        return
    group = sp * tl.tp_size
    if world_size % group:
        fits = [f"sp={u}" for u in range(1, world_size // tl.tp_size + 1) if world_size % (u * tl.tp_size) == 0]
        raise ValueError(f'"sequence_parallel_size" = {sp} with n*m = {tl.n}*{tl.m}: dp x sp x n x m needs a multiple of '
                         f"sp*n*m = {group} ranks, the world has {world_size}; with n={tl.n}, m={tl.m} on {world_size} "
                         f"ranks use {', '.join(fits) or 'another n x m'}")
    if tl.sequence_parallel:
        raise ValueError(f'"sequence_parallel_size" = {sp} (Ulysses) with "two_level.sequence_parallel": true is not '
                         'supported; set "sequence_parallel": false (the n*m ranks of a layer then hold the same s/sp tokens)')
    if tl.vocab_parallel:
        raise ValueError(f'"sequence_parallel_size" = {sp} (Ulysses) with "two_level.vocab_parallel": true is not '
                         'supported; set "vocab_parallel": false')
    if zero_stage(ds) == 3 and _zero(ds).get("reduce_scatter") is False:
        raise ValueError(f'"zero_optimization.reduce_scatter": false at ZeRO stage 3 with "sequence_parallel_size" = {sp} '
                         "averages gradients over dp or dp x sp depending on the bucket size; remove it (the default "
                         "reduce-scatter is exact)")
    if "data_parallel_size" in ds:
        raise ValueError('"data_parallel_size" with "sequence_parallel_size" makes DeepSpeed build its own (dp, sp) '
                         "mesh over the world, ignoring the two-level groups; remove \"data_parallel_size\" (dp = world "
                         "size / (sp*n*m))")


def _check_autotp(tl: TwoLevelConfig, ds: Mapping[str, Any]) -> None:
    """``tensor_parallel.autotp_size`` may only name the two-level group (n*m): DeepSpeed then builds
    (dp, tp) groups with tp fastest, which are the two-level layout's (accelerate and the HF Trainer
    need it to feed one batch per layer group); any other value is a second tensor-parallel scheme."""
    autotp = int((ds.get("tensor_parallel") or {}).get("autotp_size", 0) or 0)
    if autotp > 1 and autotp != tl.tp_size:
        raise ValueError(
            f'"tensor_parallel.autotp_size" = {autotp} contradicts "two_level" (n*m = {tl.n}*{tl.m} = {tl.tp_size} ranks '
            f'share each layer); set it to {tl.tp_size} or remove "tensor_parallel"')


def _check_zero(tl: TwoLevelConfig, ds: Mapping[str, Any], layout: TwoLevelLayout) -> None:
    zero = _zero(ds)
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f'"zero_optimization.stage" must be 0, 1, 2 or 3, got {stage}')
    if tl.zero_init and stage != 3:
        raise ValueError(f'"two_level.zero_init" needs ZeRO stage 3 (the config has stage {stage}); '
                         'set "zero_optimization.stage": 3 or "zero_init": false')
    # hpZ and MiCS build their shard groups from consecutive global ranks, i.e. from ranks of one
    # layer holding *different* shards; ZeRO may only shard over the data-parallel axis.
    hpz = int(zero.get("zero_hpz_partition_size", 1) or 1)
    if hpz > 1:
        raise ValueError(
            f'"zero_optimization.zero_hpz_partition_size" = {hpz} groups consecutive ranks, which hold different '
            f"two-level shards (n*m = {layout.tp_size} consecutive ranks share a layer); remove it or set it to 1")
    if zero.get("zero_quantized_gradients"):
        raise ValueError(
            '"zero_optimization.zero_quantized_gradients" reduces gradients by all-to-all over the ranks of each '
            "node, which hold different two-level shards, instead of over the data-parallel axis; remove it")
    mics = int(zero.get("mics_shard_size", -1) or -1)
    if mics > 0:
        raise ValueError(
            f'"zero_optimization.mics_shard_size" = {mics} shards over consecutive ranks, which hold different '
            f"two-level shards; remove it (ZeRO stage 3 already shards over the dp = {layout.dp} replicas)")


def _check_batch(ds: Mapping[str, Any], dp: int, world_size: int) -> None:
    """DeepSpeed counts batches per data-parallel replica (dp), not per rank: say so with numbers."""
    tbs, mbs, gas = (None if ds.get(k) == AUTO else ds.get(k)  # "auto": accelerate fills it in
                     for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    if tbs is None or (mbs is None and gas is None):
        return
    if mbs is not None and gas is not None and tbs != mbs * gas * dp:
        hint = ""
        if tbs == mbs * gas * world_size:
            hint = f" (it was computed with the world size {world_size}; batches count replicas, not ranks)"
        raise ValueError(
            f'"train_batch_size" = {tbs} != micro batch {mbs} x gradient_accumulation_steps {gas} x dp {dp}{hint}; '
            f"set it to {mbs * gas * dp} or drop it")
    per_replica = mbs if mbs is not None else gas
    if tbs % (per_replica * dp):
        raise ValueError(f'"train_batch_size" = {tbs} is not a multiple of {per_replica} x dp {dp}; '
                         f"e.g. {per_replica * dp}")
