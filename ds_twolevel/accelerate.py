"""accelerate with a two-level model: DeepSpeed's tensor-parallel groups are the ranks of one layer.

accelerate trains a patched model exactly through its DeepSpeed integration when DeepSpeed is told
``"tensor_parallel": {"autotp_size": n*m}``: DeepSpeed then builds (dp, tp) groups with tp fastest,
which are exactly the two-level layout's (``rank = (dp*n + i)*m + j``), so ZeRO shards and averages
only over the dp replicas and the gradient norm counts every shard once; and accelerate's dataloader
gives one batch per tensor-parallel group. ``hf_integration.patch_model`` sets
``model.ds_autotp_parsed = True`` so that DeepSpeed's AutoTP leaves the partitioned model alone.
Plain accelerate (``MULTI_CPU``/``MULTI_GPU``, i.e. DDP over the world) is refused by the guard.

Example:
    >>> accelerator = ds_twolevel.accelerate.accelerator("ds_configs/zero2_n2_m2.json")
    >>> mesh = ds_twolevel.accelerate.build_mesh(accelerator)
    >>> patch_model(model, mesh)
    >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

With ``"two_level": {"sequence_parallel": true}`` the model takes each rank's shard of every batch:
:class:`TwoLevelAccelerator` (what :func:`accelerator` makes) wraps every loader ``prepare`` returns so
that it yields them (:class:`hf_integration.sequence_data.SequenceShardLoader`).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
from typing import Any, Callable, Iterator, Mapping

import torch
from accelerate import Accelerator

from ds_twolevel.parallel import watchdog
from ds_twolevel.deepspeed.config import (SECTION, TwoLevelConfig, check_deepspeed_config, load_deepspeed_config,
                                          read_json, sequence_parallel_size)
from ds_twolevel.parallel.layout import TwoLevelMesh

def deepspeed_config(config: str | os.PathLike | Mapping[str, Any], *, world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed dict accelerate and the HF Trainer should get: ``"two_level"`` kept (validated),
    ``"tensor_parallel": {"autotp_size": n*m}`` filled in. With ``world_size`` (default: the
    launcher's ``WORLD_SIZE``) the layout is checked too.

    Example:
        >>> TrainingArguments("out", deepspeed=ds_twolevel.accelerate.deepspeed_config(cfg_path))
    """
    tl, ds = load_deepspeed_config(config)
    refuse_ulysses(ds)
    ds["tensor_parallel"] = {**(ds.get("tensor_parallel") or {}), "autotp_size": tl.tp_size}
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "0") or 0)
    if world:
        check_deepspeed_config(tl, ds, world, device_type=_device_type())
    return {**ds, SECTION: tl.to_dict()}


def refuse_ulysses(ds: Mapping[str, Any]) -> None:
    """ValueError for DeepSpeed's ``"sequence_parallel_size"`` > 1 through accelerate or the HF Trainer: their
    Ulysses path (``ParallelismConfig(sp_backend="deepspeed")``) registers DeepSpeed's own sequence-parallel
    groups over the world, which ignore the n*m ranks of a layer. The composition runs through
    ``ds_twolevel.initialize``."""
    sp = sequence_parallel_size(ds)
    if sp > 1:
        raise ValueError(f'"sequence_parallel_size" = {sp} (Ulysses composed with two-level) runs through '
                         "ds_twolevel.initialize (or recipes/train.py under the deepspeed launcher), not through "
                         "accelerate or the HF Trainer, whose Ulysses groups ignore the two-level ones; remove "
                         '"sequence_parallel_size" here, or train with ds_twolevel.initialize')


def deepspeed_plugin(config: str | os.PathLike | Mapping[str, Any], **plugin_kwargs: Any) -> Any:
    """accelerate's ``DeepSpeedPlugin`` for a config with a ``"two_level"`` section (:func:`deepspeed_config`).

    ``zero3_init_flag`` defaults to False: transformers' own ``zero.Init`` partitions over the whole
    world (ranks of one layer would mix shards); use ``ds_twolevel.zero_init_model`` instead.

    Example:
        >>> Accelerator(deepspeed_plugin=deepspeed_plugin("ds_configs/zero3_n2_m2.json"), kwargs_handlers=kwargs_handlers(cfg))
    """
    from accelerate.utils import DeepSpeedPlugin

    plugin_kwargs.setdefault("zero3_init_flag", False)
    return DeepSpeedPlugin(hf_ds_config=deepspeed_config(config), **plugin_kwargs)


def kwargs_handlers(config: str | os.PathLike | Mapping[str, Any] | None = None) -> list[Any]:
    """``[InitProcessGroupKwargs(...)]``: the configured timeout, and gloo on CPU (without it every
    process of a DeepSpeed run on CPU believes it is rank 0 of 1 while the engine sees all ranks).

    Example:
        >>> Accelerator(deepspeed_plugin=deepspeed_plugin(cfg), kwargs_handlers=kwargs_handlers(cfg))
    """
    from accelerate.utils import InitProcessGroupKwargs

    tl = load_deepspeed_config(config)[0] if config is not None else TwoLevelConfig(n=1, m=1)
    backend = tl.dist_backend or ("gloo" if _device_type() == "cpu" else None)
    return [InitProcessGroupKwargs(backend=backend, timeout=datetime.timedelta(seconds=tl.timeout_s))]


def accelerator(config: str | os.PathLike | Mapping[str, Any], **accelerator_kwargs: Any) -> "TwoLevelAccelerator":
    """:class:`TwoLevelAccelerator` with :func:`deepspeed_plugin` and :func:`kwargs_handlers` of ``config``.

    Example:
        >>> acc = accelerator("ds_configs/zero2_n2_m2.json")
        >>> acc.distributed_type
        <DistributedType.DEEPSPEED: 'DEEPSPEED'>
    """
    from ds_twolevel.deepspeed.env import quiet_launch

    handlers = kwargs_handlers(config) + list(accelerator_kwargs.pop("kwargs_handlers", []))
    with quiet_launch():  # accelerate calls deepspeed.init_distributed: the shm op with a message, once per node
        return TwoLevelAccelerator(deepspeed_plugin=deepspeed_plugin(config), kwargs_handlers=handlers,
                                   **accelerator_kwargs)


class TwoLevelAccelerator(Accelerator):
    """accelerate's ``Accelerator`` that feeds a sequence-parallel model its shards.

    With ``"two_level": {"sequence_parallel": true}`` in the DeepSpeed config, every DataLoader that
    ``prepare`` returns yields this rank's shard of each batch
    (:class:`hf_integration.sequence_data.SequenceShardLoader`: labels shifted before the cut, s padded to
    a multiple of n*m, global ``position_ids``, ``num_items_in_batch``; accelerate's loader gives every
    rank of a layer the same batch, so no collective is needed to cut it). ``model(**batch).loss`` is then
    this rank's share of the batch's loss: ``accelerator.backward`` it as it is (no gradient is scaled by
    the group size) and log ``hf_integration.sequence_data.whole_loss(loss, mesh)``. Without the switch it
    is accelerate's ``Accelerator``.

    Example:
        >>> acc = ds_twolevel.accelerate.accelerator({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
        ...     "two_level": {"n": 2, "m": 2, "sequence_parallel": True, "vocab_parallel": True}})
        >>> patch_model(model, build_mesh(acc), sequence_parallel=True, vocab_parallel=True)
        >>> model, opt, loader = acc.prepare(model, opt, loader)   # loader: dicts of whole sequences
    """

    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        """accelerate's ``prepare``; under sequence parallelism its loaders yield this rank's shards.

        A model whose ``sequence_parallel`` / ``vocab_parallel`` patching contradicts the config is refused
        (ValueError) before anything is wrapped."""
        tl = settings_of(getattr(self.state, "deepspeed_plugin", None))
        models = [obj for obj in args if _is_module(obj)]
        for model in models:
            check_switches(model, tl, where="Accelerator.prepare")
        result = super().prepare(*args, device_placement=device_placement)
        if tl is None or not tl.sequence_parallel:
            return result
        for engine in self._models:
            allow_sharded_inputs(engine)
        loaders = [i for i, obj in enumerate(args) if _is_loader(obj)]
        if not loaders:
            return result
        model = next((m for m in [*models, *self._models] if _sp_state(m) is not None), None)
        if model is None:
            raise ValueError("Accelerator.prepare: the DeepSpeed config says \"two_level\": {\"sequence_parallel\": "
                             "true} but no model patched with sequence_parallel=True was prepared with or before this "
                             "dataloader; prepare(model, optimizer, loader) together")
        items = list(result) if isinstance(result, tuple) else [result]
        for i in loaders:
            items[i] = shard_loader(items[i], model)
        return tuple(items) if isinstance(result, tuple) else items[0]


def settings_of(source: Any) -> TwoLevelConfig | None:
    """The ``"two_level"`` section of a DeepSpeed config (dict, path, ``DeepSpeedPlugin``,
    ``HfTrainerDeepSpeedConfig``), None when there is none.

    Example:
        >>> settings_of(accelerator.state.deepspeed_plugin).sequence_parallel
        True
    """
    config = getattr(source, "deepspeed_config", None) or getattr(source, "config", None) or source
    if isinstance(config, (str, os.PathLike)):
        config = read_json(config)
    if not isinstance(config, Mapping) or SECTION not in config:
        return None
    return load_deepspeed_config(config)[0]


def check_switches(model: Any, tl: TwoLevelConfig | None, *, where: str) -> None:
    """ValueError when a partitioned model's ``sequence_parallel`` / ``vocab_parallel`` patching is not what
    the config's ``"two_level"`` section says (sharded batches fed to a model that reads them as whole
    sequences would train it wrongly). No-op for a model that is not partitioned, or without a config.

    Example:
        >>> check_switches(model, settings_of(cfg), where="Accelerator.prepare")
    """
    from hf_integration.partitioned import partitioned_layers
    from hf_integration.vocab_parallel import vocab_head

    if tl is None or not partitioned_layers(model):
        return
    patched = {"sequence_parallel": _sp_state(model) is not None, "vocab_parallel": vocab_head(model) is not None}
    wrong = [k for k, v in patched.items() if v != getattr(tl, k)]
    if wrong:
        want = ", ".join(f"{k}={getattr(tl, k)}" for k in patched)
        raise ValueError(f"{where}: {type(_unwrap(model)).__name__} was patched with "
                         f"{', '.join(f'{k}={patched[k]}' for k in wrong)} but the DeepSpeed config's \"two_level\" "
                         f"section says {', '.join(f'{k}={getattr(tl, k)}' for k in wrong)}; patch it as the config "
                         f"says (hf_integration.patch_model(model, mesh, {want})) or change the config")


def shard_loader(loader: Any, model: Any) -> Any:
    """``loader`` yielding this rank's shard of each batch, for ``model`` patched with ``sequence_parallel=True``.

    Example:
        >>> loader = shard_loader(accelerator.prepare(loader), model)
    """
    from hf_integration.sequence_data import SequenceShardLoader

    return SequenceShardLoader(loader, _sp_state(model).mesh, pad_token_id=_pad_token_id(model))


def _pad_token_id(model: Any) -> int:
    """The id ``shard_batch`` pads a sequence with (masked and ignored: any id is exact; the model's own if set)."""
    pad = getattr(getattr(_unwrap(model), "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def allow_sharded_inputs(engine: Any) -> None:
    """Remove the check of the first forward's inputs that DeepSpeed's engine puts on a model when
    ``tensor_parallel.autotp_size`` is set (``first_dataloader_check``: every rank of a tp group must be given
    equal tensors). Under sequence parallelism the ranks of a layer hold different tokens by design; the
    two-level guard (``ds_twolevel.guard``) still checks at every forward what they must agree on. No-op
    for an engine without that check or whose model is not sequence-parallel.

    Example:
        >>> allow_sharded_inputs(trainer.model_wrapped)
    """
    handle = getattr(engine, "first_dataloader_check", None)
    if handle is not None and _sp_state(engine) is not None:
        handle.remove()


def _sp_state(model: Any) -> Any:
    from hf_integration.sequence_parallel import sequence_parallel_state

    return sequence_parallel_state(model)


def _unwrap(model: Any) -> Any:
    while getattr(model, "module", None) is not None:
        model = model.module
    return model


def _is_module(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module)


def _is_loader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


def build_mesh(source: Any) -> TwoLevelMesh:
    """The dp x n x m mesh of a running accelerate job (``Accelerator``, ``DeepSpeedPlugin`` or config).

    Distributed must be initialised (by ``Accelerator(...)``); the layout comes from the
    ``"two_level"`` section. Starts this rank's watchdog (:mod:`ds_twolevel.parallel.watchdog`: the rank stops
    when its launcher exits; a heartbeat names a peer that stopped answering), as
    ``ds_twolevel.build_mesh`` does.

    Example:
        >>> mesh = build_mesh(accelerator)      # then hf_integration.patch_model(model, mesh)
    """
    import torch.distributed as dist

    plugin = getattr(getattr(source, "state", None), "deepspeed_plugin", None) or source
    config = getattr(plugin, "deepspeed_config", plugin)
    if not isinstance(config, Mapping) or SECTION not in config:
        config = deepspeed_config(config)
    tl, ds = load_deepspeed_config(config)
    refuse_ulysses(ds)
    if not dist.is_initialized():
        raise ValueError("build_mesh needs torch.distributed initialised: create the Accelerator first")
    layout = tl.layout(dist.get_world_size())
    mesh = layout.build(timeout=datetime.timedelta(seconds=tl.timeout_s))
    watchdog.start(rank=dist.get_rank(), world_size=dist.get_world_size())  # as ds_twolevel.build_mesh does
    return mesh


# -- the check at prepare() ---------------------------------------------------------------------------
def prepare_problem(accelerator: Any, mesh: TwoLevelMesh) -> str | None:
    """Why ``accelerator`` cannot train a model partitioned on ``mesh`` (None when it can): accelerate
    counting another number of processes than torch.distributed (on CPU without the gloo handler every
    process believes it is rank 0 of 1), Ulysses (:func:`refuse_ulysses`, or ``ParallelismConfig(sp_size > 1)``),
    or a DeepSpeed config whose ``tensor_parallel.autotp_size`` is not n*m (the two-level JSON given as it is,
    without :func:`deepspeed_config`)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if accelerator.num_processes != world:
        return (f"accelerate counts {accelerator.num_processes} process(es) (Accelerator.num_processes, distributed "
                f"type {accelerator.distributed_type}) but torch.distributed has {world} ranks: on CPU accelerate "
                "needs the gloo backend; pass kwargs_handlers=[InitProcessGroupKwargs(backend=\"gloo\")] "
                "(ds_twolevel.accelerate.kwargs_handlers(cfg)) or use ds_twolevel.accelerate.accelerator(cfg)")
    sp = getattr(getattr(accelerator, "parallelism_config", None), "sp_size", 1) or 1
    if sp > 1:
        return (f"accelerate's ParallelismConfig(sp_size={sp}) registers DeepSpeed's own Ulysses groups over the world, "
                "which ignore the n*m ranks of a layer; Ulysses composed with two-level (\"sequence_parallel_size\" in "
                "the DeepSpeed config) runs through ds_twolevel.initialize: drop sp_size here")
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if str(accelerator.distributed_type).endswith("DEEPSPEED") and plugin is not None:
        config = plugin.deepspeed_config or {}
        try:
            refuse_ulysses(config)
        except ValueError as err:
            return str(err)
        autotp = (config.get("tensor_parallel") or {}).get("autotp_size")
        if autotp != mesh.layout.tp_size:
            given = "a two-level DeepSpeed config" if SECTION in config else "a DeepSpeed config"
            return (f"{given} reached accelerate with tensor_parallel.autotp_size = {autotp}, not n*m = "
                    f"{mesh.layout.n}*{mesh.layout.m} = {mesh.layout.tp_size}: DeepSpeed would average gradients over "
                    "ranks that hold different shards and broadcast rank 0's shards to them; pass "
                    "DeepSpeedPlugin(hf_ds_config=ds_twolevel.accelerate.deepspeed_config(cfg)) or use "
                    "ds_twolevel.accelerate.accelerator(cfg)")
    return None


def _device_type() -> str:
    return "cpu" if not torch.accelerator.is_available() else torch.accelerator.current_accelerator().type


# -- notebooks ---------------------------------------------------------------------------------------
class _DropLine(io.TextIOBase):
    """A stdout that drops lines starting with ``prefix`` (and passes everything else through)."""

    def __init__(self, target: Any, prefix: str, replacement: str) -> None:
        self.target, self.prefix, self.replacement, self.buffer = target, prefix, replacement, ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.target.write((self.replacement if line.startswith(self.prefix) else line) + "\n")
        return len(text)

    def flush(self) -> None:
        if self.buffer:
            self.target.write(self.buffer)
            self.buffer = ""
        self.target.flush()


@contextlib.contextmanager
def _cpu_launch_message(num_processes: int) -> Iterator[None]:
    """accelerate's notebook_launcher prints "Launching training on N CUDAs." whenever no other device
    library is present (``get_current_device_type`` falls back to "cuda"); say what really runs."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = sys.stdout
    sys.stdout = _DropLine(original, "Launching training on ", f"Launching training on {num_processes} CPU "
                                                                 "processes (gloo).")
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = original


def notebook_launch(function: Callable[..., Any], args: tuple = (), *, num_processes: int, **launcher_kwargs: Any) -> None:
    """accelerate's ``notebook_launcher`` on a free port (not the fixed 29500), saying "CPU" on CPU.

    Example:
        >>> notebook_launch(train, args=(cfg_path,), num_processes=4)
    """
    from accelerate import notebook_launcher

    from ds_twolevel.testing.ranks import free_port

    launcher_kwargs.setdefault("use_port", str(free_port()))
    with _cpu_launch_message(num_processes):
        notebook_launcher(function, args=args, num_processes=num_processes, **launcher_kwargs)
