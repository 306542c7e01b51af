"""MLP activations by name (what ``TwoLevelMLP(activation=...)`` and the dense reference accept)."""
from __future__ import annotations

import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
