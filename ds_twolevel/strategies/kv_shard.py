"""Strategy ``kv_shard`` (decode, inference only): the segment group's KV cache is held by sequence
position (Helix-style KV parallelism inside the segment group, with the weights still two-level;
DESIGN.md section 7).

Rank j of the segment group stores full-d keys and values of the positions p with p % m == j
(:class:`~.cache.PositionShardedKV`). A decode step of t new tokens per sequence

1. all-gathers the new tokens' q/k/v segments in one packed collective ("qkv_new",
   b*t*(h/n*d + g/n*(d + dv)) elements gathered): every rank now has them at full width, and the
   owner of each new position appends its key and value;
2. attends over its own positions only (:func:`~.fused.partial_attention`: normalised partial output
   o_j and log-sum-exp lse_j, fp32);
3. combines exactly over the group with one all-to-all ("partial_out"): rank r sends rank j its o_r
   columns of segment j plus lse_r (4 bytes, bit-packed into the payload's dtype), and rank j forms
   o = sum_r softmax_r(lse_r) o_r for its dv/m columns - the row-parallel o_proj's input.

Per layer and step each rank sends (m-1)/m * b*t*(h/n*d + g/n*(d+dv)) + (m-1)/m * b*h/n*t*(dv + m*c)
elements (c = 4 / element size, the log-sum-exp's share of each chunk): independent of the context
length. DESIGN.md's alternatives send (m-1) * b*h/n*t*(dv + 2) (all-gather of (o_j, mu_j, l_j): every
rank receives all dv columns of everyone) or (m-1)/m * b*h/n*t*(dv + 4) in three collectives (max
all-reduce of mu, sum all-reduce of l, reduce-scatter of the rescaled o_j); the one all-to-all is
within (m*c - 4) elements per row of the latter (a few percent at dv = 128) at a third of its
latencies, which dominate a decode step.

No backward: decode is inference (``applies`` refuses calls that autograd would differentiate).
A prefill into an empty kv_shard cache runs seq_rows and keeps its owned positions of the gathered
k, v (:func:`write_prefill`); a cache written in the dimension layout converts once, explicitly, with
one all-to-all per layer (:func:`convert_segments_cache`).

Registry entry points: :func:`applies`, :func:`collectives`, :func:`ops`, :func:`activation_bytes`,
:func:`attend`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ds_twolevel.parallel.layout import AxisGroup
from ds_twolevel.parallel import collectives as comm
from ds_twolevel.strategies.base import AttendContext, AttentionCall, Collective, Op
from ds_twolevel.strategies.fused import partial_attention
from ds_twolevel.strategies.row_masks import check_kv_len, position_mask
from ds_twolevel.strategies.rows import owned_count

if TYPE_CHECKING:
    from ds_twolevel.strategies.base import ModelConfig
    from ds_twolevel.layers.seq_cache import PositionShardedKV

NAME = "kv_shard"
AUTO = True
"""chosen by the cache layout: it is the only strategy that reads a non-empty kv_shard cache."""
LAYOUTS = ("kv_shard",)
BACKWARD = False
"""inference only."""


# -- registry: applicability and costs (pure) ------------------------------------------------------
def why_not(call: AttentionCall) -> str | None:
    """Why kv_shard cannot compute ``call`` (None when it can)."""
    if call.softcap:
        return ("kv_shard runs fused attention, which cannot soft-cap the scores (Gemma2); use score_allreduce or "
                "qk_allgather for this model")
    if getattr(call, "sinks", False):
        return ("kv_shard runs fused attention, which has no attention sinks (GPT-OSS); use score_allreduce or "
                "qk_allgather for this model")
    if getattr(call, "cache_layout", "segments") != "kv_shard":
        return "kv_shard reads a cache held by position: build the cache with layout='kv_shard'"
    if not getattr(call, "cached", call.kv_len - call.q_len):
        return "the kv_shard cache is empty: the prefill runs seq_rows and writes its positions"
    if getattr(call, "grad", False) or getattr(call, "dropout", False):
        return ("kv_shard is inference only (no backward, no attention dropout); run decoding under "
                "torch.no_grad() in eval mode, as generate() does")
    return None


def applies(call: AttentionCall) -> bool:
    """kv_shard computes ``call``: a kv_shard cache that already holds positions, inference only."""
    return why_not(call) is None


def lse_columns(element_size: int) -> int:
    """Payload elements that carry one fp32 log-sum-exp (4 bytes) in a tensor of ``element_size``."""
    return max(1, 4 // element_size)


def collectives(call: AttentionCall) -> list[Collective]:
    """Forward collectives over the segment axis, as :func:`attend` issues them (none depends on s_kv)."""
    c, m = call, call.m
    if m == 1:
        return []
    t, hl, gl, dv = c.q_len, c.local_heads, c.local_kv_heads, c.v_dim
    cols = dv // m + lse_columns(getattr(c, "element_size", 4))
    return [Collective("all_gather", "m", "qkv_new", c.batch * t * (hl * c.head_dim + gl * (c.head_dim + dv)), m),
            Collective("all_to_all", "m", "partial_out", m * c.batch * hl * t * cols, m)]


def ops(model: "ModelConfig", call: AttentionCall, eb: int) -> list[Op]:
    """Compute ops of one decode step of one layer on one rank: its positions at full d (the same
    K/V bytes as the dimension split: 1/m of the group's cache)."""
    c, H, m = call, model.hidden, call.m
    t, d, dv = c.batch * c.q_len, c.head_dim, c.v_dim
    hl, gl = c.local_heads, c.local_kv_heads
    own = -(-c.kv_len // m)  # positions of the most loaded rank
    qkv_out = hl * d // m + gl * (d + dv) // m
    scores = t * hl * own
    kv_read = c.batch * gl * own * (d + dv) * eb
    return [Op("qkv_proj", 2 * t * H * qkv_out, (H * qkv_out + t * H + t * qkv_out) * eb),
            Op("partial_attention", 2 * scores * (d + dv) + 5 * scores, kv_read + t * hl * (d + dv) * eb),
            Op("combine", 4 * t * hl * dv, 2 * m * t * hl * (dv // m + 1) * eb),
            Op("o_proj", 2 * t * hl * dv // m * H, (hl * dv // m * H + t * hl * dv // m + t * H) * eb)]


def activation_bytes(model: "ModelConfig", call: AttentionCall, eb: int) -> float:
    """Largest set of live activations of one decode step on one rank (inference)."""
    c, m = call, call.m
    t, d, dv = c.batch * c.q_len, c.head_dim, c.v_dim
    own = -(-c.kv_len // m)
    new = t * (c.local_heads * d + c.local_kv_heads * (d + dv))  # gathered q/k/v at full width
    scores = t * c.local_heads * own * 4 // eb  # fp32 scores of the explicit path
    partial = 2 * t * c.local_heads * (dv + 2 * lse_columns(eb))
    mlp = (3 if model.gated else 2) * t * model.intermediate // (c.m * c.n)
    return (2 * t * model.hidden + max(new + scores + partial, mlp)) * eb


# -- collectives of a step --------------------------------------------------------------------------
def gather_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               seg: AxisGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The new tokens' (b, hl, t, d/m), (b, gl, t, d/m), (b, gl, t, dv/m) segments -> full width
    (dims in segment order), in one all-gather ("qkv_new")."""
    parts = (q, k, v)
    local = torch.cat([p.reshape(-1) for p in parts]).view(1, -1)  # (1, N)
    gathered = comm.all_gather_dim(local, seg, 0, "qkv_new")  # (m, N)
    out, offset = [], 0
    for p in parts:
        b, heads, t, wl = p.shape
        piece = gathered[:, offset:offset + p.numel()].view(seg.size, b, heads, t, wl)
        out.append(piece.permute(1, 2, 3, 0, 4).reshape(b, heads, t, seg.size * wl))  # (b, heads, t, w)
        offset += p.numel()
    return out[0], out[1], out[2]


def _lse_payload(lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., ) fp32 log-sum-exp -> (..., c) elements of ``dtype`` carrying its 4 bytes exactly."""
    if torch.empty((), dtype=dtype).element_size() >= 4:
        return lse.to(dtype).unsqueeze(-1)
    return lse.contiguous().unsqueeze(-1).view(dtype)  # fp32 bits as 2 x 16-bit elements


def _lse_from_payload(cols: torch.Tensor) -> torch.Tensor:
    if cols.element_size() >= 4:
        return cols[..., 0].float()
    return cols.contiguous().view(torch.float32)[..., 0]


def combine(out: torch.Tensor, lse: torch.Tensor, seg: AxisGroup) -> torch.Tensor:
    """Exact combine of the ranks' partial attentions: normalised (b, hl, t, dv) outputs and (b, hl, t)
    fp32 log-sum-exps -> this rank's (b, hl, t, dv/m) columns of the full attention. One all-to-all."""
    m = seg.size
    if m == 1:
        return out
    b, hl, t, dv = out.shape
    payload = _lse_payload(lse, out.dtype)  # (b, hl, t, c)
    cols = payload.shape[-1]
    send = torch.cat([out.view(b, hl, t, m, dv // m), payload.unsqueeze(3).expand(b, hl, t, m, cols)], -1)
    recv = comm.all_to_all_dim0(send.permute(3, 0, 1, 2, 4), seg, "partial_out")  # (m, b, hl, t, dv/m + c)
    weights = torch.softmax(_lse_from_payload(recv[..., dv // m:]), dim=0)  # (m, b, hl, t): e^(lse_r - lse)
    work = torch.promote_types(out.dtype, torch.float32)
    return (weights.unsqueeze(-1).to(work) * recv[..., :dv // m].to(work)).sum(0).to(out.dtype)


# -- attend -----------------------------------------------------------------------------------------
def attend(ctx: AttendContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """One decode step against ``ctx.store``: (b, hl, t, dv/m) outputs for the row-parallel o_proj.

    q, k, v are this rank's segments of the t new tokens (after norm and RoPE); ``mask`` the layer's
    raw mask over all kv = cached + t positions (None: causal among the new tokens).

    Example:
        >>> out = attend(AttendContext(mesh.axes.seg, 0.125, True, store=cache.position_store(0, 2, j)), q, k, v, None)
    """
    store: "PositionShardedKV" = ctx.store
    b, hl, t, _ = q.shape
    kv = store.global_length + t
    check_kv_len(mask, b, kv)
    q_full, k_full, v_full = gather_new(q, k, v, ctx.seg)
    store.append_positions(k_full, v_full)
    keys, values = store.keys, store.values  # (b, gl, P, d), (b, gl, P, dv)
    cols = position_mask(mask, positions=store.positions(q.device), q_len=t, kv_len=kv, causal=ctx.causal,
                         q_heads=ctx.q_heads, local_heads=hl, dtype=q.dtype)
    out, lse = partial_attention(q_full, keys, values, cols, scale=ctx.scaling)
    return combine(out, lse, ctx.seg)


# -- writing and converting the kv_shard layout -----------------------------------------------------
def write_prefill(store: "PositionShardedKV", k_full: torch.Tensor, v_full: torch.Tensor, positions: int) -> None:
    """Keep this rank's positions of a prefill's gathered full-width (b, gl, s', d) keys / values
    (seq_rows' :func:`~.seq_rows.attend_full`; only the first ``positions`` are real). No collective."""
    store.append_positions(k_full[:, :, :positions], v_full[:, :, :positions])


def positions_from_segments(parts: list[torch.Tensor], seg: AxisGroup, tag: str) -> list[torch.Tensor]:
    """Dimension layout -> kv_shard layout: (b, gl, L, w/m) segments of every position -> this rank's
    positions (p % m == j) at full width, (b, gl, P_j, w). One all-to-all for all ``parts`` (each
    chunk padded to ceil(L/m) positions)."""
    m, L = seg.size, parts[0].shape[-2]
    widths = [p.shape[-1] for p in parts]
    per = -(-L // m)  # positions per rank, padded
    packed = F.pad(torch.cat(parts, -1), (0, 0, 0, per * m - L))  # (b, gl, per*m, sum w/m)
    b, gl = packed.shape[:2]
    send = packed.view(b, gl, per, m, sum(widths)).permute(3, 0, 1, 2, 4)  # chunk j: positions idx*m + j
    recv = comm.all_to_all_dim0(send, seg, tag)  # chunk r: rank r's segment dims of my positions
    own = owned_count(L, seg.rank, m)
    out, offset = [], 0
    for w in widths:
        piece = recv[..., offset:offset + w].permute(1, 2, 3, 0, 4).reshape(b, gl, per, m * w)
        out.append(piece[:, :, :own])
        offset += w
    return out


def write_prefill_qk_allgather(store: "PositionShardedKV", k_full: torch.Tensor, v_seg: torch.Tensor,
                               seg: AxisGroup) -> None:
    """A qk_allgather prefill (keys already gathered at full d, values still dim segments) written into
    the kv_shard layout: keys sliced locally, values by one all-to-all ("v_positions")."""
    (v_own,) = positions_from_segments([v_seg], seg, "v_positions")
    first = store.rank  # a prefill into an empty store starts at position 0
    assert store.global_length == 0, "qk_allgather writes the first prefill of a layer"
    store.append(k_full[:, :, first::seg.size], v_own)
    store.global_length = k_full.shape[-2]


def convert_segments_cache(source: Any, target: Any, seg: AxisGroup, layers: list[int]) -> None:
    """Convert, once and explicitly, a cache written in the dimension layout (``KVCache``,
    ``DynamicCache`` or a "segments" :class:`~.cache.SeqShardCache`) into a kv_shard ``target``:
    one all-to-all ("kv_positions") per layer. Collective over the segment group."""
    for idx in layers:
        k_seg, v_seg = _layer_kv(source, idx)
        k_own, v_own = positions_from_segments([k_seg, v_seg], seg, "kv_positions")
        store = target.position_store(idx, seg.size, seg.rank)
        store.reset()
        store.append(k_own, v_own)
        store.global_length = k_seg.shape[-2]


def _layer_kv(cache: Any, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a dimension-layout cache of any of the supported kinds."""
    if hasattr(cache, "stores"):
        return cache.stores[idx].keys, cache.stores[idx].values
    if hasattr(cache, "layers"):  # Hugging Face Cache
        return cache.layers[idx].keys, cache.layers[idx].values
    return cache.keys[idx], cache.values[idx]  # ds_twolevel.layers.cache.KVCache
