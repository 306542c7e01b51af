"""ds-twolevel: attention partitioned over n head groups x m head-dim segments (m*n devices).

Every name below is imported on first use (PEP 562 ``__getattr__``), so ``import ds_twolevel`` (and
``ds-twolevel --help``) imports neither torch nor deepspeed; ``ds_twolevel.accelerate`` and
``ds_twolevel.hf_trainer`` resolve the same way without importing accelerate or transformers first.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # core
    "AttentionPartition": "ds_twolevel.sharding.partition", "AttentionSpec": "ds_twolevel.sharding.partition",
    "check_partition": "ds_twolevel.sharding.partition", "feasible_layouts": "ds_twolevel.sharding.partition",
    "AxisGroup": "ds_twolevel.parallel.layout", "TwoLevelAxes": "ds_twolevel.parallel.layout",
    "TwoLevelLayout": "ds_twolevel.parallel.layout", "TwoLevelMesh": "ds_twolevel.parallel.layout",
    "CommCounter": "ds_twolevel.parallel.collectives", "KVCache": "ds_twolevel.layers.cache",
    "TwoLevelAttention": "ds_twolevel.layers.attention", "TwoLevelBlock": "ds_twolevel.layers.block",
    "TwoLevelMLP": "ds_twolevel.layers.mlp", "gather_dense_state": "ds_twolevel.sharding.gather",
    # DeepSpeed integration (deepspeed itself is imported inside these functions)
    "load_checkpoint": "ds_twolevel.deepspeed.checkpoint", "save_checkpoint": "ds_twolevel.deepspeed.checkpoint",
    "dense_state_dict": "ds_twolevel.deepspeed.export", "export_dense": "ds_twolevel.deepspeed.export",
    "fail_fast": "ds_twolevel.deepspeed.faults", "build_mesh": "ds_twolevel.deepspeed.rendezvous",
    "init_inference": "ds_twolevel.deepspeed.runtime", "initialize": "ds_twolevel.deepspeed.runtime",
    "replica_rows": "ds_twolevel.deepspeed.runtime", "zero_init": "ds_twolevel.deepspeed.zero",
    "zero_init_model": "ds_twolevel.deepspeed.zero",
}
"""public name -> the module that defines it."""
_SUBMODULES = ("accelerate", "hf_trainer")
"""integrations reachable as ``ds_twolevel.<name>`` after ``import ds_twolevel``."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"ds_twolevel.{name}")
    else:
        raise AttributeError(f"module 'ds_twolevel' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


# DeepSpeed's CPU shm comm op is JIT-compiled under TORCH_EXTENSIONS_DIR: one directory per Python
# environment (unless the user set one), so environments never rebuild it for each other.
from ds_twolevel.deepspeed.env import use_environment_extensions_dir as _use_environment_extensions_dir  # noqa: E402

_use_environment_extensions_dir()
