"""Distributed start-up for the DeepSpeed path: read and check the config on every rank, rendezvous
through ``deepspeed.init_distributed`` (gloo on CPU, the configured timeout), agree on the outcome,
and build the dp x n x m mesh.

Example:
    >>> mesh = build_mesh("ds_configs/zero2_n2_m2.json")   # under the deepspeed launcher
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Mapping

import torch.distributed as dist

from ds_twolevel.deepspeed.compat import release_shm_workspace
from ds_twolevel.deepspeed.config import TwoLevelConfig, check_deepspeed_config, load_deepspeed_config, read_json
from ds_twolevel.parallel import watchdog
from ds_twolevel.parallel.agreement import agree, agreement
from ds_twolevel.parallel.layout import TwoLevelMesh


def device_type() -> str:
    """DeepSpeed's accelerator device name ("cpu", "cuda", ...)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def env_world_size() -> int | None:
    """The world size: torch.distributed's once initialised, else the launcher's ``WORLD_SIZE``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def init_distributed(tl: TwoLevelConfig) -> None:
    """``deepspeed.init_distributed`` with the configured backend and timeout (no-op if done), then
    this rank's watchdog (``ds_twolevel.parallel.watchdog``: the rank stops when its launcher exits, and a
    heartbeat lets ``fail_fast`` name a peer that stopped responding).

    Example:
        >>> init_distributed(TwoLevelConfig(n=2, m=2))
    """
    import deepspeed

    from ds_twolevel.deepspeed.env import quiet_launch

    backend = tl.dist_backend or ("gloo" if device_type() == "cpu" else None)
    with quiet_launch():  # the CPU shm op: per-environment build dir, a message while it compiles
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=tl.timeout_s),
                                   verbose=False)
    release_shm_workspace()
    watchdog.start(rank=dist.get_rank(), world_size=dist.get_world_size())
    if device_type() != "cpu":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _validate_on_rank(config: str | os.PathLike | Mapping[str, Any],
                      world: int | None) -> tuple[TwoLevelConfig | None, dict | None, ValueError | None]:
    """(two_level, DeepSpeed dict, None) or (None, None, the ValueError): this rank's reading of the config."""
    try:
        tl, ds = load_deepspeed_config(config)
        if world is not None:
            check_deepspeed_config(tl, ds, world, device_type=device_type())
        return tl, ds, None
    except ValueError as err:  # name this rank's file: another rank may have read another copy
        named = isinstance(config, (str, os.PathLike)) and str(config) not in str(err)
        return None, None, ValueError(f"{str(config)!r}: {err}") if named else err


def build_mesh(config: str | os.PathLike | Mapping[str, Any]) -> TwoLevelMesh:
    """Validate the config, initialise distributed and build the dp x n x m mesh.

    Every rank reads and checks the config itself, then the ranks agree on the outcome
    (``ds_twolevel.parallel.agreement``: one 4-byte all-reduce): a config that fails on any rank — the same
    file everywhere, or one node's copy — raises the same AgreementError on every rank, naming the
    rank(s) and the file, instead of leaving the others waiting for it in the rendezvous or the
    first collective. The mesh is built under a second agreement.

    Example:
        >>> mesh = build_mesh("ds_configs/zero2_n2_m2.json")   # under the deepspeed launcher
    """
    world = env_world_size()
    tl, ds, error = _validate_on_rank(config, world)
    if error is not None and world in (None, 1) and not dist.is_initialized():
        raise error  # a single process: nobody to tell
    # a rank whose config failed still joins the rendezvous (its own timeout, if readable, else the
    # default) so that the agreement can tell every rank
    try:
        init_distributed(tl or _fallback_two_level(config))
    except Exception:
        if error is not None:  # the rendezvous failed too: this rank's own problem comes first
            raise error from None
        raise
    if error is None:
        try:
            layout = check_deepspeed_config(tl, ds, dist.get_world_size(), device_type=device_type())
        except ValueError as err:
            error = err
    agree(error, None, what="validating the DeepSpeed config")
    with agreement(None, what="building the dp x n x m mesh"):
        return layout.build(timeout=datetime.timedelta(seconds=tl.timeout_s))


def _fallback_two_level(config: str | os.PathLike | Mapping[str, Any]) -> TwoLevelConfig:
    """The settings a rank whose config failed uses to reach the agreement: its own timeout and
    backend when those two are valid, the defaults otherwise."""
    try:
        section = dict(read_json(config).get("two_level") or {})
    except (ValueError, OSError, TypeError, AttributeError):
        section = {}
    kept = {}
    for key in ("timeout_s", "dist_backend"):
        try:
            TwoLevelConfig(n=1, m=1, **{key: section[key]})
            kept[key] = section[key]
        except (KeyError, ValueError, TypeError):
            pass
    return TwoLevelConfig(n=1, m=1, **kept)
