"""ds-twolevel: attention partitioned over n head groups x m head-dim segments (m*n devices)."""
from ds_twolevel.layers.attention import TwoLevelAttention
from ds_twolevel.layers.block import TwoLevelBlock
from ds_twolevel.layers.cache import KVCache
from ds_twolevel.parallel.collectives import CommCounter
from ds_twolevel.sharding.gather import gather_dense_state
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelAxes, TwoLevelLayout, TwoLevelMesh
from ds_twolevel.layers.mlp import TwoLevelMLP
from ds_twolevel.sharding.partition import AttentionPartition, AttentionSpec, check_partition, feasible_layouts

__version__ = "0.1.0"

__all__ = [
    "AttentionPartition", "AttentionSpec", "AxisGroup", "CommCounter", "KVCache", "TwoLevelAttention",
    "TwoLevelAxes", "TwoLevelBlock", "TwoLevelLayout", "TwoLevelMLP", "TwoLevelMesh", "check_partition",
    "feasible_layouts", "gather_dense_state",
]

# DeepSpeed integration (deepspeed is imported lazily, inside these functions)
from ds_twolevel.deepspeed.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ds_twolevel.deepspeed.export import dense_state_dict, export_dense  # noqa: E402
from ds_twolevel.deepspeed.faults import fail_fast  # noqa: E402
from ds_twolevel.deepspeed.rendezvous import build_mesh  # noqa: E402
from ds_twolevel.deepspeed.runtime import init_inference, initialize, replica_rows  # noqa: E402
from ds_twolevel.deepspeed.zero import zero_init, zero_init_model  # noqa: E402
__all__ += ["build_mesh", "dense_state_dict", "export_dense", "fail_fast", "init_inference", "initialize",
            "load_checkpoint", "replica_rows", "save_checkpoint", "zero_init", "zero_init_model"]

# DeepSpeed's CPU shm comm op is JIT-compiled under TORCH_EXTENSIONS_DIR: one directory per Python
# environment (unless the user set one), so environments never rebuild it for each other.
from ds_twolevel.deepspeed.env import use_environment_extensions_dir as _use_environment_extensions_dir  # noqa: E402

_use_environment_extensions_dir()

_LAZY = ("accelerate", "hf_trainer")
"""Submodules that import accelerate / transformers: loaded on first attribute access, not at import."""


def __getattr__(name: str):
    """``ds_twolevel.accelerate`` and ``ds_twolevel.hf_trainer`` after a plain ``import ds_twolevel``."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
