"""A toy attention strategy for the registry tests: qk_allgather under another name, registered only
inside :func:`registered`. It wins every tie of "auto" (``TIE_RANK = -1``), so wherever "auto" would
pick qk_allgather it picks the toy - which shows that a new registry entry reaches the layer, the cost
model, the byte-count matrix and "auto" with no edit anywhere else."""
from __future__ import annotations

import sys

from ds_twolevel.strategies import qk_allgather, registry

NAME = "toy_qk"
AUTO = True
UNIVERSAL = True
TIE_RANK = -1
CALLS = [0]
"""how many times :func:`attend` ran in this process."""

why_not = qk_allgather.why_not
collectives = qk_allgather.collectives
ops = qk_allgather.ops
activation_bytes = qk_allgather.activation_bytes


def attend(ctx, q, k, v, mask):
    CALLS[0] += 1
    return qk_allgather.attend(ctx, q, k, v, mask)


def registered():
    """``with registered(): ...`` - the toy is a registry entry inside the block only."""
    return registry.registered(sys.modules[__name__])
