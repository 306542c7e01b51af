"""The two-level guard: training through a wrapper that corrupts the shards, or on inputs that differ
between the ranks of one layer, is refused on every rank before the first optimizer step.

Two-level shards have the same shape on every rank of a layer, so nothing fails on its own when a
wrapper broadcasts one rank's parameters to the others (DDP at construction, DeepSpeed's
``_broadcast_model``, accelerate's ``prepare``, the HF Trainer) or averages gradients over ranks
that hold different shards; and ranks fed different rows compute garbage without an error (or
crash gloo when the shapes differ). :func:`install` (called by ``hf_integration.patch_model``)
adds a forward pre-hook to the model. Before anything shape-dependent runs, the ranks of a layer:

1. look at the wrappers on the call stack (``DistributedDataParallel``, ``DeepSpeedEngine``, FSDP,
   ``DataParallel``, the HF Trainer): their gradient-averaging group must be this rank's
   data-parallel replicas, and DeepSpeed's model-parallel group the n*m ranks of this layer;
2. check the shards (:mod:`ds_twolevel.sharding.fingerprint`): ranks that own the same dense slice hold
   equal values (replicated tensors: embeddings, norms, LM head, output biases), and ranks that own
   different slices do not hold the same non-constant values (what a broadcast leaves behind);
3. compare the inputs (ids, mask, positions, embeddings, labels, ... : shape, dtype, exact hash) on
   every forward, and ``generate()``'s output (each decode step's forward already compared the token
   sampled before it).

A Hugging Face Trainer of a patched model whose ``args.world_size`` is not torch.distributed's (plain
``TrainingArguments(deepspeed=...)`` on CPU: accelerate's state without a backend) is refused earlier,
at the end of ``Trainer.__init__`` (:func:`check_trainer`, added by :func:`watch_trainers`).

Every check is one all-gather of a fixed-size int64 row: 4 plan lanes (shard check due, input check
due, parameter count, tp group) and :data:`~ds_twolevel.sharding.fingerprint.LANES` input digests
(:func:`~ds_twolevel.sharding.fingerprint.input_lanes`, hashed on the inputs' device). It goes over the
world in training mode (every rank must stop before the gradient all-reduce) and over the tp group
otherwise (a decode step of one layer group), so ranks with different batch shapes cannot deadlock or
crash the backend; every rank of that group computes the same verdict from the same table and raises
the same :class:`GuardError`. Data-parallel replicas are compared only with their own layer group.

Cost per forward with the default ``check_inputs="always"``: one all-gather of 12 int64 (96 bytes) per
rank and one hash pass over the inputs; docs/guard.md has the measured share of a step. A mismatch costs
one more all-gather (80 int64 per rank) for the message. ``"first"`` checks the first forward only,
``"never"`` never. Checks 1-2 run on the first forward and whenever a new wrapper appears (one
all-gather of 3 int64 per parameter tensor over the n*m ranks, one hash pass over this rank's
parameters, and :func:`~ds_twolevel.parallel.agreement.agree`'s 4-byte all-reduce). A caller whose ranks
of a layer legitimately get different tensors (a sequence-parallel split) declares what they must
agree on with :func:`declare_inputs`. A model patched with ``sequence_parallel`` compares its token
shards by shape and dtype here; before that, its own pre-hook has refused shards of different batches
(batch size, tokens per rank, mask, labels, ``num_items_in_batch``: ``hf_integration.sequence_parallel``).

Example:
    >>> install(model, mesh)                             # patch_model does this; check_inputs="always"
    >>> configure(model, check_inputs="first")          # opt out: only the first forward's inputs
    >>> configure(model, check_shards=False)            # opt out of the shard check
"""
from __future__ import annotations

import sys
import types
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ds_twolevel.deepspeed.compat import accelerate_state_initialized
from ds_twolevel.deepspeed.import_hooks import when_imported
from ds_twolevel.sharding import fingerprint as fp
from ds_twolevel.parallel.agreement import AgreementError, _flag_device, agree
from ds_twolevel.parallel.collectives import _ALL_GATHER
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelMesh

CHECK_INPUTS = ("first", "always", "never")
INPUTS = "inputs differ between the ranks"
TABLE = ("Supported ways (docs/accelerate_trainer.md, 'Which ways are exact'): ds_twolevel.initialize(model=, config=); accelerate "
         "with DeepSpeedPlugin(hf_ds_config=ds_twolevel.accelerate.deepspeed_config(cfg)) (it sets tensor_parallel."
         "autotp_size = n*m); the HF Trainer with ds_twolevel.hf_trainer.training_arguments(out, deepspeed=cfg) and "
         "TwoLevelTrainer; DistributedDataParallel(model, process_group=mesh.get_data_parallel_group()) fed "
         "ds_twolevel.replica_rows(batch, mesh).")


class GuardError(AgreementError):
    """The guard refused a forward: the same error on every rank (an AgreementError, so a ValueError).

    ``failures`` maps each rank to its message; ranks with the same message are named together.
    """

    def __init__(self, what: str, failures: dict[int, str], *, refused: str = "this forward") -> None:
        ValueError.__init__(self)
        self.what, self.failures = what, dict(sorted(failures.items()))
        by_message: dict[str, list[int]] = {}
        for rank, message in self.failures.items():
            by_message.setdefault(message, []).append(rank)
        parts = [f"rank(s) {', '.join(map(str, ranks))}: {message}" for message, ranks in by_message.items()]
        self.args = (f"{what} refused {refused} on " + " || ".join(parts),)


@dataclass(frozen=True)
class GuardOptions:
    """What the guard checks.

    Example:
        >>> GuardOptions(check_inputs="always", check_shards=True)
    """

    check_inputs: str = "always"
    """compare the inputs of the ranks of a layer on every forward ("always", and generate's output),
    on the "first" forward only, or "never"."""
    check_shards: bool = True
    """check wrappers and shards on the first forward and whenever a new wrapper appears."""

    def __post_init__(self) -> None:
        if self.check_inputs not in CHECK_INPUTS:
            raise ValueError(f"check_inputs must be one of {CHECK_INPUTS}, got {self.check_inputs!r}")
        if not isinstance(self.check_shards, bool):
            raise ValueError(f"check_shards must be True or False, got {self.check_shards!r}")


class ModelGuard:
    """The state of one model's guard (``model._twolevel_guard``); see the module docstring."""

    def __init__(self, model: nn.Module, mesh: TwoLevelMesh, options: GuardOptions) -> None:
        self.mesh, self.options = mesh, options
        self.model_name = type(model).__name__
        self.arg_names = fp.forward_parameter_names(model)
        self.forwards = 0
        self.checks = 0
        """collective checks run so far (tests count them)."""
        self.shards_checked = self.inputs_checked = False
        self.seen: set[int] = set()
        """ids of the wrappers already checked."""
        self.declared: dict[str, Any] | None = None
        """tensors the next check agrees on instead of the forward's arguments (:func:`declare_inputs`)."""
        self.leader = _tp_ranks(mesh)[0]
        """global rank of the first rank of this rank's layer group (names the group in a world table)."""
        self.handle = model.register_forward_pre_hook(self.pre_forward, with_kwargs=True)

    @property
    def active(self) -> bool:
        return self.mesh.axes.tp.size > 1 or self.mesh.layout.dp > 1

    def pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: the checks due at this call (collective over the layer's ranks)."""
        self.forwards += 1
        declared, self.declared = self.declared, None  # for this forward only, checked or not
        opts = self.options
        if not self.active or (opts.check_inputs == "never" and not opts.check_shards):
            return
        wrappers = _stack_objects(model) if opts.check_shards else []
        shards = opts.check_shards and (not self.shards_checked or any(id(w) not in self.seen for w in wrappers))
        inputs = opts.check_inputs == "always" or (opts.check_inputs == "first" and not self.inputs_checked)
        inputs = inputs and self.mesh.axes.tp.size > 1  # data-parallel replicas may get different rows
        if shards or inputs:
            if inputs:  # what the ranks of a layer must agree on: the declared tensors, else the arguments
                bound = declared if declared is not None else fp.bind_arguments(self.arg_names, args, kwargs)
                if declared is None and getattr(getattr(model, "_twolevel_sequence_parallel", None), "active", False):
                    bound = _sequence_shards_by_shape(bound)
            self.run(model, wrappers=wrappers if shards else None, bound=bound if inputs else None)

    def run(self, model: nn.Module, *, wrappers: list[Any] | None, bound: dict[str, Any] | None,
            what: str | None = None) -> None:
        """One check: a fixed-size all-gather of what each rank checks and the digest of its inputs
        (over the world in training, where every rank must stop together, else over the tp group), then
        the shard fingerprints if any rank checks them; raise :class:`GuardError` on every rank of
        that group when anything is wrong."""
        self.checks += 1
        training = model.training and torch.is_grad_enabled()
        axis = _world_axis() if training else self.mesh.axes.tp
        device = _flag_device(axis.group) if axis.size > 1 else torch.device("cpu")
        count = sum(1 for _ in model.parameters()) if wrappers is not None else 0  # compared by the shard check
        plan = torch.tensor([int(wrappers is not None), int(bound is not None), count, self.leader],
                            dtype=torch.int64, device=device)
        lanes = fp.input_lanes(bound or {}, device)
        table = _gather(torch.cat([plan, lanes]), axis)  # (ranks of axis, 4 + LANES): the only host read
        problems: list[str] = []
        if bool(table[:, 1].any()):
            problems += self._input_problems(table, axis, bound or {}, what or f"forward call {self.forwards}")
            self.inputs_checked = True
        if not bool(table[:, 0].any()):  # inputs only: every rank of the axis holds the same table and verdict
            if problems:
                ranks = _axis_ranks(axis, self.mesh)
                raise GuardError(f"the two-level guard ({self.model_name})", {r: problems[0] for r in ranks})
            return
        tp_table = table if not training else table[table[:, 3] == self.leader]
        problems += [p for w in wrappers or [] for p in wrapper_problems(w, self.mesh)]
        problems += self._shard_problems(model, _two_level_layers(model), tp_table[:, 2])
        self.seen.update(id(w) for w in wrappers or [])
        self.shards_checked = True
        message = None
        if problems:
            message = "; ".join(problems) + ("" if all(p.startswith(INPUTS) for p in problems) else ". " + TABLE)
        try:
            agree(message, None if training else self.mesh.axes.tp, what=f"the two-level guard ({self.model_name})")
        except AgreementError as err:
            raise GuardError(err.what, err.failures) from None

    def _input_problems(self, table: torch.Tensor, axis: Any, bound: dict[str, Any], call: str) -> list[str]:
        """One message naming every layer group whose input digests differ, and what differs; [] when
        all agree. Only on a mismatch (seen by every rank of ``axis``): an all-gather of each rank's
        full input descriptor, for the shapes and names in the message."""
        lanes, leaders = table[:, 4:], table[:, 3]
        bad = [int(g) for g in leaders.unique().tolist()
               if bool((lanes[leaders == g] != lanes[leaders == g][0]).any())]
        if not bad:
            return []
        descriptors = _gather(fp.input_descriptor(bound).to(_flag_device(axis.group) if axis.size > 1 else "cpu"), axis)
        ranks = _axis_ranks(axis, self.mesh)
        parts = []
        for leader in bad:
            rows = (leaders == leader).nonzero().flatten().tolist()
            parts += _input_problems(descriptors[rows], [ranks[r] for r in rows], call)
        return ["; ".join(parts)] if parts else [f"{INPUTS} at {call}"]

    def _shard_problems(self, model: nn.Module, layers: list[nn.Module], counts: torch.Tensor) -> list[str]:
        if bool((counts != counts[0]).any()):
            return [f"the ranks {_tp_ranks(self.mesh)} of one layer hold different numbers of parameter tensors "
                    f"({counts.tolist()}): every rank must patch the same model"]
        names, local = fp.shard_fingerprint(model, fp.slice_ids(model, layers))
        table = _gather(local.flatten(), self.mesh.axes.tp).view(counts.shape[0], -1, 3)
        return shard_problems(names, table, _tp_ranks(self.mesh))


def _world_axis() -> AxisGroup:
    """The whole job as an axis (group None: the default process group)."""
    if not dist.is_initialized():
        return AxisGroup.single("world")
    return AxisGroup(name="world", size=dist.get_world_size(), rank=dist.get_rank(), group=None)


def _axis_ranks(axis: AxisGroup, mesh: TwoLevelMesh) -> list[int]:
    """Global ranks of the rows of a table gathered over ``axis`` (the world, or the tp group)."""
    return list(range(axis.size)) if axis.name == "world" and axis.size > 1 else _tp_ranks(mesh)


SEQUENCE_SHARDED = ("input_ids", "inputs_embeds", "labels", "shift_labels")
"""inputs that hold this rank's tokens under sequence parallelism: the ranks of a layer agree on their
shapes and dtypes, not their values (the positions, the mask and ``num_items_in_batch`` still agree)."""


def _sequence_shards_by_shape(bound: dict[str, Any]) -> dict[str, Any]:
    """``bound`` with each sequence-sharded tensor replaced by zeros of its shape and dtype."""
    return {k: torch.zeros_like(v) if k in SEQUENCE_SHARDED and isinstance(v, torch.Tensor) else v
            for k, v in bound.items()}


def _two_level_layers(model: nn.Module) -> list[nn.Module]:
    from ds_twolevel.sharding.shard_manifest import partitioned_modules

    return [m for _, m in partitioned_modules(model)]


# -- installing ------------------------------------------------------------------------------------
def install(model: nn.Module, mesh: TwoLevelMesh, *, check_inputs: str = "always",
            check_shards: bool = True) -> ModelGuard:
    """Add the guard's forward pre-hook to ``model`` (replacing an earlier guard); return its state.

    Example:
        >>> guard = install(model, mesh)          # hf_integration.patch_model does this
    """
    options = GuardOptions(check_inputs=check_inputs, check_shards=check_shards)
    old = getattr(model, "_twolevel_guard", None)
    if old is not None:
        old.handle.remove()
    model._twolevel_guard = ModelGuard(model, mesh, options)
    _check_generated(model)
    watch_trainers()
    watch_accelerators()
    return model._twolevel_guard


def declare_inputs(model: nn.Module, tensors: dict[str, torch.Tensor | None]) -> None:
    """The next forward's input check compares ``tensors`` instead of the forward's arguments.

    For callers whose ranks of a layer legitimately receive different tensors (a sequence-parallel
    split gives each rank its own token shard): declare the whole batch (or anything every rank of the
    layer holds identically) just before the forward. Names of :data:`~ds_twolevel.sharding.fingerprint.INPUT_SLOTS`
    get their own digest lane and are named in the message; other names share one lane.

    Example:
        >>> declare_inputs(model, {"input_ids": batch_ids, "labels": batch_labels})   # the unsharded batch
        >>> model(input_ids=my_shard_ids, labels=my_shard_labels)                   # agreement on the batch
    """
    guard = getattr(model, "_twolevel_guard", None)
    if guard is None:
        raise ValueError(f"{type(model).__name__} has no two-level guard; patch it with hf_integration.patch_model "
                         "or call ds_twolevel.guard.install(model, mesh)")
    guard.declared = dict(tensors)


def _check_generated(model: nn.Module) -> None:
    """Make ``model.generate`` check its output on the ranks of a layer (``check_inputs="always"``):
    each decode step's forward checks the token sampled before it, this checks the last one. A bound
    method on the instance (a deep copy of the model gets its own)."""
    current = model.__dict__.get("generate")
    if not hasattr(type(model), "generate") or getattr(current, "__func__", None) is _checked_generate:
        return
    model.generate = types.MethodType(_checked_generate, model)


def _checked_generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``type(model).generate``, then one more input check, of the returned sequences."""
    out = type(model).generate(model, *args, **kwargs)
    guard = getattr(model, "_twolevel_guard", None)
    sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if guard is not None and guard.options.check_inputs == "always" and isinstance(sequences, torch.Tensor) \
            and guard.mesh.axes.tp.size > 1:
        with torch.no_grad():
            guard.run(model, wrappers=None, bound={"input_ids": sequences}, what="the end of generate()")
    return out


def configure(model: nn.Module, *, check_inputs: str | None = None, check_shards: bool | None = None) -> GuardOptions:
    """Change what an installed guard checks (e.g. ``check_inputs="always"``); returns the new options.

    Example:
        >>> configure(model, check_inputs="never", check_shards=False)   # opt out entirely
    """
    guard = getattr(model, "_twolevel_guard", None)
    if guard is None:
        raise ValueError(f"{type(model).__name__} has no two-level guard; patch it with hf_integration.patch_model "
                         "or call ds_twolevel.guard.install(model, mesh)")
    old = guard.options
    guard.options = GuardOptions(check_inputs=old.check_inputs if check_inputs is None else check_inputs,
                                 check_shards=old.check_shards if check_shards is None else check_shards)
    return guard.options


def check_now(model: nn.Module, *, wrapper: Any = None) -> None:
    """Run the wrapper and shard checks outside a forward (collective; ``ds_twolevel.initialize``).

    Example:
        >>> engine, *_ = deepspeed.initialize(model=model, ...)
        >>> check_now(model, wrapper=engine)      # GuardError on every rank if the engine broke the shards
    """
    guard = getattr(model, "_twolevel_guard", None)
    if guard is None or not guard.active or not guard.options.check_shards:
        return
    guard.run(model, wrappers=[] if wrapper is None else [wrapper], bound=None)


def refuse_rank0_only_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` refuse, at once and clearly, a call from the HF Trainer's
    rank-0-only ``_save`` (a patched model's save gathers shards from every rank: it would hang).

    Example:
        >>> refuse_rank0_only_save(model)          # patch_model does this
        >>> Trainer(model=model, args=args).save_model()   # ValueError naming TwoLevelTrainer
    """
    inner = model.save_pretrained

    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        trainer = _calling_trainer()
        if trainer is not None and not getattr(trainer, "two_level_saves", False):
            raise ValueError(f"{type(trainer).__name__} saves on rank 0 only, but {type(model).__name__} is "
                             "partitioned and its save_pretrained gathers shards from every rank (collective): use "
                             "ds_twolevel.hf_trainer.TwoLevelTrainer, whose save_model writes the dense checkpoint "
                             "with every rank")
        return inner(*args, **kwargs)

    model.save_pretrained = save_pretrained


def _calling_trainer() -> Any:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in ("_save", "save_model") and _is_trainer(frame.f_locals.get("self")):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


# -- collectives and ranks -------------------------------------------------------------------------
def _gather(row: torch.Tensor, axis: Any) -> torch.Tensor:
    """(axis size, len(row)) int64: ``row`` of every rank of the axis (fixed size on every rank)."""
    if axis.size == 1:
        return row.view(1, -1)
    device = _flag_device(axis.group)
    table = torch.empty(axis.size * row.numel(), dtype=row.dtype, device=device)
    _ALL_GATHER(table, row.to(device).contiguous(), group=axis.group)
    return table.view(axis.size, -1).cpu()


def _group_ranks(axis: Any) -> list[int]:
    if axis.group is None:
        return [dist.get_rank() if dist.is_initialized() else 0]
    return dist.get_process_group_ranks(axis.group)


def check_same_dense_weights(modules: list[nn.Module], mesh: TwoLevelMesh, *, name: str) -> None:
    """Before patching: the ranks of one layer hold the same dense weights in ``modules``, or every
    one of them raises the same :class:`GuardError`. Each rank slices its shards out of its own dense
    copy, so different copies (different seeds, no broadcast) would make a model no rank ever had.
    Cost: one pass over the modules' parameters (hashes) and an all-gather of 16 bytes per rank."""
    tp = mesh.axes.tp
    params = [p for mod in modules for p in mod.parameters()]
    if tp.size == 1 or not params or not dist.is_initialized():
        return
    digest = torch.zeros(2, dtype=torch.int64, device=params[0].device)
    for index, param in enumerate(params):
        value = fp.tensor_hash(param.detach()).to(digest.device)
        digest[0] += value * (index + 1)
        digest[1] ^= value
    table = _gather(digest, tp)  # (tp, 2), the same on every rank
    if bool((table == table[0]).all()):
        return
    ranks = _tp_ranks(mesh)
    groups: dict[tuple[int, int], list[int]] = {}
    for rank, row in zip(ranks, table.tolist()):
        groups.setdefault(tuple(row), []).append(rank)
    message = (f"the dense weights differ between the ranks {ranks} of one layer before patching ("
               f"{len(groups)} different copies: {'; '.join(str(g) for g in groups.values())}); each rank would "
               "slice its shards out of another model. Every rank must start from the same weights (same seed "
               "or checkpoint; ds_twolevel.initialize broadcasts them with sync_init, "
               "hf_integration.load_partitioned reads them from one checkpoint)")
    raise GuardError(f"the two-level guard ({name})", {rank: message for rank in ranks}, refused="patching")


def check_same_settings(mesh: TwoLevelMesh, settings: dict[str, Any], *, name: str) -> None:
    """Before patching: the ranks of one layer patch with the same ``settings`` (strategy, hardware,
    reduce_dtype, kv_replication), or every one of them raises the same :class:`GuardError`. Different
    settings issue different collectives (another strategy, another plan, sums of another dtype) on ranks
    that must issue the same ones: a hang or a wrong sum. Cost: an all-gather of 8 bytes per rank."""
    tp = mesh.axes.tp
    if tp.size == 1 or tp.group is None or not dist.is_initialized():
        return
    text = ", ".join(f"{key}={value!r}" for key, value in sorted(settings.items()))
    table = _gather(torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64), tp)
    if bool((table == table[0]).all()):
        return
    texts: list[Any] = [None] * tp.size
    dist.all_gather_object(texts, text, group=tp.group)  # every rank saw the mismatch: all take this branch
    ranks = _tp_ranks(mesh)
    groups: dict[str, list[int]] = {}
    for rank, setting in zip(ranks, texts):
        groups.setdefault(setting, []).append(rank)
    message = (f"the ranks {ranks} of one layer patch with different settings ("
               + "; ".join(f"rank(s) {', '.join(map(str, r))}: {t}" for t, r in groups.items())
               + "); they would issue different collectives. Pass the same strategy, hardware, reduce_dtype and "
               "kv_replication on every rank (one DeepSpeed config, or the same patch_model arguments)")
    raise GuardError(f"the two-level guard ({name})", {rank: message for rank in ranks}, refused="patching")


def _tp_ranks(mesh: TwoLevelMesh) -> list[int]:
    return _group_ranks(mesh.axes.tp)


def _dp_groups(mesh: TwoLevelMesh) -> str:
    """'[0, 2], [1, 3]': every data-parallel group of the layout (the same text on every rank)."""
    tp, dp = mesh.layout.tp_size, mesh.layout.dp
    return ", ".join(str([d * tp + t for d in range(dp)]) for t in range(tp))


def _ranks(pg: Any) -> list[int]:
    return dist.get_process_group_ranks(pg) if pg is not None else list(range(dist.get_world_size()))


# -- wrappers --------------------------------------------------------------------------------------
def _stack_objects(model: nn.Module) -> list[Any]:
    """Modules that called ``model`` (wrappers) and HF Trainers, found on the call stack."""
    found, frame, depth = [], sys._getframe(1), 0
    while frame is not None and depth < 200:
        owner = frame.f_locals.get("self") if frame.f_code.co_name in _CALLERS else None
        if owner is not None and owner is not model and all(owner is not f for f in found):
            if isinstance(owner, nn.Module) or _is_trainer(owner):
                found.append(owner)
        frame, depth = frame.f_back, depth + 1
    return found


_CALLERS = {"_call_impl", "_wrapped_call_impl", "forward", "training_step", "compute_loss", "prediction_step"}


def _is_trainer(obj: Any) -> bool:
    transformers = sys.modules.get("transformers")
    trainer_cls = getattr(transformers, "Trainer", None) if transformers is not None else None
    return trainer_cls is not None and isinstance(obj, trainer_cls)


def _origin() -> str:
    """' (made by accelerate's Accelerator.prepare)' when accelerate set up this process."""
    return " (made by accelerate's Accelerator.prepare)" if accelerate_state_initialized() else ""


def wrapper_problems(wrapper: Any, mesh: TwoLevelMesh) -> list[str]:
    """Why ``wrapper`` (found around the model) breaks two-level training; [] when it does not."""
    kind = type(wrapper).__name__
    dp_ranks = _group_ranks(mesh.axes.dp)
    if isinstance(wrapper, nn.parallel.DistributedDataParallel):
        ranks = _ranks(wrapper.process_group)
        if ranks != dp_ranks:
            return [f"DistributedDataParallel{_origin()} averages gradients over ranks {ranks}, but the ranks of one "
                    f"layer hold different shards: it may only span data-parallel replicas ({_dp_groups(mesh)}), "
                    f"and its construction broadcast rank {ranks[0]}'s parameters to the others"]
    elif kind == "DeepSpeedEngine":  # ZeRO's group: dp, or dp x sp under Ulysses
        return _deepspeed_problems(wrapper, mesh, _group_ranks(mesh.axes.zero))
    elif "FullyShardedDataParallel" in kind or kind.startswith("FSDP") or isinstance(wrapper, nn.DataParallel):
        return [f"{kind} is not supported around a two-level model (it shards or replicates parameters over ranks "
                f"that hold different two-level shards)"]
    elif _is_trainer(wrapper):
        return _trainer_problems(wrapper)
    return []


def _trainer_problems(trainer: Any) -> list[str]:
    """A Trainer that counts another number of processes than the job has, or saves on rank 0 only."""
    wrong_world = _trainer_world_problem(trainer)
    if wrong_world is not None:
        return [wrong_world]
    if not getattr(trainer, "two_level_saves", False) and _saves(trainer):
        return [f"the Hugging Face Trainer ({type(trainer).__name__}) saves on rank 0 only (save_strategy="
                f"{_strategy(trainer)!r}), but a patched model's save_pretrained gathers shards from every rank "
                "(collective): use ds_twolevel.hf_trainer.TwoLevelTrainer (saves dense checkpoints on every rank "
                "together) or save_strategy='no'"]
    return []


def _trainer_world_problem(trainer: Any) -> str | None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    seen = int(getattr(trainer.args, "world_size", world))
    if seen == world:
        return None
    return (f"the Hugging Face Trainer ({type(trainer).__name__}) counts {seen} process(es) (TrainingArguments."
            f"world_size = accelerate's PartialState().num_processes = {seen}) but torch.distributed has {world} "
            "ranks: TrainingArguments(deepspeed=...) created accelerate's state without a backend (on CPU every "
            "process believes it is rank 0 of 1); build the arguments with "
            "ds_twolevel.hf_trainer.training_arguments(output_dir, deepspeed=cfg, ...)")


# -- the Trainer, when it is made -------------------------------------------------------------------
def watch_accelerators() -> None:
    """Check every ``Accelerator.prepare`` of a two-level model before it wraps anything (installed
    once, when ``accelerate.accelerator`` is imported; :func:`ds_twolevel.accelerate.prepare_problem`).

    Example:
        >>> watch_accelerators()      # install (so patch_model) does this
    """
    when_imported("accelerate.accelerator", _wrap_prepare)


def _wrap_prepare(module: Any) -> None:
    import functools

    cls = getattr(module, "Accelerator", None)
    if cls is None or "_twolevel_checked_prepare" in cls.__dict__:
        return
    original = cls.prepare

    @functools.wraps(original)
    def prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_prepare(self, args)
        return original(self, *args, **kwargs)

    cls.prepare = prepare
    cls._twolevel_checked_prepare = True


def check_prepare(accelerator: Any, objects: tuple) -> None:
    """Refuse, on every rank (4-byte all-reduce over the world), an ``Accelerator.prepare`` of a two-level
    model whose accelerate setup would train it wrongly (:func:`ds_twolevel.accelerate.prepare_problem`). No-op otherwise.

    Example:
        >>> check_prepare(accelerator, (model, optimizer))   # GuardError naming the fix
    """
    from ds_twolevel.parallel.agreement import AgreementError, agree

    guard = next((getattr(o, "_twolevel_guard", None) for o in objects if hasattr(o, "_twolevel_guard")), None)
    if guard is None or not guard.active:
        return
    from ds_twolevel.accelerate import prepare_problem

    problem = prepare_problem(accelerator, guard.mesh)
    try:
        agree(problem, None, what=f"the two-level guard ({guard.model_name})")
    except AgreementError as err:
        raise GuardError(err.what, err.failures, refused="Accelerator.prepare") from None


def watch_trainers() -> None:
    """Check every ``transformers.Trainer`` at the end of its ``__init__`` (installed once, when
    ``transformers.trainer`` is imported; :func:`check_trainer`)."""
    when_imported("transformers.trainer", _wrap_trainer_init)


def _wrap_trainer_init(module: Any) -> None:
    import functools

    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None or "_twolevel_checked_init" in trainer_cls.__dict__:
        return
    original = trainer_cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        check_trainer(self)

    trainer_cls.__init__ = __init__
    trainer_cls._twolevel_checked_init = True


def check_trainer(trainer: Any) -> None:
    """Refuse, on every rank (one 4-byte all-reduce over the world), a Trainer of a two-level model
    whose process count is not torch.distributed's: before it builds a dataloader (accelerate's
    would divide by ``num_processes // autotp_size`` = 0) or wraps the model. A no-op for other
    models and without a process group; ``transformers.Trainer.__init__`` calls it (:func:`watch_trainers`).

    Example:
        >>> check_trainer(trainer)        # GuardError: ... use ds_twolevel.hf_trainer.training_arguments
    """
    model = getattr(trainer, "model", None)
    guard = getattr(model, "_twolevel_guard", None) if isinstance(model, nn.Module) else None
    if guard is None or not guard.active or not guard.options.check_shards or not dist.is_initialized():
        return
    problem = _trainer_world_problem(trainer)
    try:
        agree(None if problem is None else f"{problem}. {TABLE}", None, what=f"the two-level guard ({guard.model_name})")
    except AgreementError as err:
        raise GuardError(err.what, err.failures, refused=f"this {type(trainer).__name__}") from None


def _strategy(trainer: Any) -> str:
    strategy = getattr(trainer.args, "save_strategy", "no")
    return str(getattr(strategy, "value", strategy)).lower()


def _saves(trainer: Any) -> bool:
    return _strategy(trainer) != "no"


def _deepspeed_problems(engine: Any, mesh: TwoLevelMesh, dp_ranks: list[int]) -> list[str]:
    """The engine's gradient-averaging, ZeRO and model-parallel groups must be ours."""
    dp_group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    ranks = _ranks(dp_group)
    fix = (f'add "tensor_parallel": {{"autotp_size": {mesh.layout.tp_size}}} to the DeepSpeed config (n*m = '
           f"{mesh.layout.n}*{mesh.layout.m}; ds_twolevel.accelerate.deepspeed_config does it) or use "
           "ds_twolevel.initialize")
    if ranks != dp_ranks:
        return [f"DeepSpeedEngine{_origin()} averages gradients over ranks {ranks} instead of the data-parallel "
                f"replicas ({_dp_groups(mesh)}), and its _broadcast_model copied rank {ranks[0]}'s shards to the "
                f"others: {fix}"]
    mpu = getattr(engine, "mpu", None)
    tp_ranks = _tp_ranks(mesh)
    mp = _ranks(mpu.get_model_parallel_group()) if mpu is not None and tp_ranks != [dist.get_rank()] else tp_ranks
    if mp != tp_ranks:
        return [f"DeepSpeedEngine's model-parallel group is ranks {mp}, the ranks of this layer are {tp_ranks}: "
                f"the clipped gradient norm would not be the dense one; {fix}"]
    zero3 = next((p for p in engine.module.parameters() if hasattr(p, "ds_process_group")), None)
    if zero3 is not None and _ranks(zero3.ds_process_group) != dp_ranks:
        return [f"ZeRO-3 partitions parameters over ranks {_ranks(zero3.ds_process_group)}, not over the "
                f"data-parallel replicas ({_dp_groups(mesh)}): {fix}"]
    return []


# -- verdicts ----------------------------------------------------------------------------------------
def shard_problems(names: list[str], table: torch.Tensor, ranks: list[int]) -> list[str]:
    """Violations in ``table`` ((tp, P, 3): slice id, value hash, constant?) of the ranks ``ranks``."""
    ids, hashes, const = table.unbind(-1)
    same = ids.unsqueeze(0) == ids.unsqueeze(1)                            # (tp, tp, P)
    equal = hashes.unsqueeze(0) == hashes.unsqueeze(1)
    known = (ids >= 0).all(0)                                                # (P,)
    differ = (same & ~equal).any(0).any(0) & known
    variable = ~(const.unsqueeze(0).bool() & const.unsqueeze(1).bool())
    copied = (~same & equal & variable).any(0).any(0) & known
    checkable = ((~same).any(0).any(0) & known & (const == 0).any(0)).sum().item()
    out = []
    if differ.any():
        bad = [names[p] for p in differ.nonzero().flatten().tolist()]
        out.append(f"{len(bad)} tensor(s) that the ranks {ranks} of one layer must hold identically differ between "
                   f"them ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): every rank must start from the same "
                   "weights (same seed or checkpoint; ds_twolevel.initialize broadcasts them with sync_init)")
    if copied.sum().item() * 2 >= max(checkable, 1) and copied.any():
        bad = [names[p] for p in copied.nonzero().flatten().tolist()]
        out.append(f"{len(bad)} of {checkable} partitioned tensor(s) hold the same values on ranks {ranks} that own "
                   f"different slices ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): a wrapper broadcast "
                   "one rank's shards to the others")
    return out


def _input_problems(table: torch.Tensor, ranks: list[int], call: str) -> list[str]:
    """Which arguments differ between the ranks of a layer ((tp, DESCRIPTOR_SIZE) table)."""
    out = []
    for k, name in enumerate(fp.INPUT_SLOTS + ("other arguments",)):
        block = table[:, k * fp.SLOT_WIDTH:(k + 1) * fp.SLOT_WIDTH]
        if bool((block == block[0]).all()):
            continue
        groups: dict[tuple, list[int]] = {}
        for rank, row in zip(ranks, block.tolist()):
            groups.setdefault(tuple(row), []).append(rank)
        if len({row[:-1] for row in groups}) == 1:  # same shape and dtype: the values differ
            who = " vs ".join(", ".join(map(str, rs)) for rs in groups.values())
            out.append(f"{name}: same shape {fp.describe_slot(list(next(iter(groups))))}, different values on rank(s) {who}")
        else:
            out.append(f"{name}: " + "; ".join(f"{fp.describe_slot(list(row))} on rank(s) {', '.join(map(str, rs))}"
                                                for row, rs in groups.items()))
    if not out:
        return []
    return [f"{INPUTS} {ranks} of one layer at {call} ({' | '.join(out)}); "
            "every rank of a layer must get the same batch (ds_twolevel.replica_rows(batch, mesh), or accelerate / "
            "the Trainer with tensor_parallel.autotp_size = n*m); check_inputs='never' turns this check off"]
