"""Rank side of tests/test_ecosystem.py: every training path of docs/accelerate_trainer.md's "Which ways are exact"
table, plus the guard's input and shard checks, in ONE launch per layout (starting ranks costs seconds).

Run as ``torchrun --nproc_per_node 4 tests/ecosystem_ranks.py --layout 1x2 --out DIR`` (or under the
``deepspeed`` launcher). Each scenario writes ``DIR/<case>.rank<r>.json`` (what the rank saw: batches,
losses, grad norms, or the error it raised) and rank 0 writes ``DIR/<case>.weights.pt`` (the trained
dense weights, gathered). pytest compares them with a dense single-process run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import LogitsProcessor, Qwen3Config, Qwen3ForCausalLM  # noqa: E402  (before any zero.Init)

STEPS = 4
SEQ = 12
MICRO = 2
GAS = 2
LR = 1e-3
CLIP = 0.5
EPS = 1e-5  # Adam amplifies fp32 noise on near-zero gradients by lr/eps (tests/test_deepspeed_e2e.py)
BETAS = (0.9, 0.95)
VOCAB = 64
MODEL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, attention_dropout=0.0, tie_word_embeddings=False,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def build_model(seed: int = 0) -> Qwen3ForCausalLM:
    """The dense tiny Qwen3 (GQA 4/2 heads, per-head q/k norms) drawn from ``seed``."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**MODEL, attn_implementation="sdpa"))


def rows(count: int, seed: int = 5) -> torch.Tensor:
    """(count, SEQ) token ids: the training data of every scenario."""
    return torch.randint(1, VOCAB, (count, SEQ), generator=torch.Generator().manual_seed(seed))


def ds_config(stage: int, n: int, m: int, *, autotp: bool = True) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
           "two_level": {"n": n, "m": m, "strategy": "cost_model", "timeout_s": 120}}
    if autotp:
        cfg["tensor_parallel"] = {"autotp_size": n * m}
    return cfg


# -- bookkeeping -------------------------------------------------------------------------------------
class Run:
    """What one rank records in one scenario."""

    def __init__(self, out: Path, case: str) -> None:
        import torch.distributed as dist

        self.out, self.case, self.rank = out, case, dist.get_rank()
        self.data: dict[str, Any] = {"batches": [], "losses": [], "grad_norms": [], "error": None, "t0": time.time()}

    def save(self, state: dict | None = None) -> None:
        import torch.distributed as dist

        self.data["seconds"] = time.time() - self.data.pop("t0")
        (self.out / f"{self.case}.rank{self.rank}.json").write_text(json.dumps(self.data))
        if state is not None and self.rank == 0:
            torch.save(state, self.out / f"{self.case}.weights.pt")
        dist.barrier()


def scenario(fn: Callable) -> Callable:
    """Run a scenario; a GuardError (or any error) is recorded, not raised: the launch goes on."""
    def run(args, case: str, *extra: Any) -> None:
        from accelerate.state import AcceleratorState, GradientState

        record = Run(Path(args.out), case)
        try:
            state = fn(args, record, *extra)
        except Exception as err:  # noqa: BLE001 - what the rank raised is the result of a refusal case
            record.data["error"] = {"type": type(err).__name__, "message": str(err),
                                    "trace": traceback.format_exc()[-3000:]}
            state = None
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        record.save(state)
    run.__name__ = fn.__name__
    return run


def mesh_for(args):
    from ds_twolevel import TwoLevelLayout

    import torch.distributed as dist

    return TwoLevelLayout.from_world_size(dist.get_world_size(), n=args.n, m=args.m).build()


NO_GUARD = False
"""--no-guard: switch the guard off, to see what the refused paths would do (the tests must then fail)."""


def patched(mesh, seed: int = 0, **settings):
    from ds_twolevel import guard
    from hf_integration import patch_model

    model = build_model(seed)
    patch_model(model, mesh, **settings)
    if NO_GUARD:
        guard.configure(model, check_shards=False, check_inputs="never")
    return model.train()


def global_loss(loss: torch.Tensor, mesh) -> float:
    import torch.distributed as dist

    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.get_data_parallel_group())
    return float(total) / mesh.layout.dp


# -- accelerate --------------------------------------------------------------------------------------
def _accelerate_loop(accelerator, model, mesh, record: Run, cfg_steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(rows(STEPS * GAS * MICRO * mesh.layout.dp), batch_size=MICRO, shuffle=False)
    engine, opt, loader = accelerator.prepare(model, opt, loader)
    zero3 = next((p for p in engine.module.parameters() if hasattr(p, "ds_process_group")), None)
    if zero3 is not None:  # ZeRO-3 must partition over the dp replicas only: the ranks of a layer differ
        import torch.distributed as dist

        record.data["zero3_group"] = dist.get_process_group_ranks(zero3.ds_process_group)
    for k, batch in enumerate(loader):
        with accelerator.accumulate(engine):  # DeepSpeed steps at the accumulation boundary only
            out = engine(input_ids=batch, labels=batch)
            accelerator.backward(out.loss)
            opt.step()
            opt.zero_grad()
        record.data["batches"].append(batch.tolist())
        record.data["losses"].append(global_loss(out.loss, mesh))
        if (k + 1) % cfg_steps == 0:  # ZeRO-0 keeps no norm (None): its clipping shows in the weights
            norm = engine.get_global_grad_norm()
            record.data["grad_norms"].append(None if norm is None else float(norm))
    record.data["global_steps"] = int(getattr(engine, "global_steps", -1))


def _recording_watchdog_start(record: Run, build: Callable) -> Any:
    """``build()``, recording the (rank, world_size) it passed to ``watchdog.start`` (main already
    started this process's watchdog, so the call is a no-op: what is checked is that it is made)."""
    from ds_twolevel.parallel import watchdog

    start, record.data["watchdog_start"] = watchdog.start, None

    def recording(rank: int, world_size: int | None = None, **kwargs: Any) -> Any:
        record.data["watchdog_start"] = [rank, world_size]
        return start(rank, world_size, **kwargs)

    watchdog.start = recording
    try:
        return build()
    finally:
        watchdog.start = start


@scenario
def accelerate_deepspeed(args, record: Run, stage: int, autotp: bool = True, gloo: bool = True) -> dict:
    """Accelerator + DeepSpeedPlugin (ds_twolevel.accelerate helpers), ZeRO ``stage``; or without
    ``autotp`` (the two-level JSON as it is), or without the gloo handler."""
    import ds_twolevel
    from ds_twolevel import accelerate as two_level_accelerate

    cfg = ds_config(stage, args.n, args.m, autotp=autotp)
    if not gloo:  # the helper's plugin, but accelerate's own process state: no backend on CPU
        from accelerate import Accelerator

        accelerator = Accelerator(deepspeed_plugin=two_level_accelerate.deepspeed_plugin(cfg))
    elif autotp:
        accelerator = two_level_accelerate.accelerator(cfg)
    else:  # what a user without the helper does: the config as it is, the gloo handler from CPU_NOTES
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=False),
                                  kwargs_handlers=two_level_accelerate.kwargs_handlers(cfg))
    record.data["accelerator"] = [str(accelerator.distributed_type), accelerator.num_processes]
    mesh = _recording_watchdog_start(record, lambda: two_level_accelerate.build_mesh(accelerator))
    model = patched(mesh)
    _accelerate_loop(accelerator, model, mesh, record, GAS)
    return ds_twolevel.dense_state_dict(accelerator._models[0])


@scenario
def accelerate_ddp(args, record: Run) -> dict:
    """Plain accelerate (MULTI_CPU: DDP over the world): the guard must refuse it."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    record.data["accelerator"] = [str(accelerator.distributed_type), accelerator.num_processes]
    mesh = mesh_for(args)
    model = patched(mesh)
    _accelerate_loop(accelerator, model, mesh, record, 1)
    return {}


# -- the Hugging Face Trainer ------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _recording(trainer_cls: type, record: Run) -> type:
    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            record.data["batches"].append(inputs["input_ids"].tolist())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
    return Recording


def _trainer_args(args, out: Path, deepspeed: dict | None, save_steps: int | None, helper: bool = True,
                  **overrides: Any):
    """``helper=False``: ``TrainingArguments(out, deepspeed=path)`` as a user without
    ``ds_twolevel.hf_trainer.training_arguments`` writes it."""
    from transformers import TrainingArguments

    from ds_twolevel.hf_trainer import training_arguments

    common = dict(per_device_train_batch_size=MICRO, gradient_accumulation_steps=GAS, max_steps=STEPS,
                  learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0,
                  max_grad_norm=CLIP, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[],
                  save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True,
                  seed=3, dataloader_drop_last=True)
    common.update(overrides)
    if deepspeed is None:
        return TrainingArguments(str(out), use_cpu=True, ddp_backend="gloo", **common)
    import torch.distributed as dist

    path = out.parent / f"{out.name}.rank{dist.get_rank()}.ds_config.json"
    path.write_text(json.dumps(deepspeed))
    if not helper:
        return TrainingArguments(str(out), deepspeed=str(path), **common)
    return training_arguments(out, deepspeed=str(path), **common)  # a JSON file, as users pass it


@scenario
def trainer(args, record: Run, kind: str) -> dict:
    """``kind``: "two_level" (TwoLevelTrainer + DeepSpeed ZeRO-2, ZeRO-3 at n > 1; saves at steps 2, 4 and at
    the end), "plain_ds" (plain Trainer + DeepSpeed with save_strategy steps: refused), "plain_ds_nosave"
    (plain Trainer + DeepSpeed, save_strategy "no": exact), "plain_ds_noargs" (plain Trainer and plain
    ``TrainingArguments(out, deepspeed=cfg)``, no helper: refused on CPU), "plain" (Trainer without DeepSpeed: DDP)."""
    import ds_twolevel
    from transformers import Trainer

    from ds_twolevel.hf_trainer import TwoLevelTrainer

    out = Path(args.out) / f"{record.case}_out"
    mesh = mesh_for(args) if kind == "plain" else None
    deepspeed = None if kind == "plain" else ds_config(3 if args.n > 1 else 2, args.n, args.m)  # ZeRO-3 at 1x2x2
    saves = kind in ("two_level", "plain_ds")
    targs = _trainer_args(args, out, deepspeed, save_steps=2 if saves else None, helper=kind != "plain_ds_noargs")
    mesh = mesh or ds_twolevel.build_mesh(deepspeed)
    model = patched(mesh)
    cls = _recording(TwoLevelTrainer if kind == "two_level" else Trainer, record)
    run = cls(model=model, args=targs, train_dataset=_Rows(rows(64 * mesh.layout.dp)))
    record.data["trainer"] = [str(targs.distributed_state.distributed_type), targs.world_size]
    run.train()
    logs = [h for h in run.state.log_history if "loss" in h]
    record.data["losses"] = [h["loss"] for h in logs]
    record.data["grad_norms"] = [h["grad_norm"] for h in logs]
    if kind == "two_level":
        run.save_model(str(out / "final"))
        record.data["saved"] = sorted(p.name for p in out.iterdir())
    return ds_twolevel.dense_state_dict(run.model_wrapped)


# -- sequence and vocab parallelism through accelerate and the Trainer --------------------------------
SP_SEQ = 13
"""divisible by neither 2 nor 4: the shards are cut from a padded sequence."""
SP_LR, SP_EPS = 1e-3, 1e-4
"""eps 1e-4: Adam moves a near-zero-gradient weight by lr/eps per unit of gradient error (see
tests/test_sequence_parallel.py); 1e-4 keeps the 1e-5 comparison of the weights meaningful."""


def sp_model(arch: str):
    """The dense tiny Llama or Qwen3 of tests/test_sequence_parallel.py (Llama without q/k/v biases: the key
    bias's gradient is analytically zero, and Adam turns its fp32 noise into steps of up to lr)."""
    from hf_integration.testing import tiny_model

    return tiny_model(arch, seed=3, **({"attention_bias": False} if arch == "llama" else {})).train()


def sp_rows(count: int, seed: int = 7) -> list[dict]:
    """``count`` sequences of SP_SEQ tokens, row i right-padded by i % 4 tokens (mask 0, labels -100)."""
    from hf_integration.testing import VOCAB as SP_VOCAB

    ids = torch.randint(1, SP_VOCAB, (count, SP_SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(count, SP_SEQ, dtype=torch.long)
    for i in range(count):
        if i % 4:
            mask[i, -(i % 4):] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
            for i in range(count)]


def sp_config(stage: int, n: int, m: int, *, sequence_parallel: bool = True) -> dict:
    cfg = ds_config(stage, n, m)
    cfg["two_level"].update(sequence_parallel=sequence_parallel, vocab_parallel=True)
    return cfg


@contextlib.contextmanager
def first_step_grads(out: dict):
    """Record, at the first optimizer step of any DeepSpeed engine, every parameter's full (ZeRO-gathered,
    pre-clipping) gradient into ``out`` (``deepspeed.utils.safe_get_full_grad``, collective over dp)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    original = DeepSpeedEngine.step

    def step(engine, *args: Any, **kwargs: Any) -> Any:
        if "grads" not in out and engine.is_gradient_accumulation_boundary():
            out["grads"] = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}
        return original(engine, *args, **kwargs)

    DeepSpeedEngine.step = step
    try:
        yield out
    finally:
        DeepSpeedEngine.step = original


def _replica_batches(mine: list[dict], mesh) -> list[list[dict]]:
    """Every data-parallel replica's whole micro-batches, in dp order (from the ranks with tp rank 0)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [everyone[r] for r in range(0, dist.get_world_size(), mesh.layout.tp_size)]


def sp_dense(arch: str, replicas: list[list[dict]], *, per_token: bool, weight_decay: float) -> dict:
    """The dense run of the same steps: each step's loss is Σ token losses / real tokens over the step's
    micro-batches (``per_token``: the Trainer's num_items_in_batch), or the mean of the micro-batches' mean
    losses (DeepSpeed's accumulation and dp averaging in accelerate's loop); clip_grad_norm_, torch AdamW."""
    model = sp_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=SP_LR, betas=BETAS, eps=SP_EPS, weight_decay=weight_decay)
    out: dict[str, Any] = {"losses": [], "grad_norms": []}
    for step in range(STEPS):
        micro = [rep[k] for rep in replicas for k in range(step * GAS, (step + 1) * GAS)]
        if per_token:
            loss = model(**{key: torch.cat([b[key] for b in micro]) for key in micro[0]}).loss
        else:
            loss = sum(model(**b).loss for b in micro) / len(micro)
        loss.backward()
        if step == 0:
            out["grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        out["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        out["losses"].append(float(loss))
    out["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def sp_errors(record: Run, arch: str, engine, dense: dict, losses: list[float], grads: dict, norms: list) -> None:
    """Relative errors against the dense run: every step's loss and pre-clip gradient norm, every
    parameter's gradient at step 1 (each shard against its dense slice), every weight after STEPS steps
    (relative to the largest weight)."""
    import ds_twolevel
    from ds_twolevel.testing import rel_err
    from hf_integration.testing import shard_grad_errors

    module = engine.module
    reference = sp_model(arch)
    for name, p in reference.named_parameters():
        p.grad = dense["grads"][name]
    for name, p in module.named_parameters():
        p.grad = grads[name]
    state = ds_twolevel.dense_state_dict(engine)
    scale = max(float(v.abs().max()) for v in dense["weights"].values())
    record.data["errors"] = {
        "loss": max(rel_err(torch.tensor(a), torch.tensor(b)) for a, b in zip(losses, dense["losses"], strict=True)),
        "grad_norm": max(rel_err(torch.tensor(a), torch.tensor(b)) for a, b in zip(norms, dense["grad_norms"], strict=True)),
        "grads": shard_grad_errors(reference, module),
        "weights": max(rel_err(state[k], v, scale) for k, v in dense["weights"].items())}
    record.data["clipped"] = all(norm > CLIP for norm in dense["grad_norms"])


@scenario
def accelerate_sequence_parallel(args, record: Run, arch: str) -> None:
    """``"two_level": {"sequence_parallel": true, "vocab_parallel": true}``, ZeRO-2, through
    ``ds_twolevel.accelerate.accelerator(cfg)``: ``prepare(model, opt, loader)`` returns a loader of
    this rank's shards; the loop is accelerate's, unchanged."""
    import torch.distributed as dist

    from ds_twolevel import accelerate as two_level_accelerate
    from hf_integration import patch_model
    from hf_integration.sequence_data import shard_batch, whole_loss

    accelerator = two_level_accelerate.accelerator(sp_config(2, args.n, args.m))
    mesh = two_level_accelerate.build_mesh(accelerator)
    model = sp_model(arch)
    patch_model(model, mesh, sequence_parallel=True, vocab_parallel=True)
    opt = torch.optim.AdamW(model.parameters(), lr=SP_LR, betas=BETAS, eps=SP_EPS, weight_decay=0.01)
    data = torch.utils.data.DataLoader(sp_rows(STEPS * GAS * MICRO * mesh.layout.dp), batch_size=MICRO)
    engine, opt, loader = accelerator.prepare(model, opt, data)
    record.data["loader"] = type(loader).__name__
    whole = list(loader.loader)  # the batches accelerate gives this rank (the same on every rank of a layer)
    micro, grads = [], {}
    with first_step_grads(grads):
        for k, batch in enumerate(loader):
            record.data.setdefault("shards_match", []).append(
                all(torch.equal(v, batch[key]) for key, v in shard_batch(whole[k], mesh).items()))
            with accelerator.accumulate(engine):
                loss = engine(**batch).loss
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            micro.append(whole_loss(loss, mesh))
            if (k + 1) % GAS == 0:
                record.data["grad_norms"].append(float(engine.get_global_grad_norm()))
    steps = torch.stack(micro).view(STEPS, GAS).mean(1)  # the replica's step losses
    dist.all_reduce(steps, group=mesh.get_data_parallel_group())
    record.data["losses"] = (steps / mesh.layout.dp).tolist()
    dense = sp_dense(arch, _replica_batches(whole, mesh), per_token=False, weight_decay=0.01)
    sp_errors(record, arch, engine, dense, record.data["losses"], grads["grads"], record.data["grad_norms"])


@scenario
def accelerate_sequence_parallel_refused(args, record: Run, kind: str) -> None:
    """``kind`` "plain_loader": a sequence-parallel model fed whole batches by accelerate's own
    ``Accelerator`` (not ``ds_twolevel.accelerate.accelerator``): the model's error at the first forward.
    "switch": the config says sequence_parallel, the model was patched without it: refused at prepare. Both: the
    check at prepare refuses a config with DeepSpeed's "sequence_parallel_size" (Ulysses) > 1."""
    from accelerate import Accelerator

    from ds_twolevel import accelerate as two_level_accelerate
    from hf_integration import patch_model

    cfg = sp_config(2, args.n, args.m)
    if kind == "plain_loader":
        accelerator = Accelerator(deepspeed_plugin=two_level_accelerate.deepspeed_plugin(cfg),
                                  kwargs_handlers=two_level_accelerate.kwargs_handlers(cfg))
    else:
        accelerator = two_level_accelerate.accelerator(cfg)
    mesh = two_level_accelerate.build_mesh(accelerator)
    plugin_config = accelerator.state.deepspeed_plugin.deepspeed_config  # Ulysses reaching prepare: refused
    plugin_config["sequence_parallel_size"] = 2
    record.data["ulysses_problem"] = two_level_accelerate.prepare_problem(accelerator, mesh) or ""
    del plugin_config["sequence_parallel_size"]
    model = sp_model("llama")
    patch_model(model, mesh, sequence_parallel=kind == "plain_loader", vocab_parallel=True)
    opt = torch.optim.AdamW(model.parameters(), lr=SP_LR)
    data = torch.utils.data.DataLoader(sp_rows(4 * mesh.layout.dp), batch_size=MICRO)
    engine, opt, loader = accelerator.prepare(model, opt, data)
    for batch in loader:
        loss = engine(**batch).loss
        record.data["losses"].append(float(loss))
        accelerator.backward(loss)


@scenario
def trainer_sequence_parallel(args, record: Run, arch: str) -> None:
    """TwoLevelTrainer + DeepSpeed ZeRO-2 with both switches: the Trainer's own loop, sampler and logging;
    each rank trains on its shard of every batch, the logged loss is the whole step's."""
    import ds_twolevel
    from ds_twolevel.hf_trainer import TwoLevelTrainer
    from hf_integration import patch_model

    out = Path(args.out) / f"{record.case}_out"
    cfg = sp_config(2, args.n, args.m)
    targs = _trainer_args(args, out, cfg, save_steps=None, learning_rate=SP_LR, adam_epsilon=SP_EPS)
    mesh = ds_twolevel.build_mesh(cfg)
    model = sp_model(arch)
    patch_model(model, mesh, sequence_parallel=True, vocab_parallel=True)
    whole: list[dict] = []

    class Recording(TwoLevelTrainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            def tee():
                for batch in epoch_iterator:
                    whole.append({k: v.clone() for k, v in batch.items()})
                    yield batch
            return super().get_batch_samples(tee(), num_batches, device)

    run = Recording(model=model, args=targs, train_dataset=sp_rows(64 * mesh.layout.dp))
    grads: dict = {}
    with first_step_grads(grads):
        run.train()
    logs = [h for h in run.state.log_history if "loss" in h]
    record.data["losses"] = [h["loss"] for h in logs]
    record.data["grad_norms"] = [h["grad_norm"] for h in logs]
    dense = sp_dense(arch, _replica_batches(whole, mesh), per_token=True, weight_decay=0.0)
    sp_errors(record, arch, run.model_wrapped, dense, record.data["losses"], grads["grads"], record.data["grad_norms"])


# -- plain DDP ---------------------------------------------------------------------------------------
@scenario
def ddp(args, record: Run, group: str, init_sync: bool = True) -> dict:
    """DistributedDataParallel over the dp group (+ replica_rows: exact) or over the world (refused)."""
    import ds_twolevel
    from torch.nn.parallel import DistributedDataParallel

    mesh = mesh_for(args)
    model = patched(mesh)
    pg = mesh.get_data_parallel_group() if group == "dp" else None
    wrapped = DistributedDataParallel(model, process_group=pg, init_sync=init_sync)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.01)
    data = rows(STEPS * MICRO * mesh.layout.dp)
    for step in range(STEPS):
        batch = ds_twolevel.replica_rows(data[step * MICRO * mesh.layout.dp:(step + 1) * MICRO * mesh.layout.dp], mesh)
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        record.data["grad_norms"].append(float(clip_dense_norm(model, mesh)))
        opt.step()
        opt.zero_grad()
        record.data["batches"].append(batch.tolist())
        record.data["losses"].append(global_loss(loss, mesh))
    return ds_twolevel.dense_state_dict(model)


def clip_dense_norm(model, mesh) -> torch.Tensor:
    """clip_grad_norm_ of the dense model, DeepSpeed's rule: ``tensor_model_parallel`` shards summed over
    the layer's ranks, every other parameter counted once (on tp rank 0)."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.grad is not None]
    counted = [p for p in params if getattr(p, "tensor_model_parallel", False) or mesh.get_model_parallel_rank() == 0]
    sq = sum((p.grad.float() ** 2).sum() for p in counted) + torch.zeros(())
    dist.all_reduce(sq, group=mesh.get_model_parallel_group())
    norm = sq.sqrt()
    scale = (CLIP / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale)
    return norm


# -- the guard: inputs and shards --------------------------------------------------------------------
class _Diverge(LogitsProcessor):
    """Bans the greedy token at decode step ``step`` on one rank: from then on the ranks' inputs differ."""

    def __init__(self, rank: int, step: int) -> None:
        import torch.distributed as dist

        self.active, self.step, self.calls = dist.get_rank() == rank, step, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.active and self.calls == self.step:
            scores = scores.clone()
            scores[torch.arange(scores.shape[0]), scores.argmax(-1)] = -float("inf")
        return scores


def _my_rows(mesh, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) that differ between the ranks of a layer as ``kind`` says."""
    tp = mesh.axes.tp.rank
    ids, mask = rows(3, seed=11), torch.ones(3, SEQ, dtype=torch.long)
    if kind == "batch" and tp == 1:
        ids, mask = ids[:2], mask[:2]
    elif kind == "length" and tp == 1:
        ids, mask = ids[:, :-2], mask[:, :-2]
    elif kind == "ids" and tp == 1:
        ids = ids.clone()
        ids[0, 3] = ids[0, 3] % (VOCAB - 1) + 1
    elif kind == "mask" and tp == 1:
        mask = mask.clone()
        mask[0, :2] = 0
    elif kind == "replicas":  # the dp replicas differ, the ranks of a layer agree: allowed
        ids = rows(3, seed=20 + mesh.axes.dp.rank)
    return ids, mask


@scenario
def inputs(args, record: Run, kind: str, call: str, check: str | None = None) -> dict:
    """A patched model (eval) given inputs that differ between the ranks of one layer (the default
    guard unless ``check`` says otherwise)."""
    from ds_twolevel import guard

    mesh = mesh_for(args)
    model = patched(mesh).eval()
    if NO_GUARD or check is not None:
        guard.configure(model, check_inputs="never" if NO_GUARD else check)
    ids, mask = _my_rows(mesh, kind)
    with torch.no_grad():
        if call == "second":  # the same first forward everywhere, then other ids on one rank
            model(input_ids=rows(3, seed=11), attention_mask=torch.ones(3, SEQ, dtype=torch.long))
            record.data["logits_shape"] = list(model(input_ids=ids, attention_mask=mask).logits.shape)
        elif call == "forward":
            record.data["logits_shape"] = list(model(input_ids=ids, attention_mask=mask).logits.shape)
        elif call == "declared":  # what the ranks hold in common is declared: agreed, then not
            guard.declare_inputs(model, {"input_ids": rows(3, seed=11)})
            model(input_ids=ids, attention_mask=mask)
            guard.declare_inputs(model, {"input_ids": ids})
            model(input_ids=rows(3, seed=11), attention_mask=mask)
        else:
            processors = [_Diverge(rank=1, step=3)] if kind == "decode" else []
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    logits_processor=processors)
            record.data["tokens"] = tokens.tolist()
    record.data["guard"] = [model._twolevel_guard.forwards, model._twolevel_guard.checks]
    return {}


@scenario
def diverging_training(args, record: Run) -> dict:
    """``ds_twolevel.initialize`` (ZeRO-2), default guard: at step 3 the rank with tp rank 1 in the
    first layer group trains on other rows than its layer group (a dataloader bug on one node)."""
    import ds_twolevel

    mesh = mesh_for(args)
    model = build_model()
    config = {**ds_config(2, args.n, args.m), "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}}}
    engine, *_ = ds_twolevel.initialize(model=model, config=config, mesh=mesh)
    if NO_GUARD:
        from ds_twolevel import guard

        guard.configure(engine.module, check_inputs="never")
    data = rows(STEPS * MICRO * mesh.layout.dp)
    for step in range(1, STEPS + 1):
        start = (step - 1) * MICRO * mesh.layout.dp
        batch = ds_twolevel.replica_rows(data[start:start + MICRO * mesh.layout.dp], mesh)
        if step == 3 and mesh.axes.dp.rank == 0 and mesh.axes.tp.rank == 1:
            batch = torch.roll(batch, 1, dims=0) if batch.shape[0] > 1 else batch.flip(-1)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        record.data["batches"].append(batch.tolist())
        record.data["losses"].append(float(loss))
    return None


@scenario
def shards(args, record: Run, kind: str) -> dict:
    """Shards overwritten by a hand-made broadcast, different seeds, or a legitimate load: first forward;
    different settings on the ranks of a layer (their sums in fp32 on some, bf16 on others): patch time."""
    import torch.distributed as dist

    mesh = mesh_for(args)
    tp = mesh.axes.tp
    settings = {"reduce_dtype": "input" if tp.rank % 2 else "fp32"} if kind == "settings" else {}
    model = patched(mesh, seed=tp.rank if kind == "seeds" else 0, **settings)
    if kind == "broadcast":  # what DDP / DeepSpeed's _broadcast_model do, over the layer's ranks
        for p in model.parameters():
            dist.broadcast(p.data, group=tp.group, group_src=0)
    elif kind == "load":  # a checkpoint of the same model (every tensor changed), loaded before the forward
        other = patched(mesh, seed=9)
        model.load_state_dict(other.state_dict())
    ids = rows(2, seed=12)
    loss = model(input_ids=ids, labels=ids).loss
    record.data["losses"] = [float(loss)]
    return {}


@scenario
def recipe(args, record: Run) -> None:
    """recipes/train_hf_trainer.py's main() on the shipped config of this layout (4 steps)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_hf_trainer", REPO / "recipes" / "train_hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = REPO / "ds_configs" / f"zero2_n{args.n}_m{args.m}.json"
    out = Path(args.out) / "recipe_out"
    module.main(["--deepspeed_config", str(config), "--steps", "4", "--save_steps", "2", "--seq", "32",
                 "--out", str(out)])
    record.data["saved"] = sorted(p.name for p in out.iterdir())
    return None


SCENARIOS = [
    # before any engine made DeepSpeed's global TP groups (a later engine without autotp would reuse them)
    ("accelerate_ds_noautotp", accelerate_deepspeed, (2, False)),
    ("accelerate_ds_nogloo", accelerate_deepspeed, (2, True, False)),
    ("accelerate_ds_z2", accelerate_deepspeed, (2,)),
    ("accelerate_ds_z3", accelerate_deepspeed, (3,)),
    ("accelerate_sp", accelerate_sequence_parallel, ("llama",)),
    ("accelerate_sp_qwen3", accelerate_sequence_parallel, ("qwen3",)),
    ("accelerate_sp_plain_loader", accelerate_sequence_parallel_refused, ("plain_loader",)),
    ("accelerate_sp_switch", accelerate_sequence_parallel_refused, ("switch",)),
    ("trainer_sp", trainer_sequence_parallel, ("llama",)),
    ("trainer_sp_qwen3", trainer_sequence_parallel, ("qwen3",)),
    ("accelerate_ddp", accelerate_ddp, ()),
    ("trainer_ds", trainer, ("two_level",)),
    ("trainer_ds_plain_save", trainer, ("plain_ds",)),
    ("trainer_ds_plain_nosave", trainer, ("plain_ds_nosave",)),
    ("trainer_ds_plain_noargs", trainer, ("plain_ds_noargs",)),
    ("trainer_plain", trainer, ("plain",)),
    ("ddp_dp", ddp, ("dp",)),
    ("ddp_world", ddp, ("world",)),
    ("ddp_world_nosync", ddp, ("world", False)),
    ("inputs_batch", inputs, ("batch", "forward")),
    ("inputs_length", inputs, ("length", "forward")),
    ("inputs_ids", inputs, ("ids", "forward")),
    ("inputs_mask", inputs, ("mask", "forward")),
    ("inputs_ids_generate", inputs, ("ids", "generate")),
    ("inputs_ids_second", inputs, ("ids", "second")),
    ("inputs_ids_second_first", inputs, ("ids", "second", "first")),
    ("inputs_declared", inputs, ("ids", "declared")),
    ("inputs_decode", inputs, ("decode", "generate")),
    ("inputs_replicas", inputs, ("replicas", "forward")),
    ("inputs_agree", inputs, ("same", "generate")),
    ("inputs_training_step3", diverging_training, ()),
    ("shards_broadcast", shards, ("broadcast",)),
    ("shards_seeds", shards, ("seeds",)),
    ("shards_settings", shards, ("settings",)),
    ("shards_load", shards, ("load",)),
    ("recipe_trainer", recipe, ()),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--layout", default="2x2", help="n x m (--n would clash with the launchers' options)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="all", help="comma-separated case names, or all")
    parser.add_argument("--extra", default="", help="extra cases: accelerate_ds_z0,accelerate_ds_z1")
    parser.add_argument("--no-guard", action="store_true", help="guard off (shows what it prevents)")
    args = parser.parse_args()
    args.n, args.m = (int(v) for v in args.layout.split("x"))
    global NO_GUARD
    NO_GUARD = args.no_guard
    torch.set_num_threads(1)
    import ds_twolevel

    ds_twolevel.build_mesh(ds_config(0, args.n, args.m))  # init_distributed (gloo on CPU), as users do
    extra = [(f"accelerate_ds_z{s}", accelerate_deepspeed, (s,)) for s in (0, 1)
             if f"accelerate_ds_z{s}" in args.extra.split(",")]
    wanted = args.cases.split(",")
    for case, fn, extra_args in SCENARIOS[:4] + extra + SCENARIOS[4:]:
        if args.cases == "all" or case in wanted:
            fn(args, case, *extra_args)


if __name__ == "__main__":
    main()
