"""DeepSpeed integration: ``ds_twolevel.initialize`` mirrors ``deepspeed.initialize``.

What it does, in order (every check before any collective):

1. reads the DeepSpeed config through :func:`~ds_twolevel.deepspeed.config.load_deepspeed_config` (the
   ``"two_level"`` section becomes a :class:`~ds_twolevel.deepspeed.config.TwoLevelConfig`) and refuses what
   cannot be honoured (:func:`~ds_twolevel.deepspeed.config.check_deepspeed_config`);
2. initialises distributed through ``deepspeed.init_distributed`` (gloo on CPU) with the
   configured timeout, and builds the dp x n x m mesh;
3. partitions the model in place through the injection policy (Hugging Face models through
   ``hf_integration.patch_model``, anything else through ``policy=``);
4. calls ``deepspeed.initialize(..., mpu=mesh)``: ZeRO shards and averages only over the dp axis,
   and DeepSpeed's gradient-norm code counts ``tensor_model_parallel`` shards on every rank of a
   layer and replicated parameters once (on tensor-parallel rank 0), so the clipped norm is the
   dense one. Replicated parameters need no extra all-reduce: the tp ranks of a replica see the
   same batch and the input all-reduces of the layers make their gradients identical.

Data: the dp replicas get different batches, the n*m ranks of one replica the SAME batch — use
:func:`replica_rows` (or ``training_data=``, whose sampler DeepSpeed builds from the mpu's dp axis).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ds_twolevel.parallel import watchdog
from ds_twolevel.parallel.agreement import agree, agreement
from ds_twolevel.deepspeed.config import TwoLevelConfig, check_deepspeed_config, load_deepspeed_config, read_json, zero_stage
from ds_twolevel.parallel.layout import TwoLevelMesh

Policy = Callable[[nn.Module, TwoLevelMesh, TwoLevelConfig], nn.Module]
EXIT_PEER_LOST = 17
"""Exit status of a rank that stopped because a peer died or stalled (see :func:`fail_fast`)."""


@dataclass
class TwoLevelRuntime:
    """What ``initialize`` attaches to the engine as ``engine.two_level``."""

    config: TwoLevelConfig
    """the validated "two_level" section."""
    mesh: TwoLevelMesh
    """the dp x n x m mesh handed to DeepSpeed as its mpu."""
    ds_config: dict[str, Any]
    """the DeepSpeed dict deepspeed.initialize received (no "two_level" section)."""


# -- distributed set-up ----------------------------------------------------------------------------
def _device_type() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _env_world_size() -> int | None:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def init_distributed(tl: TwoLevelConfig) -> None:
    """``deepspeed.init_distributed`` with the configured backend and timeout (no-op if done), then
    this rank's watchdog (``ds_twolevel.parallel.watchdog``: the rank stops when its launcher exits, and a
    heartbeat lets ``fail_fast`` name a peer that stopped responding)."""
    import deepspeed

    from ds_twolevel.deepspeed.env import quiet_launch

    backend = tl.dist_backend or ("gloo" if _device_type() == "cpu" else None)
    with quiet_launch():  # the CPU shm op: per-environment build dir, a message while it compiles
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=tl.timeout_s),
                                   verbose=False)
    release_shm_workspace()
    watchdog.start(rank=dist.get_rank(), world_size=dist.get_world_size())
    if _device_type() != "cpu":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def release_shm_workspace() -> None:
    """Unlink the name of DeepSpeed's CPU shared-memory all-reduce workspace once every rank has it.

    DeepSpeed's CPU comm backend (deepspeed 0.19.8, ``ops/csrc/cpu/comm/shm.cpp``) creates a 69 MB
    POSIX shared-memory file per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    and never unlinks it: each launch leaks ranks x 69 MB of RAM until reboot (on a 24 GB machine
    about 40 launches fill /dev/shm and ranks start being OOM-killed). After a barrier every rank
    has mapped every other rank's workspace, so removing the names is safe: mappings outlive them.
    Collective when the shm op is loaded (the same on every rank); a no-op otherwise.
    """
    from deepspeed.comm import comm as ds_comm  # the module holding the live ``cdb`` global

    backend = getattr(ds_comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None or not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # shm not used (LOCAL_SIZE != world size) or already released
        pass


def _validate_on_rank(config: str | os.PathLike | Mapping[str, Any],
                      world: int | None) -> tuple[TwoLevelConfig | None, dict | None, ValueError | None]:
    """(two_level, DeepSpeed dict, None) or (None, None, the ValueError): this rank's reading of the config."""
    try:
        tl, ds = load_deepspeed_config(config)
        if world is not None:
            check_deepspeed_config(tl, ds, world, device_type=_device_type())
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
    world = _env_world_size()
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
            layout = check_deepspeed_config(tl, ds, dist.get_world_size(), device_type=_device_type())
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


# -- the injection policy --------------------------------------------------------------------------
def _is_zero_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _is_patched(model: nn.Module) -> bool:
    from ds_twolevel.layers.attention import TwoLevelAttention

    return any(isinstance(mod, TwoLevelAttention) for mod in model.modules())


def default_policy(model: nn.Module, mesh: TwoLevelMesh, tl: TwoLevelConfig) -> nn.Module:
    """Partition a Hugging Face model in place through ``hf_integration.patch_model``.

    Anything else has no default policy: pass ``policy=`` to :func:`initialize`.
    """
    if not hasattr(model, "config"):
        raise ValueError(
            f"no two-level injection policy for {type(model).__name__} (not a Hugging Face PreTrainedModel); "
            "pass policy=lambda model, mesh, cfg: ... that partitions it")
    try:
        from hf_integration import patch_model
    except ImportError as err:
        raise ValueError(
            f"no two-level injection policy for {type(model).__name__}: hf_integration.patch_model is not "
            f"importable ({err}); pass policy=... or a model ds_twolevel knows") from err
    out = patch_model(model, mesh, strict=tl.strict, strategy=tl.strategy, kv_replication=tl.kv_replication,
                      probe=tl.probe)
    return model if out is None or not isinstance(out, nn.Module) else out


@torch.no_grad()
def _sync_dense_weights(model: nn.Module, mesh: TwoLevelMesh) -> None:
    """Broadcast every (dense, not ZeRO-partitioned) tensor from tp rank 0 over the tp axis."""
    tp = mesh.axes.tp
    if tp.size == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        if not hasattr(tensor, "ds_id"):
            dist.broadcast(tensor.data, group=tp.group, group_src=0)


def patch(model: nn.Module, mesh: TwoLevelMesh, tl: TwoLevelConfig, policy: Policy | None = None) -> nn.Module:
    """Apply the injection policy (gathering ZeRO-3 partitioned dense weights while it reads them).

    A model that already holds two-level layers is returned as is.
    """
    from ds_twolevel.deepspeed.compat import install

    install()  # DeepSpeed's save/load methods, right for two-level engines
    if _is_patched(model):
        return model
    policy = policy or default_policy
    if tl.sync_init:
        _sync_dense_weights(model, mesh)
    if not _is_zero_partitioned(model):
        return policy(model, mesh, tl)
    import deepspeed

    # zero.Init partitioned the dense model over dp: gather it while the policy slices it; the
    # new (n*m-partitioned) layers' parameters are converted to ZeRO-3 by deepspeed.initialize.
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return policy(model, mesh, tl)


@contextlib.contextmanager
def zero_init(config: str | os.PathLike | Mapping[str, Any], mesh: TwoLevelMesh) -> Iterator[None]:
    """``deepspeed.zero.Init`` partitioning over the mesh's dp axis only (ZeRO stage 3).

    Import model classes (e.g. transformers) before entering it.

    Example:
        >>> mesh = ds_twolevel.build_mesh(cfg_path)
        >>> with ds_twolevel.zero_init(cfg_path, mesh):
        ...     model = MyModel()   # Hugging Face models: zero_init_model (it also runs their weight init)
        >>> engine, *_ = ds_twolevel.initialize(model=model, config=cfg_path, mesh=mesh)
    """
    import deepspeed

    _, ds = load_deepspeed_config(config)
    if zero_stage(ds) != 3:
        raise ValueError(f"zero_init needs ZeRO stage 3, the config has stage {zero_stage(ds)}; "
                         'set "zero_optimization": {"stage": 3}')
    with deepspeed.zero.Init(config_dict_or_path=ds, mpu=mesh, data_parallel_group=mesh.get_data_parallel_group()):
        yield


def zero_init_model(factory: Callable[[], nn.Module], config: str | os.PathLike | Mapping[str, Any],
                    mesh: TwoLevelMesh) -> nn.Module:
    """``factory()`` under :func:`zero_init`; Hugging Face models then get their weight init.

    transformers' own ZeRO-3 path cannot be used: it partitions over the whole world (ranks of
    one layer would mix different shards) and initialises on global rank 0 only. Here every rank
    runs ``_init_weights`` on gathered parameters: with the same seed every rank draws the same
    values. (They are a valid init, but not the same draw as ``factory()`` without ZeRO: the
    order in which random numbers are consumed differs.)

    Example:
        >>> model = ds_twolevel.zero_init_model(lambda: LlamaForCausalLM(cfg), "ds_configs/zero3_init_n2_m2.json", mesh)
    """
    try:
        from transformers import PreTrainedModel
        from transformers import initialization as hf_init
    except ImportError:  # no transformers: nothing HF-specific to do
        PreTrainedModel, hf_init = None, None
    with zero_init(config, mesh):
        model = factory()  # post_init ran on empty shards: it drew no random numbers
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        _init_weights_gathered(model, PreTrainedModel, hf_init)
    return model


@torch.no_grad()
def _init_weights_gathered(model: nn.Module, pretrained_cls: type, hf_init: Any) -> None:
    """transformers' ``initialize_weights`` order (children first), each module's parameters gathered."""
    import deepspeed

    remote = model.is_remote_code()
    for module in model.modules():  # post_init marked the (empty) modules initialised
        module._is_hf_initialized = False

    def apply(module: nn.Module, fn: Callable) -> None:
        for child in module.children():
            apply(child, child._initialize_weights if isinstance(child, pretrained_cls) else fn)
        params = list(module.parameters(recurse=False))
        params += [p for c in module.children() if not isinstance(c, pretrained_cls) for p in c.parameters(recurse=False)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0) if params else contextlib.nullcontext():
            fn(module, remote)  # on every rank: identical values, rank 0 of each dp group keeps them

    with hf_init.guard_torch_init_functions():
        apply(model, model._initialize_weights)


# -- initialize ------------------------------------------------------------------------------------
def _resolve_config(config: Any, args: Any) -> tuple[Any, Any]:
    """DeepSpeed accepts the config via ``config=`` or ``args.deepspeed_config``: take either."""
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if config is not None and from_args is not None:
        raise ValueError("the DeepSpeed config was given twice (config= and args.deepspeed_config); pass one")
    if config is None and from_args is None:
        raise ValueError("no DeepSpeed config: pass config= (path or dict) or --deepspeed_config")
    if from_args is not None:
        args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})
    return (config if config is not None else from_args), args


def _record_stage0_grad_norm(engine: Any) -> None:
    """Stage 0 fp32 clips through ``clip_grad_norm_`` but drops the norm; keep it for
    ``engine.get_global_grad_norm()`` like the ZeRO optimizers do."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record


def initialize(model: nn.Module | None = None, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
               args: Any = None, mesh: TwoLevelMesh | None = None, policy: Policy | None = None,
               **deepspeed_kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """Partition ``model`` m x n and wrap it in a DeepSpeed engine; returns DeepSpeed's own tuple
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    Args:
        model: a dense model (Hugging Face, or any model ``policy`` partitions) or one already partitioned.
        config: DeepSpeed config (path or dict) with a ``"two_level"`` section; or ``args.deepspeed_config``.
        args: as for ``deepspeed.initialize`` (``local_rank``, ``deepspeed_config``).
        mesh: a mesh from :func:`build_mesh` to reuse; built from the config otherwise.
        policy: ``policy(model, mesh, two_level_config) -> model``; default :func:`default_policy`.
        **deepspeed_kwargs: passed to ``deepspeed.initialize`` (optimizer, model_parameters,
            training_data, lr_scheduler, collate_fn, ...). ``mpu`` is ours.

    Example:
        >>> engine, optimizer, _, _ = ds_twolevel.initialize(model=model, config="ds_configs/zero2_n2_m2.json")
        >>> loss = engine(ids); engine.backward(loss); engine.step()
    """
    import deepspeed

    if model is None:
        raise ValueError("initialize needs model=")
    if "mpu" in deepspeed_kwargs:
        raise ValueError("mpu= is set by ds_twolevel.initialize (the two-level mesh); do not pass it")
    config, args = _resolve_config(config, args)
    tl, ds = load_deepspeed_config(config)
    if mesh is None:
        mesh = build_mesh(config)
    elif (mesh.layout.n, mesh.layout.m) != (tl.n, tl.m):
        raise ValueError(f"mesh has n={mesh.layout.n}, m={mesh.layout.m} but the config says n={tl.n}, m={tl.m}")
    else:
        check_deepspeed_config(tl, ds, dist.get_world_size(), device_type=_device_type())
    if _is_zero_partitioned(model) and zero_stage(ds) != 3:
        raise ValueError(f"the model was built under deepspeed.zero.Init but the config has ZeRO stage {zero_stage(ds)};"
                         ' build it normally or set "zero_optimization": {"stage": 3}')
    model = patch(model, mesh, tl, policy)
    if "model_parameters" not in deepspeed_kwargs and deepspeed_kwargs.get("optimizer") is None:
        deepspeed_kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
    from ds_twolevel import guard

    if getattr(model, "_twolevel_guard", None) is None:  # a policy= model: patch_model installs it otherwise
        guard.install(model, mesh)
    # "tensor_parallel.autotp_size" = n*m (accepted by check_deepspeed_config) is for accelerate and the
    # Trainer; with mpu=mesh DeepSpeed needs no groups of its own
    ds = {k: v for k, v in ds.items() if k != "tensor_parallel"}
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config=ds, args=args, mpu=mesh,
                                                                **deepspeed_kwargs)
    guard.check_now(model, wrapper=engine)  # groups and shards, before the first step (collective)
    engine.two_level = TwoLevelRuntime(tl, mesh, ds)
    if zero_stage(ds) == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        _record_stage0_grad_norm(engine)
    return engine, optimizer, loader, scheduler


# -- inference -------------------------------------------------------------------------------------
def init_inference(model: nn.Module, config: str | os.PathLike | Mapping[str, Any], *, mesh: TwoLevelMesh | None = None,
                   policy: Policy | None = None) -> Any:
    """``deepspeed.init_inference`` with the two-level policy: returns DeepSpeed's InferenceEngine.

    The config is a DeepSpeed *inference* config (``dtype``, ``replace_with_kernel_inject``, ...)
    plus the ``"two_level"`` section. Our policy does the tensor parallelism, so DeepSpeed's own
    (``tensor_parallel.tp_size``, kernel injection) must stay off.

    Example:
        >>> engine = ds_twolevel.init_inference(model, "ds_configs/inference_n2_m2.json")
        >>> out = engine.generate(ids, max_new_tokens=16, do_sample=False)
    """
    import deepspeed

    tl, ds = load_deepspeed_config(config)
    tp_size = int((ds.get("tensor_parallel") or {}).get("tp_size", 1) or 1)
    if tp_size > 1:
        raise ValueError(f'"tensor_parallel.tp_size" = {tp_size} contradicts "two_level" (n*m = {tl.tp_size} ranks '
                         'share each layer already); remove "tensor_parallel"')
    if ds.get("replace_with_kernel_inject"):
        raise ValueError('"replace_with_kernel_inject": true replaces the attention we partition; set it to false')
    if mesh is None:
        world = _env_world_size()
        if world is not None:
            tl.layout(world)
        init_distributed(tl)
        mesh = tl.layout(dist.get_world_size()).build(timeout=datetime.timedelta(seconds=tl.timeout_s))
    model = patch(model, mesh, tl, policy)
    engine = deepspeed.init_inference(model, config={**ds, "tensor_parallel": {"tp_size": 1},
                                                     "replace_with_kernel_inject": False})
    engine.two_level = TwoLevelRuntime(tl, mesh, ds)
    return engine


# -- data ------------------------------------------------------------------------------------------
def replica_rows(batch: torch.Tensor, mesh: TwoLevelMesh) -> torch.Tensor:
    """This data-parallel replica's rows of a global batch (the same rows on all n*m ranks of it).

    Example:
        >>> ids = replica_rows(global_ids, engine.two_level.mesh)   # (B/dp, s)
    """
    dp = mesh.get_data_parallel_world_size()
    if batch.shape[0] % dp:
        raise ValueError(f"global batch of {batch.shape[0]} rows does not split over dp = {dp} replicas; "
                         f"use a multiple of {dp}")
    rows = batch.shape[0] // dp
    start = mesh.get_data_parallel_rank() * rows
    return batch[start:start + rows]


# -- failures --------------------------------------------------------------------------------------
_PEER_FAILURE_HINTS = ("timed out", "timeout", "connection closed", "connection reset", "connection refused",
                       "broken pipe", "closed by peer", "communicator was aborted")


def _is_peer_failure(err: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(h in str(err).lower() for h in _PEER_FAILURE_HINTS)


@contextlib.contextmanager
def fail_fast(timeout_s: float, *, what: str = "training") -> Iterator[None]:
    """Turn a collective that fails because a peer died or stalled into a clear message and an exit.

    A rank waiting on a dead or stalled peer gets an error from the backend within
    ``timeout_s`` (the process-group timeout set from ``"two_level.timeout_s"``); this names the
    rank(s) that stopped (their heartbeat stood still, ``ds_twolevel.parallel.watchdog``; a few seconds),
    prints one line and exits with :data:`EXIT_PEER_LOST` without tearing down the process group
    (which could wait on the dead peer again). Wrap any phase: ``what="loading"``, ``"saving"``,
    ``"generating"``.

    Example:
        >>> with ds_twolevel.fail_fast(engine.two_level.config.timeout_s):
        ...     train(engine)
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - filtered below, anything else re-raised
        if not _is_peer_failure(err):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        peers = watchdog.describe_peers(watchdog.unresponsive_peers())
        print(f"[ds_twolevel] rank {rank}: a peer rank died or stopped responding during {what}: {peers}; a "
              f"collective failed (timeout {timeout_s:g} s): {first}. Stopping this rank (exit {EXIT_PEER_LOST}).",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(engine: Any, save_dir: str | os.PathLike, tag: str | None = None,
                    client_state: dict[str, Any] | None = None) -> Path:
    """``engine.save_checkpoint`` made atomic in every window, with the layout recorded
    (``two_level.json``); see :mod:`ds_twolevel.deepspeed.checkpoint`.

    Example:
        >>> ds_twolevel.save_checkpoint(engine, "ckpt", client_state={"step": step})
    """
    from ds_twolevel.deepspeed.checkpoint import save_checkpoint as save

    return save(engine, save_dir, tag, client_state)


def load_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: str | None = None, **kwargs: Any) -> tuple[str, dict]:
    """Resume from the newest complete checkpoint (or ``tag``): refused with both layouts named when
    it holds another model, resharded exactly when dp x n x m (or the ZeRO stage) changed; see
    :mod:`ds_twolevel.deepspeed.checkpoint`. Returns (path, client_state).

    Example:
        >>> _, client = ds_twolevel.load_checkpoint(engine, "ckpt")   # any layout of the same model
    """
    from ds_twolevel.deepspeed.checkpoint import load_checkpoint as load
    from ds_twolevel.deepspeed.compat import install

    install()
    return load(engine, load_dir, tag, **kwargs)


# -- dense export ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _gathered(module: nn.Module) -> Iterator[None]:
    """ZeRO-3: materialise every parameter over the dp axis; otherwise nothing to do."""
    if not _is_zero_partitioned(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def dense_state_dict(engine_or_model: Any) -> dict[str, torch.Tensor]:
    """The trained model's dense weights (names of the unpatched model), on every rank.

    Collective over the whole world (ZeRO-3 gathers over dp, shards gather over tp through
    ``hf_integration.dense_state_dict``).
    """
    from hf_integration import dense_state_dict as hf_dense_state_dict

    module = getattr(engine_or_model, "module", engine_or_model)
    with _gathered(module):
        state = hf_dense_state_dict(module)
        return {k: v.detach().clone() for k, v in state.items()}  # ZeRO-3 frees the gathered storage on exit


def export_dense(engine_or_model: Any, out_dir: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Write the trained model as a standard dense Hugging Face checkpoint (``from_pretrained``-able).

    Collective (every rank calls it): ZeRO-3 parameters are gathered over dp, shards over tp
    (``hf_integration.save_dense_pretrained``); rank 0 writes into a temporary directory and
    renames it, so a killed export never leaves half a checkpoint at ``out_dir``.

    Example:
        >>> ds_twolevel.export_dense(engine, "out/dense")   # AutoModelForCausalLM.from_pretrained("out/dense")
    """
    from hf_integration import save_dense_pretrained

    module = getattr(engine_or_model, "module", engine_or_model)
    with _gathered(module):
        return save_dense_pretrained(module, out_dir, **save_pretrained_kwargs)
