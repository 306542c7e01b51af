"""Vocab-parallel input embedding, LM head and causal-LM loss for a Hugging Face model
(``patch_model(..., vocab_parallel=True)``).

The model's ``get_input_embeddings()`` and ``get_output_embeddings()`` are replaced by
:class:`HFVocabEmbedding` / :class:`HFVocabHead` (rank r of the layer's n*m ranks holds vocab rows
``[r*V//p, (r+1)*V//p)``; tied embeddings stay one parameter), and the model's ``loss_function`` by
the vocab-parallel cross-entropy. What ``model(...)`` returns then depends on ``labels``:

- with ``labels``: the head returns this rank's logits columns only, the loss is computed from
  them (equal to Hugging Face's dense loss), and ``outputs.logits`` is None: no rank ever holds
  full-vocab logits in training, and nobody can mistake a shard for the logits;
- without ``labels`` (inference, ``generate()``): the head all-gathers the full-vocab logits of
  the positions it is given (``generate`` asks for the last position only: ``logits_to_keep=1``).

Example:
    >>> report = patch_model(model, mesh, vocab_parallel=True)
    >>> model(input_ids, labels=labels).loss.backward()      # outputs.logits is None
    >>> model.generate(input_ids, max_new_tokens=8)           # the unpatched model's tokens
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_twolevel.layers.vocab_parallel import IGNORE_INDEX, VocabParallelEmbedding, VocabParallelLMHead, token_losses
from ds_twolevel.parallel.collectives import copy_to_axis
from ds_twolevel.parallel.layout import TwoLevelMesh
from ds_twolevel.parallel.sequence import gather_tokens_no_grad, local_range

from hf_integration.specs import get_path, set_path
from hf_integration.weights import TensorMap

CAUSAL_LOSS = "ForCausalLM"
"""the only Hugging Face ``loss_type`` the vocab-parallel loss stands in for."""


def _tensor_maps(vocab: int, hidden: int, bias: bool) -> dict[str, TensorMap]:
    maps = {"weight": TensorMap("weight", (vocab, hidden), 0, field="vocab rows")}
    if bias:
        maps["bias"] = TensorMap("bias", (vocab,), 0, field="vocab rows")
    return maps


class HFVocabEmbedding(VocabParallelEmbedding):
    """A Hugging Face model's input embedding, split by vocab rows (the partitioned-layer protocol:
    ``tensor_maps``, ``shard_index``, ``owner_class``, ``target``; see ``hf_integration.partitioned``).

    Example:
        >>> emb = HFVocabEmbedding.from_hf(model.get_input_embeddings(), mesh.axes.tp)
    """

    target = ""
    tied = False

    @classmethod
    def from_hf(cls, dense: nn.Embedding, tp: Any, *, reduce_dtype: Any = torch.float32,
                sequence_parallel: bool = False) -> "HFVocabEmbedding":
        emb = cls.from_dense(dense, tp, reduce_dtype=reduce_dtype, sequence_parallel=sequence_parallel)
        emb.owner_class = type(dense).__name__
        emb.tensor_maps = _tensor_maps(dense.num_embeddings, dense.embedding_dim, False)
        return emb.train(dense.training)

    def replicated_tensors(self) -> dict[str, str]:
        return {}

    def dense_numel(self) -> int:
        """Parameters of the dense embedding."""
        return self.num_embeddings * self.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, s) ids -> (b, s, H); with ``sequence_parallel`` (set for a sharded call by the sequence-parallel
        model) this rank's (b, s/p) ids -> its (b, s/p, H): the ids of the whole sequence are all-gathered
        (integers, tag "embed_ids"), looked up, and reduce-scattered along s."""
        if self.sequence_parallel:
            input_ids = gather_tokens_no_grad(input_ids, self.tp, "embed_ids", dim=1)  # (b, s)
        return super().forward(input_ids)


class HFVocabHead(VocabParallelLMHead):
    """A Hugging Face model's LM head, split by vocab rows. ``loss_mode`` (set for one forward by the
    model's hook when ``labels`` are given): return this rank's logits columns; otherwise the
    all-gathered full-vocab logits of the positions given.

    Example:
        >>> head = HFVocabHead.from_hf(model.get_output_embeddings(), mesh.axes.tp)
    """

    target = ""

    @classmethod
    def from_hf(cls, dense: nn.Linear, tp: Any, *, tied_to: HFVocabEmbedding | None = None,
                reduce_dtype: Any = torch.float32) -> "HFVocabHead":
        head = cls.from_dense(dense, tp, weight=None if tied_to is None else tied_to.weight, reduce_dtype=reduce_dtype)
        head.owner_class, head.tied, head.loss_mode = type(dense).__name__, tied_to is not None, False
        head.tensor_maps = _tensor_maps(dense.out_features, dense.in_features, dense.bias is not None)
        return head.train(dense.training)

    def replicated_tensors(self) -> dict[str, str]:
        return {}

    def dense_numel(self) -> int:
        """Parameters of the dense head; a tied weight is counted once, with the embedding."""
        own = 0 if self.tied else self.out_features * self.in_features
        return own + (self.out_features if self.bias is not None else 0) + (self.weight.numel() if self.tied else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, H) -> (b, s, V_r) in ``loss_mode``, else (b, s, V) gathered."""
        return self.local_logits(x) if self.loss_mode else self.full_logits(x)


# -- finding, checking and replacing -----------------------------------------------------------------
def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(path for path, mod in model.named_modules() if mod is module)


def vocab_plan(model: nn.Module, mesh: TwoLevelMesh, *, name: str) -> dict[str, Any]:
    """Checked paths and shapes of the embedding and head to split (no module touched, no collective):
    ValueError naming the model, the modules and what would work."""
    p = mesh.axes.tp.size
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(emb) is not nn.Embedding or type(head) is not nn.Linear:
        raise ValueError(f"{name}: vocab_parallel needs an nn.Embedding input embedding and an nn.Linear output head "
                         f"(get_input_embeddings / get_output_embeddings), this model has "
                         f"{type(emb).__name__} and {type(head).__name__}; use vocab_parallel=False")
    loss_type = getattr(model, "loss_type", None)
    if loss_type != CAUSAL_LOSS:
        raise ValueError(f"{name}: vocab_parallel stands in for the causal-LM loss (loss_type {CAUSAL_LOSS!r}); this "
                         f"model's loss_type is {loss_type!r}; use vocab_parallel=False")
    for what, mod in (("input embedding", emb), ("output head", head)):
        if getattr(mod, "max_norm", None) is not None or getattr(mod, "scale_grad_by_freq", False) or getattr(mod, "sparse", False):
            raise ValueError(f"{name}: the {what} uses max_norm / scale_grad_by_freq / sparse, which the vocab-parallel "
                             f"embedding does not implement; use vocab_parallel=False")
    vocab, hidden = emb.num_embeddings, emb.embedding_dim
    if (head.out_features, head.in_features) != (vocab, hidden):
        raise ValueError(f"{name}: the output head is ({head.out_features}, {head.in_features}) but the embedding "
                         f"({vocab}, {hidden}); vocab_parallel needs both over the same vocabulary")
    if vocab < p:
        raise ValueError(f"{name}: vocab_size ({vocab}) is smaller than the n*m = {p} ranks it would be split over; "
                         f"use vocab_parallel=False")
    return dict(embedding=_path_of(model, emb), head=_path_of(model, head), tied=head.weight is emb.weight)


def install_vocab_parallel(model: nn.Module, mesh: TwoLevelMesh, plan: dict[str, Any], *,
                           reduce_dtype: Any = torch.float32) -> None:
    """Replace the embedding and head of ``model`` (checked by :func:`vocab_plan`) with this rank's rows,
    and route its causal-LM loss through the vocab-parallel cross-entropy."""
    tp = mesh.axes.tp
    emb = HFVocabEmbedding.from_hf(get_path(model, plan["embedding"]), tp, reduce_dtype=reduce_dtype)
    head = HFVocabHead.from_hf(get_path(model, plan["head"]), tp, tied_to=emb if plan["tied"] else None,
                               reduce_dtype=reduce_dtype)
    set_path(model, plan["embedding"], emb)
    set_path(model, plan["head"], head)
    model.loss_function = VocabParallelCausalLoss(head)
    model._twolevel_vocab_hooks = (model.register_forward_pre_hook(_enter_loss_mode, with_kwargs=True),
                                   model.register_forward_hook(_leave_loss_mode, with_kwargs=True))


def retie(model: nn.Module) -> None:
    """Point a tied head at the embedding's (new) shard parameter again: after loading replaced a
    meta parameter by a real one."""
    head = vocab_head(model)
    if head is not None and head.tied:
        head.weight = model.get_input_embeddings().weight


def vocab_head(model: nn.Module) -> HFVocabHead | None:
    """The model's vocab-parallel head, None when it has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, HFVocabHead) else None


def vocab_layers(model: nn.Module) -> list[nn.Module]:
    """The vocab-parallel modules of ``model`` (embedding, head)."""
    return [m for m in model.modules() if isinstance(m, (HFVocabEmbedding, HFVocabHead))]


# -- the loss and the forward hooks -----------------------------------------------------------------
class VocabParallelCausalLoss:
    """Stands in for Hugging Face's ``ForCausalLMLoss`` (same arguments): labels shifted by one (or
    ``shift_labels``), ``ignore_index`` skipped, mean over counted tokens or sum / ``num_items_in_batch``,
    from the head's logits columns.

    Example:
        >>> model.loss_function = VocabParallelCausalLoss(model.get_output_embeddings())
    """

    def __init__(self, head: HFVocabHead) -> None:
        self.head = head

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                 num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                 shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        head = self.head
        if not head.loss_mode or logits.shape[-1] != head.rows:
            raise ValueError(f"the vocab-parallel loss got logits of shape {tuple(logits.shape)}, not this rank's "
                             f"{head.rows} vocab columns; call the model with labels= (its forward computes the loss), "
                             f"or use ds_twolevel.layers.vocab_parallel.vocab_parallel_cross_entropy on head shards")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # tokens < n predict n
        mine = slice(None)
        if head.sequence_parallel:  # the head's logits cover the whole sequence; this rank's share: its tokens
            shift_labels = gather_tokens_no_grad(shift_labels, head.tp, "labels", dim=1)  # (b, s)
            mine = slice(*local_range(shift_labels.shape[1], head.tp))
        count = (shift_labels != ignore_index).sum()  # the whole batch's counted tokens
        losses = token_losses(logits, shift_labels.to(logits.device), vocab_start=head.start, tp=head.tp,
                              ignore_index=ignore_index, reduce_dtype=head.reduce_dtype or torch.float32,
                              vocab_size=vocab_size)
        if head.sequence_parallel:
            # every rank holds every token's loss but backpropagates only its own tokens' share: the
            # per-token gradients are summed over tp (backward all-reduce of b*s numbers), so each vocab
            # shard gets the gradient of the whole batch's loss
            losses = copy_to_axis(losses, head.tp, "loss_grad")[:, mine]  # (b, s/p)
        total = losses.sum()
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        return total / count.to(total.device)


def _labels_given(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("labels") is not None:
        return True
    names = [p for p in inspect.signature(model.forward).parameters]
    return "labels" in names[:len(args)] and args[names.index("labels")] is not None


def _enter_loss_mode(model: nn.Module, args: tuple, kwargs: dict) -> None:
    vocab_head(model).loss_mode = _labels_given(model, args, kwargs)


def _leave_loss_mode(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    head = vocab_head(model)
    if not head.loss_mode:
        return output
    head.loss_mode = False
    if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...)
        return (output[0], None, *output[2:])
    output["logits"] = None  # this rank's columns only: never handed out as "the logits"
    return output


__all__ = ["HFVocabEmbedding", "HFVocabHead", "VocabParallelCausalLoss", "install_vocab_parallel", "retie",
           "vocab_head", "vocab_layers", "vocab_plan"]
