"""Attention strategies: one module each, listed by :mod:`.registry` (``plan_call`` decides per call).

* :mod:`.score_allreduce` - partial scores summed over the segment group (split softmax, causal
  blocks, V-gather tail);
* :mod:`.qk_allgather` - full-d q and k gathered, fused attention;
* :mod:`.seq_rows` - prefill/training by query rows, full-width K/V (DESIGN.md section 7);
* :mod:`.kv_shard` - decode against a KV cache held by position (exact log-sum-exp combine).

:mod:`.base` holds the records they share (``AttentionCall``, ``Collective``, ``Op``,
``AttendContext``); :mod:`.common`, :mod:`.causal_blocks`, :mod:`.rows`, :mod:`.fused`,
:mod:`.row_masks` and :mod:`.comm` are their building blocks.
"""
