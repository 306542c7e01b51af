"""Config checks before DeepSpeed sees the dict: DeepSpeed's own parser for DeepSpeed's keys, a
:class:`Key` per ``"two_level"`` key for the project's own section.

:func:`validate_deepspeed_dict` runs DeepSpeed's parser (``DeepSpeedConfig``, whose sections are
DeepSpeed's pydantic models, or ``DeepSpeedInferenceConfig``) outside any process group, and turns
what it refuses into one line naming the key. Around it, what DeepSpeed's parser lets through but
fails on later: a top-level key DeepSpeed does not know (a warning with a "did you mean" from
DeepSpeed's own key list, :func:`deepspeed_keys`; an error under ``"two_level": {"strict_config":
true}``), a number written as a string, a top-level value whose type is not DeepSpeed's default's,
and ``optimizer.params`` whose types are not the optimizer's::

    ValueError: "optimizer.params.lr" is the string "1e-3"; DeepSpeed reads numbers as JSON numbers: write "lr": 1e-3 (no quotes)

:func:`check_key` checks one value against a :class:`Key` (type, range, choices) and names the key,
the value and a valid example; ``TwoLevelConfig`` declares a :class:`Key` per field.

Example:
    >>> validate_deepspeed_dict({"zero_optimization": {"stage": 2}, "fp16": {"enabled": False}})
    >>> validate_deepspeed_dict({"fp16": True})
    Traceback (most recent call last):
    ValueError: "fp16" must be a JSON object, got true; e.g. "fp16": {}
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping


AUTO = "auto"
"""accelerate's / the HF Trainer's placeholder, filled from their own arguments."""
MAX_TIMEOUT_S = 7 * 24 * 3600
"""longest accepted process-group timeout (one week): beyond it a stalled peer is a hang."""


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
    """the only valid values (a callable: read when checked, e.g. the strategy registry)."""
    auto: bool = False
    """the placeholder "auto" (filled by accelerate / the HF Trainer) is accepted."""
    nullable: bool = False
    """JSON null is accepted (means: absent)."""
    infinite: bool = False
    """+Infinity is accepted (accelerate sets ``steps_per_print`` to it: never print)."""


def _choices(key: Key) -> tuple:
    return key.choices() if callable(key.choices) else key.choices


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


def check_key(key: Key, value: Any) -> None:
    """ValueError naming ``key``, ``value`` and a valid example unless ``value`` fits ``key``.

    Example:
        >>> check_key(Key("two_level.timeout_s", "number", "600", low=1), 0)
        Traceback (most recent call last):
        ValueError: "two_level.timeout_s" must be a finite number >= 1, got 0; e.g. "timeout_s": 600
    """
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


# -- the DeepSpeed dict, checked by DeepSpeed's own parser ------------------------------------------
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
"""counted per data-parallel replica by DeepSpeed; checked here and against dp in ``config.py``."""
_BATCH_KEY = Key("", "int", "2", low=1, auto=True, nullable=True)
_FLOAT_TEXT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_OPTIMIZER_FLAGS = ("torch_adam", "adam_w_mode")
"""bool optimizer params DeepSpeed reads itself (``deepspeed.runtime.engine``), not the optimizer."""
_ALSO_READ = {"sequence_parallel_size": 1}
"""keys ``DeepSpeedConfig`` reads only inside a process group (so not while recording outside one)."""
_TYPED = {"steps_per_print": 10}
"""integer keys whose DeepSpeed default is null (so their type is not read from the default)."""
_warned: set[str] = set()


class _Recorder(dict):
    """A dict that records every key read from it, with the default the reader supplied."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self.defaults: dict[str, Any] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        self.defaults.setdefault(key, default)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.defaults.setdefault(key, None)
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        self.defaults.setdefault(key, None)
        return super().__getitem__(key)

    def keys(self) -> "_RecordedKeys":  # DeepSpeed asks ``KEY in param_dict.keys()`` too
        return _RecordedKeys(self)


class _RecordedKeys:
    """``recorder.keys()``: membership tests recorded like the recorder's own."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def __contains__(self, key: object) -> bool:
        return key in self.recorder

    def __iter__(self) -> Iterator[Any]:
        return iter(dict.keys(self.recorder))

    def __len__(self) -> int:
        return len(self.recorder)


@contextlib.contextmanager
def _quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed's logger at ERROR while its parser runs here (the engine says it all again later)."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=None)
def deepspeed_keys(inference: bool = False) -> dict[str, Any]:
    """DeepSpeed's own top-level keys, each with DeepSpeed's default (None where it has none).

    Training: every key ``deepspeed.runtime.config.DeepSpeedConfig`` reads (recorded while it parses a
    minimal config). Inference: the fields (and aliases) of ``DeepSpeedInferenceConfig``.

    Example:
        >>> deepspeed_keys()["gradient_clipping"]
        1.0
    """
    if inference:
        from deepspeed.inference.config import DeepSpeedInferenceConfig

        out: dict[str, Any] = {}
        for name, info in DeepSpeedInferenceConfig.model_fields.items():
            default = None if info.is_required() else info.get_default()
            for key in (name, info.alias):
                if key:
                    out[key] = default if isinstance(default, (bool, int, float)) else None
        return out
    from deepspeed.runtime.config import DeepSpeedConfig

    recorder = _Recorder({"train_micro_batch_size_per_gpu": 1})
    with _quiet_deepspeed():
        DeepSpeedConfig(recorder)
    return {**_ALSO_READ, **{k: v for k, v in recorder.defaults.items() if isinstance(k, str)}}


def unknown_key_message(key: str, known: Iterable[str], where: str) -> str:
    """``unknown key "x" in <where> (did you mean "y"?)``, the suggestion from ``known`` (difflib)."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f'unknown key "{key}" in {where}{hint}'


def _check_unknown(ds: Mapping[str, Any], known: Mapping[str, Any], strict: bool) -> None:
    """Warn once per key on rank 0 (or raise under ``strict_config``) about keys DeepSpeed ignores."""
    for key in ds:
        if key in known:
            continue
        message = unknown_key_message(key, known, "the DeepSpeed config")
        if strict:
            raise ValueError(f'{message}; DeepSpeed would ignore it ("two_level": {{"strict_config": true}})')
        if key not in _warned and os.environ.get("RANK", "0") == "0":
            _warned.add(key)
            print(f'ds-twolevel: warning: {message}; DeepSpeed ignores it ("two_level": {{"strict_config": true}} '
                  "makes this an error)", file=sys.stderr, flush=True)


def _numeric_strings(node: Any, path: str) -> None:
    """A number written as a string (``"5e7"``, ``"1e-3"``) anywhere: JSON numbers have no quotes."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            _numeric_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _numeric_strings(value, f"{path}[{i}]")
    elif isinstance(node, str) and _FLOAT_TEXT.match(node):
        leaf = path.rsplit(".", 1)[-1]
        raise ValueError(f'"{path}" is the string {show(node)}; DeepSpeed reads numbers as JSON numbers: write '
                         f'"{leaf}": {node.strip()} (no quotes)')


def _check_scalars(ds: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """Top-level values against the type of DeepSpeed's default (bool, number) and the batch keys."""
    for key, value in ds.items():
        if key in BATCH_KEYS:
            check_key(dataclasses.replace(_BATCH_KEY, path=key), value)
            continue
        default = _TYPED.get(key, known.get(key))
        if value == AUTO or value is None or default is None or isinstance(default, (str, dict, list)):
            continue
        if isinstance(default, bool):
            check_key(Key(key, "bool", json.dumps(default)), value)
        elif isinstance(value, float) and value == math.inf and key == "steps_per_print":
            continue  # accelerate's DeepSpeedPlugin: never print
        else:
            check_key(Key(key, "int" if isinstance(default, int) else "number", json.dumps(default), low=0), value)


def _optimizer_class(name: str) -> type | None:
    """The ``torch.optim`` class DeepSpeed's optimizer ``type`` names (case-insensitive), if any."""
    import torch.optim

    classes = {n.lower(): c for n, c in vars(torch.optim).items() if isinstance(c, type)}
    return classes.get(name.lower()) if isinstance(name, str) else None


def _check_optimizer(ds: Mapping[str, Any]) -> None:
    """``optimizer.params`` against the signature of the optimizer DeepSpeed builds: a number where the
    default is a number, a list of numbers where it is a tuple, true/false where it is a bool."""
    for section, example in (("optimizer", '{"type": "AdamW", "params": {"lr": 0.001}}'),
                             ("scheduler", '{"type": "WarmupLR", "params": {"warmup_num_steps": 100}}')):
        value = ds.get(section)
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f'"{section}" must be a JSON object, got {show(value)}; e.g. "{section}": {example}')
        if isinstance(value, Mapping) and "params" in value:
            check_object_keys(value["params"], f'"{section}.params"')
    optimizer = ds.get("optimizer")
    if optimizer is None:
        return
    params = optimizer.get("params", {})
    cls = _optimizer_class(optimizer.get("type"))
    defaults = {} if cls is None else {
        k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}
    defaults.update({flag: False for flag in _OPTIMIZER_FLAGS})
    for key, value in params.items():
        default, path = defaults.get(key, inspect.Parameter.empty), f"optimizer.params.{key}"
        if value == AUTO or default is inspect.Parameter.empty or default is None:
            continue  # the HF Trainer fills "auto"; unknown params reach the optimizer, which names them
        if isinstance(default, bool):
            check_key(Key(path, "bool", json.dumps(default)), value)
        elif isinstance(default, (int, float)):
            check_key(Key(path, "number", json.dumps(default)), value)
        elif isinstance(default, tuple):
            ok = (isinstance(value, list) and len(value) == len(default)
                  and all(_kind_ok(Key(path, "number", ""), v) for v in value))
            if not ok:
                raise ValueError(f'"{path}" must be a list of {len(default)} numbers, got {show(value)}; '
                                 f'e.g. "{key}": {json.dumps(list(default))}')


def _locate(ds: Mapping[str, Any], loc: tuple, value: Any) -> str:
    """The dotted path of a pydantic error: ``loc`` is relative to the section DeepSpeed parsed."""
    def at(node: Any, parts: tuple) -> tuple[bool, Any]:
        for part in parts:
            if not isinstance(node, Mapping) or part not in node:
                return False, None
            node = node[part]
        return True, node

    loc = tuple(str(p) for p in loc)
    found, node = at(ds, loc)
    if found and node is value:
        return ".".join(loc)
    for key, section in ds.items():
        found, node = at(section, loc)
        if found and (node is value or node == value):
            return ".".join((key, *loc))
    return ".".join(loc)


def _parse(ds: Mapping[str, Any], inference: bool) -> None:
    """DeepSpeed's own parser on ``ds`` (raises what it raises)."""
    with _quiet_deepspeed():
        if inference:
            from deepspeed.inference.config import DeepSpeedInferenceConfig

            DeepSpeedInferenceConfig(**ds)
        else:
            from deepspeed.runtime.config import DeepSpeedConfig

            DeepSpeedConfig(_for_parser(ds))


def _culprit(ds: Mapping[str, Any], inference: bool, err: Exception) -> str | None:
    """The top-level key without which DeepSpeed's parser no longer raises ``err``'s message."""
    for key in ds:
        try:
            _parse({k: v for k, v in ds.items() if k != key}, inference)
            return key
        except Exception as other:  # noqa: BLE001 - any other outcome: this key is not the cause
            if str(other) != str(err):
                return key
    return None


def _deepspeed_message(err: Exception, ds: Mapping[str, Any], inference: bool) -> str:
    """One line from what DeepSpeed's parser raised, naming the key."""
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic.ValidationError
        first = errors()[0]
        path = _locate(ds, first.get("loc", ()), first.get("input"))
        more = f" (and {len(errors()) - 1} more)" if len(errors()) > 1 else ""
        return (f'"{path}": {first.get("msg")}, got {show(first.get("input"))} '
                f"(DeepSpeed's {err.title}){more}")
    text = " ".join(str(err).split()) or type(err).__name__
    key = _culprit(ds, inference, err)
    if key is not None and not isinstance(ds[key], Mapping) and "mapping" in text:
        return f'"{key}" must be a JSON object, got {show(ds[key])}; e.g. "{key}": {{}}'
    where = f'"{key}": ' if key is not None else ""
    return f"{where}DeepSpeed's config parser refused it: {text}"


_OBJECTS = ("zero_optimization", "tensor_parallel", "checkpoint")
"""sections this package reads as objects (DeepSpeed also takes a legacy ``"zero_optimization": true``)."""


def _sections(ds: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """A section DeepSpeed reads as an object (its default is one) given as something else."""
    for key, value in ds.items():
        section = isinstance(known.get(key), dict) or key in _OBJECTS
        if section and not isinstance(value, Mapping) and value is not None:
            raise ValueError(f'"{key}" must be a JSON object, got {show(value)}; e.g. "{key}": {{}}')


def _for_parser(ds: Mapping[str, Any]) -> dict[str, Any]:
    """``ds`` as DeepSpeed's parser can read it outside a process group: the batch keys (checked here
    and against dp in ``config.py``) replaced by a micro batch of 1."""
    out = {k: v for k, v in ds.items() if k not in BATCH_KEYS}
    out["train_micro_batch_size_per_gpu"] = 1
    return out


def validate_deepspeed_dict(ds: Any, *, inference: bool = False, strict: bool = False) -> None:
    """Check a DeepSpeed dict (without ``"two_level"``) with DeepSpeed's own parser, before any rank talks.

    Unknown top-level keys (not in :func:`deepspeed_keys`) get a one-line warning with a "did you mean",
    an error when ``strict``. A number written as a string, a top-level value of another type than
    DeepSpeed's default, ``optimizer.params`` of another type than the optimizer's signature, and what
    DeepSpeed's pydantic models (``DeepSpeedConfig``, or ``DeepSpeedInferenceConfig`` for
    ``inference``) refuse are ValueErrors with one line naming the key. ``"auto"`` (filled by
    accelerate and the HF Trainer) passes where DeepSpeed's models accept it.

    Example:
        >>> validate_deepspeed_dict({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0})
        >>> validate_deepspeed_dict({"zero_optimization": {"stage": 2, "reduce_bucket_size": "5e7"}})
        Traceback (most recent call last):
        ValueError: "zero_optimization.reduce_bucket_size" is the string "5e7"; DeepSpeed reads numbers as JSON \
numbers: write "reduce_bucket_size": 5e7 (no quotes)
    """
    check_object_keys(ds, "the DeepSpeed config")
    known = deepspeed_keys(inference)
    _check_unknown(ds, known, strict)
    _numeric_strings(ds, "")
    _sections(ds, known)
    _check_scalars(ds, known)
    _check_optimizer(ds)
    try:
        _parse(ds, inference)
    except Exception as err:  # pydantic's ValidationError (a ValueError), asserts, TypeErrors: one line
        raise ValueError(_deepspeed_message(err, ds, inference)) from None
