"""ds-twolevel: attention partitioned over n head groups x m head-dim segments (m*n devices)."""
from .attention import TwoLevelAttention
from .block import TwoLevelBlock
from .cache import KVCache
from .collectives import CommCounter
from .gather import gather_dense_state
from .layout import AxisGroup, TwoLevelAxes, TwoLevelLayout, TwoLevelMesh
from .mlp import TwoLevelMLP
from .partition import AttentionPartition, AttentionSpec, check_partition, feasible_layouts

__version__ = "0.1.0"

__all__ = [
    "AttentionPartition", "AttentionSpec", "AxisGroup", "CommCounter", "KVCache", "TwoLevelAttention",
    "TwoLevelAxes", "TwoLevelBlock", "TwoLevelLayout", "TwoLevelMLP", "TwoLevelMesh", "check_partition",
    "feasible_layouts", "gather_dense_state",
]

# DeepSpeed integration (deepspeed is imported lazily, inside these functions)
from .deepspeed_integration import (build_mesh, dense_state_dict, export_dense, fail_fast, init_inference,  # noqa: E402
                                    initialize, load_checkpoint, replica_rows, save_checkpoint, zero_init, zero_init_model)
__all__ += ["build_mesh", "dense_state_dict", "export_dense", "fail_fast", "init_inference", "initialize",
            "load_checkpoint", "replica_rows", "save_checkpoint", "zero_init", "zero_init_model"]

# DeepSpeed's CPU shm comm op is JIT-compiled under TORCH_EXTENSIONS_DIR: one directory per Python
# environment (unless the user set one), so environments never rebuild it for each other.
from .deepspeed_env import use_environment_extensions_dir as _use_environment_extensions_dir  # noqa: E402

_use_environment_extensions_dir()
