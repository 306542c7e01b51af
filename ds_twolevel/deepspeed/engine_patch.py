"""DeepSpeedEngine methods as DeepSpeed wrote them, and the hook that wraps them, for code below the hooks.

``engine_hooks`` wraps ``DeepSpeedEngine``'s save/load methods and calls ``checkpoint``; ``checkpoint``
needs DeepSpeed's own (unwrapped) methods and the wrapping done. This module holds what both need, so
``checkpoint`` never imports ``engine_hooks``: the originals (:func:`original`) and the installer
``engine_hooks`` registers when it is imported (:func:`ensure_installed`).

Example:
    >>> ensure_installed()                         # before engine.save_checkpoint
    >>> native_load = original("load_checkpoint")  # DeepSpeed's own method
"""
from __future__ import annotations

from typing import Callable

MARK = "_ds_twolevel_originals"
"""``DeepSpeedEngine`` attribute: name -> DeepSpeed's own method, set when the wrappers are installed."""
_installers: list[Callable[[], None]] = []


def register_installer(install: Callable[[], None]) -> None:
    """``install`` (idempotent) runs at every :func:`ensure_installed` (``engine_hooks`` registers itself)."""
    if install not in _installers:
        _installers.append(install)


def ensure_installed() -> None:
    """Wrap DeepSpeedEngine's methods now (idempotent); ValueError when nothing registered the wrappers."""
    if not _installers:
        raise ValueError("no two-level model in this process (hf_integration.patch_model, load_partitioned or "
                         "ds_twolevel.initialize install DeepSpeed's two-level save/load); patch the model first")
    for install in _installers:
        install()


def original(name: str) -> Callable:
    """DeepSpeed's own (unwrapped) ``DeepSpeedEngine`` method ``name``, or
    ``"get_fp32_state_dict_from_zero_checkpoint"`` (``deepspeed.utils.zero_to_fp32``'s function)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine.__dict__.get(MARK, {}).get(name) or getattr(DeepSpeedEngine, name)
