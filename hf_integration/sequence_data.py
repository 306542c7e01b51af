"""Each rank's shard of a batch for a sequence-parallel model (as DeepSpeed's
``UlyssesSPDataLoaderAdapter`` is for Ulysses), and the loss of the whole sequence.

Every rank of a layer's n*m ranks receives the same whole batch (the data-parallel sampler hands the
group one batch) and keeps its contiguous s/p tokens: no collective is needed to cut it.

Example:
    >>> patch_model(model, mesh, sequence_parallel=True)
    >>> for batch in SequenceShardLoader(loader, mesh):
    ...     loss = model(**batch).loss      # this rank's share of the batch's loss
    ...     loss.backward()                 # each rank its own share: the gradients are the batch's
    ...     print(whole_loss(loss, mesh))   # the batch's loss, for logging
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from ds_twolevel.parallel import collectives as comm
from ds_twolevel.parallel.layout import AxisGroup, TwoLevelMesh

IGNORE_INDEX = -100


def _tp(mesh: TwoLevelMesh | AxisGroup) -> AxisGroup:
    return mesh if isinstance(mesh, AxisGroup) else mesh.axes.tp


def shard_batch(batch: Mapping[str, Any], mesh: TwoLevelMesh | AxisGroup, *, pad_token_id: int = 0,
                ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """This rank's shard of a causal-LM batch of whole sequences.

    ``batch``: ``input_ids`` (b, s); optional ``attention_mask`` (b, s) (1 = real token),
    ``labels`` (b, s) unshifted as Hugging Face takes them (default: ``input_ids`` where the mask is
    1), ``position_ids`` (b, s) (default: 0..s-1). Labels are shifted before the cut; s is padded to a
    multiple of p = n*m with ``pad_token_id``, mask 0 and ignored labels. Returns ``input_ids``,
    ``position_ids``, ``attention_mask`` (only when some token is masked), ``labels`` and
    ``shift_labels`` (both the shifted labels of this rank's tokens), ``num_items_in_batch`` (real label
    tokens of the whole batch, so that the ranks' shares add up to the batch's mean loss).

    Example:
        >>> shard = shard_batch({"input_ids": ids, "attention_mask": mask}, mesh)
        >>> shard["input_ids"].shape        # (b, ceil(s / p))
    """
    tp = _tp(mesh)
    ids = batch["input_ids"]
    b, s = ids.shape
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, ignore_index)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(s, device=ids.device).expand(b, s)
    shift = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (b, s): token t predicts label t+1
    pad = -s % tp.size
    whole = s + pad
    if pad:
        ids = F.pad(ids, (0, pad), value=pad_token_id)
        mask = F.pad(torch.ones_like(ids[:, :s]) if mask is None else mask, (0, pad), value=0)
        shift = F.pad(shift, (0, pad), value=ignore_index)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=ids.device)], dim=1)
    per = whole // tp.size
    mine = slice(tp.rank * per, (tp.rank + 1) * per)
    out = {"input_ids": ids[:, mine].contiguous(), "position_ids": positions[:, mine].contiguous(),
           "labels": shift[:, mine].contiguous(), "num_items_in_batch": (shift != ignore_index).sum()}
    out["shift_labels"] = out["labels"]
    if mask is not None and not bool(mask.all()):
        out["attention_mask"] = mask[:, mine].contiguous()
    return out


class SequenceShardLoader:
    """Wrap a DataLoader of whole-sequence batches: yields :func:`shard_batch` of each.

    Every other attribute (``dataset``, ``batch_size``, ``set_epoch``, ...) is the wrapped loader's, so
    code that inspects a prepared loader (accelerate, the Hugging Face Trainer) sees the loader it made.

    Example:
        >>> loader = SequenceShardLoader(DataLoader(data, batch_size=1), mesh, pad_token_id=tok.pad_token_id)
    """

    def __init__(self, loader: Iterable[Mapping[str, Any]], mesh: TwoLevelMesh | AxisGroup, *,
                 pad_token_id: int = 0) -> None:
        self.loader, self.mesh, self.pad_token_id = loader, mesh, pad_token_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield shard_batch(whole_batch(batch), self.mesh, pad_token_id=self.pad_token_id)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def whole_batch(batch: Any) -> Mapping[str, Any]:
    """``batch`` if it is a mapping with 2-D ``input_ids``; ValueError naming what a sequence-parallel
    loader needs otherwise (before any collective).

    Example:
        >>> whole_batch({"input_ids": ids})      # ids: (b, s)
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = (f"a {type(batch).__name__}" if not isinstance(batch, Mapping) else
               f"keys {sorted(batch)}" if ids is None else f"input_ids of shape {tuple(getattr(ids, 'shape', ()))}")
        raise ValueError(f"sequence_parallel: each batch must be a dict with input_ids (b, s) (and optionally "
                         f"attention_mask, labels, position_ids) of whole sequences; the loader gave {got}")
    return batch


def whole_loss(loss: torch.Tensor, mesh: TwoLevelMesh | AxisGroup) -> torch.Tensor:
    """The batch's loss from the ranks' shares (an all-reduce over tp, no gradient): for logging.

    Example:
        >>> whole_loss(model(**shard).loss, mesh)   # == the unsharded model's loss on the batch
    """
    with torch.no_grad():
        return comm.reduce_from_axis(loss.detach().reshape(1), _tp(mesh), "loss").reshape(())
