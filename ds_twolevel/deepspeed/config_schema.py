"""Type and range of every config key this package reads, checked before DeepSpeed sees the dict.

One table (:data:`DEEPSPEED_KEYS`, :data:`TWO_LEVEL_KEYS`) says, per dotted key, what a valid value
is and gives an example; :func:`check_key` turns a bad value into one line naming the key, the
value and the example::

    ValueError: "fp16" must be a JSON object, got true; e.g. "fp16": {"enabled": true}

DeepSpeed sections are checked only where they are present (DeepSpeed fills the defaults), and
only the keys this package or the DeepSpeed code paths it relies on read: a section given as a
bool, a list or null would otherwise reach DeepSpeed as ``AttributeError: 'bool' object has no
attribute 'get'`` or ``TypeError: argument after ** must be a mapping``. The string ``"auto"`` is
accepted where accelerate and the Hugging Face Trainer fill it in (batch sizes, clipping,
``fp16/bf16.enabled``).

Example:
    >>> validate_deepspeed_dict({"zero_optimization": {"stage": 2}, "fp16": {"enabled": False}})
    >>> validate_deepspeed_dict({"fp16": True})
    Traceback (most recent call last):
    ValueError: "fp16" must be a JSON object, got true; e.g. "fp16": {"enabled": true}
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Any, Mapping

from ds_twolevel.costmodel.hardware import PROFILES
from ds_twolevel.strategies import registry

AUTO = "auto"
"""accelerate's / the HF Trainer's placeholder, filled from their own arguments."""
MAX_TIMEOUT_S = 7 * 24 * 3600
"""longest accepted process-group timeout (one week): beyond it a stalled peer is a hang."""
DTYPES = ("fp32", "float32", "float", "torch.float32", "fp16", "float16", "half", "torch.float16",
          "bf16", "bfloat16", "bfloat", "torch.bfloat16", "int8", "torch.int8")
"""inference ``"dtype"`` strings DeepSpeed 0.19.8 knows (``deepspeed.inference.config.DtypeEnum``)."""


@dataclass(frozen=True)
class Key:
    """What a valid value of one dotted config key is."""

    path: str
    """dotted key, e.g. "zero_optimization.stage"."""
    kind: str
    """"object", "int", "number", "bool", "str" or "dtype"."""
    example: str
    """a valid value as JSON text, shown in the error."""
    low: float | None = None
    """smallest valid number (inclusive)."""
    high: float | None = None
    """largest valid number (inclusive)."""
    choices: tuple | Callable[[], tuple] = ()
    """allowed values (a callable: read when checked, e.g. the strategy registry)."""
    """the only valid values, when the set is small."""
    auto: bool = False
    """the placeholder "auto" (filled by accelerate / the HF Trainer) is accepted."""
    nullable: bool = False
    """JSON null is accepted (means: absent)."""
    infinite: bool = False
    """+Infinity is accepted (accelerate sets ``steps_per_print`` to it: never print)."""


def _k(path: str, kind: str, example: str, **kw: Any) -> Key:
    return Key(path, kind, example, **kw)


DEEPSPEED_KEYS: tuple[Key, ...] = (
    _k("train_batch_size", "int", "8", low=1, auto=True, nullable=True),  # null: DeepSpeed computes it
    _k("train_micro_batch_size_per_gpu", "int", "2", low=1, auto=True, nullable=True),
    _k("gradient_accumulation_steps", "int", "1", low=1, auto=True, nullable=True),
    _k("gradient_clipping", "number", "1.0", low=0, auto=True),
    _k("steps_per_print", "int", "100", low=1, nullable=True, infinite=True),  # accelerate's DeepSpeedPlugin: inf
    _k("wall_clock_breakdown", "bool", "false"),
    _k("sequence_parallel_size", "int", "1", low=1),
    _k("zero_optimization", "object", '{"stage": 2}'),
    _k("zero_optimization.stage", "int", "2", choices=(0, 1, 2, 3)),
    _k("zero_optimization.zero_hpz_partition_size", "int", "1", low=1),
    _k("zero_optimization.mics_shard_size", "int", "-1", low=-1),
    _k("zero_optimization.zero_quantized_gradients", "bool", "false"),
    _k("fp16", "object", '{"enabled": true}'),
    _k("fp16.enabled", "bool", "true", auto=True),
    _k("bf16", "object", '{"enabled": true}'),
    _k("bf16.enabled", "bool", "true", auto=True),
    _k("bfloat16", "object", '{"enabled": true}'),
    _k("bfloat16.enabled", "bool", "true", auto=True),
    _k("tensor_parallel", "object", '{"tp_size": 1}'),
    _k("tensor_parallel.autotp_size", "int", "0", low=0),
    _k("tensor_parallel.tp_size", "int", "1", low=1),
    _k("checkpoint", "object", '{"use_node_local_storage": false}'),
    _k("checkpoint.use_node_local_storage", "bool", "false"),
    _k("optimizer", "object", '{"type": "AdamW", "params": {"lr": 0.001}}'),
    _k("optimizer.type", "str", '"AdamW"'),
    _k("optimizer.params", "object", '{"lr": 0.001}'),
    _k("scheduler", "object", '{"type": "WarmupLR", "params": {"warmup_num_steps": 100}}'),
    _k("scheduler.type", "str", '"WarmupLR"'),
    _k("scheduler.params", "object", '{"warmup_num_steps": 100}'),
    _k("replace_with_kernel_inject", "bool", "false"),
    _k("dtype", "dtype", '"fp32"', choices=DTYPES),
)
"""DeepSpeed keys read by this package or by the DeepSpeed code paths it relies on."""


def _choices(key: Key) -> tuple:
    return key.choices() if callable(key.choices) else key.choices


TWO_LEVEL_KEYS: tuple[Key, ...] = (
    _k("two_level.n", "int", "2", low=1),
    _k("two_level.m", "int", "2", low=1),
    _k("two_level.dp", "int", "2", low=1, nullable=True),
    _k("two_level.strategy", "str", '"cost_model"', choices=lambda: ("cost_model", *registry.layer_choices())),
    _k("two_level.hardware", "str", '"h100"', nullable=True, choices=lambda: tuple(sorted(PROFILES))),
    _k("two_level.reduce_dtype", "str", '"fp32"', choices=("fp32", "input")),
    _k("two_level.kv_replication", "bool", "false"),
    _k("two_level.sequence_parallel", "bool", "false"),
    _k("two_level.vocab_parallel", "bool", "false"),
    _k("two_level.strict", "bool", "true"),
    _k("two_level.timeout_s", "number", "600", low=1, high=MAX_TIMEOUT_S),
    _k("two_level.dist_backend", "str", '"gloo"', nullable=True),
    _k("two_level.zero_init", "bool", "false"),
    _k("two_level.sync_init", "bool", "true"),
    _k("two_level.probe", "bool", "true"),
)
"""Every field of :class:`ds_twolevel.deepspeed.config.TwoLevelConfig`."""

_BY_PATH = {key.path: key for key in (*DEEPSPEED_KEYS, *TWO_LEVEL_KEYS)}


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON text (``true``, ``Infinity``, ``[]``), shortened to ``limit`` characters."""
    try:
        text = json.dumps(value, allow_nan=True, sort_keys=True, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_ok(key: Key, value: Any) -> bool:
    """Type (and, for numbers, finiteness) of ``value`` for ``key``."""
    if key.kind == "object":
        return isinstance(value, Mapping)
    if key.kind == "int":
        return _is_int(value)
    if key.kind == "number":
        return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    if key.kind == "bool":
        return isinstance(value, bool)
    if key.kind == "str":
        return isinstance(value, str) and value != ""
    assert key.kind == "dtype", key
    return isinstance(value, str) or type(value).__name__ == "dtype"  # a torch.dtype from Python


def _expected(key: Key) -> str:
    """``must be ...`` text of a key."""
    kinds = {"object": "a JSON object", "int": "an integer", "number": "a finite number", "bool": "true or false",
             "str": "a non-empty string", "dtype": "a dtype string"}
    text = kinds[key.kind]
    if key.choices:
        text = f"one of {', '.join(show(c) for c in _choices(key))}"
    elif key.low is not None and key.high is not None:
        text += f" in [{key.low:g}, {key.high:g}]"
    elif key.low is not None:
        text += f" >= {key.low:g}"
    alternatives = (['"auto"'] if key.auto else []) + (["null"] if key.nullable else []) + (
        ["Infinity"] if key.infinite else [])
    return text + (f" (or {' or '.join(alternatives)})" if alternatives else "")


def check_key(key: Key | str, value: Any) -> None:
    """ValueError naming ``key``, ``value`` and a valid example unless ``value`` fits ``key``.

    Example:
        >>> check_key("two_level.timeout_s", float("inf"))
        Traceback (most recent call last):
        ValueError: "two_level.timeout_s" must be a finite number in [1, 604800], got Infinity; e.g. "timeout_s": 600
    """
    key = _BY_PATH[key] if isinstance(key, str) else key
    if (key.auto and value == AUTO) or (key.nullable and value is None) or (key.infinite and value == math.inf):
        return
    ok = _kind_ok(key, value)
    if ok and key.choices:
        ok = value in _choices(key) if key.kind != "dtype" or isinstance(value, str) else True
    if ok and key.low is not None and value < key.low:
        ok = False
    if ok and key.high is not None and value > key.high:
        ok = False
    if not ok:
        leaf = key.path.rsplit(".", 1)[-1]
        raise ValueError(f'"{key.path}" must be {_expected(key)}, got {show(value)}; e.g. "{leaf}": {key.example}')


def check_object_keys(section: Any, where: str) -> None:
    """ValueError unless ``section`` is a JSON object with string keys."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {show(section)}")
    bad = [k for k in section if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{where} has non-string key(s) {show(bad)}; JSON object keys are strings")


def _lookup(ds: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key whose parents were already checked to be objects."""
    node: Any = ds
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_deepspeed_dict(ds: Any) -> None:
    """Check the type and range of every DeepSpeed key in :data:`DEEPSPEED_KEYS` that ``ds`` has
    (parents before children); ValueError with one line on the first problem."""
    check_object_keys(ds, "the DeepSpeed config")
    for key in DEEPSPEED_KEYS:
        present, value = _lookup(ds, key.path)
        if present:
            check_key(key, value)
