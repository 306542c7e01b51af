"""The Hugging Face Trainer with a two-level model: DeepSpeed with ``tensor_parallel.autotp_size = n*m``.

The Trainer trains a patched model exactly through its DeepSpeed integration (the same mechanism as
:mod:`ds_twolevel.accelerate`: DeepSpeed's (dp, tp) groups are the two-level layout's, and
accelerate's dataloader gives one batch per layer group). Two things need help:

- **Saving.** The Trainer writes the model on rank 0 only, but gathering a partitioned model's
  shards is collective. :class:`TwoLevelTrainer` overrides ``save_model``: every rank gathers, rank
  0 writes a dense checkpoint that plain ``from_pretrained`` loads (checkpoints made during training
  get it too, beside DeepSpeed's own files for resuming). With the plain ``Trainer`` the guard refuses
  ``save_strategy`` other than ``"no"`` before the first step, and ``save_model`` at once.
- **Sequence parallelism.** With ``"two_level": {"sequence_parallel": true}`` :class:`TwoLevelTrainer`
  gives each rank its shard of every batch it draws from the train dataloader (the count of label tokens
  taken on the whole batches first) and logs the whole batch's loss.
- **CPU.** Under DeepSpeed, ``TrainingArguments`` creates accelerate's state without a backend, so
  on CPU every process believes it is rank 0 of 1 (``num_processes=1``, the same batches everywhere).
  :func:`training_arguments` creates that state with gloo first and passes
  ``accelerator_config={"use_configured_state": True}`` (accelerate's documented way to hand a state in).

Example:
    >>> mesh = ds_twolevel.build_mesh(cfg)         # before TrainingArguments: ZeRO-3 + zero.Init caveat below
    >>> patch_model(model, mesh)
    >>> args = training_arguments("out", deepspeed=cfg, per_device_train_batch_size=4, ...)
    >>> TwoLevelTrainer(model=model, args=args, train_dataset=data).train()
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ds_twolevel.accelerate import (_device_type, _pad_token_id, allow_sharded_inputs, check_switches, deepspeed_config,
                                    settings_of)
from ds_twolevel.parallel.agreement import agreement
from ds_twolevel.deepspeed.config import load_deepspeed_config

TRAINING_ARGS_NAME = "training_args.bin"


def configure_cpu_state(config: str | os.PathLike | Mapping[str, Any]) -> None:
    """accelerate's process state for DeepSpeed on gloo (what ``TrainingArguments`` gets wrong on CPU);
    then pass ``accelerator_config={"use_configured_state": True}`` (:func:`training_arguments` does both).

    Example:
        >>> configure_cpu_state("ds_configs/zero2_n2_m2.json")
        >>> TrainingArguments("out", deepspeed=cfg, accelerator_config={"use_configured_state": True})
    """
    from accelerate import PartialState

    tl, _ = load_deepspeed_config(config)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # how TrainingArguments itself asks for DeepSpeed
    try:
        PartialState(backend=tl.dist_backend or "gloo", timeout=datetime.timedelta(seconds=tl.timeout_s))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def arguments_from_config(ds: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TrainingArguments`` values a DeepSpeed config fixes (batch, accumulation, clipping, and the
    optimizer's and WarmupLR's settings): the Trainer refuses a config that contradicts its arguments.

    Example:
        >>> arguments_from_config(load_deepspeed_config("ds_configs/zero2_n2_m2.json")[1])["learning_rate"]
        0.001
    """
    out: dict[str, Any] = {}
    names = {"train_micro_batch_size_per_gpu": "per_device_train_batch_size",
             "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm"}
    out.update({arg: ds[key] for key, arg in names.items() if isinstance(ds.get(key), (int, float))})
    opt = (ds.get("optimizer") or {}).get("params") or {}
    for key, arg in (("lr", "learning_rate"), ("eps", "adam_epsilon"), ("weight_decay", "weight_decay")):
        if isinstance(opt.get(key), (int, float)):
            out[arg] = opt[key]
    if isinstance(opt.get("betas"), (list, tuple)) and len(opt["betas"]) == 2:
        out["adam_beta1"], out["adam_beta2"] = opt["betas"]
    sched = (ds.get("scheduler") or {}).get("params") or {}
    if isinstance(sched.get("warmup_num_steps"), int):
        out["warmup_steps"] = sched["warmup_num_steps"]
    return out


def training_arguments(output_dir: str | os.PathLike, *, deepspeed: str | os.PathLike | Mapping[str, Any],
                       **kwargs: Any) -> TrainingArguments:
    """``TrainingArguments(output_dir, deepspeed=...)`` for a two-level config: ``autotp_size = n*m``
    filled in (:func:`ds_twolevel.accelerate.deepspeed_config`), the arguments the config fixes as
    defaults (:func:`arguments_from_config`; yours win), and on CPU the gloo state (:func:`configure_cpu_state`).

    Example:
        >>> args = training_arguments("out", deepspeed="ds_configs/zero2_n2_m2.json", max_steps=100)
    """
    ds = deepspeed_config(deepspeed)
    kwargs = {**arguments_from_config(ds), **kwargs}
    if _device_type() == "cpu":
        kwargs.setdefault("dataloader_pin_memory", False)  # nothing to pin to (the Trainer warns on every rank)
        configure_cpu_state(ds)
        kwargs["accelerator_config"] = {**dict(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
    return TrainingArguments(str(output_dir), deepspeed=ds, **kwargs)


def _sp_mesh(model: Any) -> Any:
    from hf_integration.sequence_parallel import sequence_parallel_state

    state = sequence_parallel_state(model)
    return None if state is None else state.mesh


class TwoLevelTrainer(Trainer):
    """``transformers.Trainer`` whose ``save_model`` gathers the shards on every rank and writes a dense
    checkpoint (plain ``from_pretrained`` loads it); everything else is the Trainer's.

    Example:
        >>> trainer = TwoLevelTrainer(model=model, args=training_arguments("out", deepspeed=cfg), train_dataset=data)
        >>> trainer.train(); trainer.save_model()      # out/model.safetensors is dense
    """

    two_level_saves = True
    """read by the guard: this Trainer saves with every rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's; a model whose ``sequence_parallel`` / ``vocab_parallel`` patching contradicts the
        DeepSpeed config's ``"two_level"`` section is refused (ValueError) here, before any step."""
        super().__init__(*args, **kwargs)
        tl = settings_of(self.args.hf_deepspeed_config) if self.is_deepspeed_enabled else None
        check_switches(self.model, tl, where=type(self).__name__)
        self.sequence_mesh = _sp_mesh(self.model) if tl is not None and tl.sequence_parallel else None
        """the mesh whose tp ranks share each batch's tokens (sequence parallelism), else None."""

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's batches and their count of label tokens, then, under sequence parallelism, this
        rank's shard of each (``hf_integration.sequence_data.shard_batch``).

        The count is taken on the whole batches, as the Trainer takes it: summed over the world and divided
        by ``autotp_size`` (every rank of a layer holds the same whole batches), it is the step's real label
        tokens, so each rank's loss is its tokens' sum over that count and the shares add up to the step's
        loss: no gradient is scaled by the group size."""
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.sequence_mesh is None:
            return batches, count
        from hf_integration.sequence_data import shard_batch, whole_batch

        pad = _pad_token_id(self.model)
        return [shard_batch(whole_batch(b), self.sequence_mesh, pad_token_id=pad) for b in batches], count

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's step; under sequence parallelism it returns (for logging) the sum of the layer's
        shares, the loss of the whole batch, where the Trainer would log this rank's share (and lets the
        ranks of a layer be given different tokens: :func:`ds_twolevel.accelerate.allow_sharded_inputs`)."""
        if self.sequence_mesh is None:
            return super().training_step(model, inputs, num_items_in_batch)
        allow_sharded_inputs(model)
        loss = super().training_step(model, inputs, num_items_in_batch)
        from hf_integration.sequence_data import whole_loss

        return whole_loss(loss, self.sequence_mesh)

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, with DeepSpeed's gradient accumulation steps set now.

        The Trainer accumulates itself and gives accelerate 1 step; under DeepSpeed, accelerate's
        ``prepare`` then replaces it with the DeepSpeed config's value (which the Trainer fills from
        ``gradient_accumulation_steps``) and warns "Gradient accumulation steps mismatch" on every
        rank. Setting that same value here leaves nothing to replace."""
        super().create_accelerator_and_postprocess()
        if self.is_deepspeed_enabled:
            self.accelerator.gradient_accumulation_steps = self.args.gradient_accumulation_steps

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Collective: every rank gathers, rank 0 writes ``output_dir`` (config, dense weights, args)."""
        from ds_twolevel.deepspeed.export import dense_state_dict

        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        wrapped = self.model_wrapped if self.is_deepspeed_enabled else model
        state = dense_state_dict(wrapped)
        with agreement(None, what=f"{type(self).__name__}.save_model({output_dir!r})"):
            if self.args.should_save:
                self._write(model, state, Path(output_dir))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _write(self, model: Any, state: dict[str, torch.Tensor], output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        PreTrainedModel.save_pretrained(model, output_dir, state_dict=state, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / TRAINING_ARGS_NAME)
