"""Fully masked query rows: zeros under a boolean mask (HF sdpa / torch SDPA), as given under an
additive one (HF eager). Single process: m = n = 1 layers against the unpatched HF model; the
8-rank core launch (tests/test_core_distributed.py, padded cases) checks the same rule on every
layout against the dense reference, and the fault matrix's bad-input job at n=1 x m=2 against HF."""
from __future__ import annotations

import copy

import pytest
import torch

from ds_twolevel import TwoLevelLayout
from ds_twolevel.layers.masks import zero_unattended_rows
from ds_twolevel.testing import rel_err
from hf_integration import patch_model
from hf_integration.testing import VOCAB, tiny_model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 full, row 1 all-zeros mask (table row), row 2 left-padded."""
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1] = 0
    mask[2, :3] = 0
    return ids, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "bert"])
def test_all_zeros_mask_matches_hf(arch, impl):
    """Table row: an all-zeros mask under sdpa gave logits rel 1.46 from HF and other tokens."""
    dense = tiny_model(arch, attn_implementation=impl)
    patched = copy.deepcopy(dense)
    patch_model(patched, TwoLevelLayout(n=1, m=1).build())
    ids, mask = _batch()
    with torch.no_grad():
        expected, got = dense(ids, attention_mask=mask).logits, patched(ids, attention_mask=mask).logits
    assert rel_err(got[1], expected[1]) <= 1e-5, rel_err(got[1], expected[1])  # the all-zeros row
    assert rel_err(got, expected) <= 1e-5
    if arch != "bert":
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(patched.generate(ids, **kw), dense.generate(ids, **kw))


def test_rows_that_see_no_key_are_zeroed_only_under_boolean_masks():
    out = torch.ones(2, 4, 3, 5)  # (b, hl, s_q, dv)
    pad = torch.tensor([[1, 1, 1], [0, 0, 1]])  # left padding: rows 0, 1 of sequence 1 see nothing (causal)
    got = zero_unattended_rows(out, pad, causal=True)
    assert got[1, :, :2].abs().max() == 0 and torch.equal(got[1, :, 2], out[1, :, 2]) and torch.equal(got[0], out[0])
    assert torch.equal(zero_unattended_rows(out, pad, causal=False), out)  # bidirectional: key 2 is visible
    per_head = torch.ones(2, 8, 3, 3, dtype=torch.bool)
    per_head[0, 5, 1] = False  # head 5 of 8, query 1: nothing visible; this rank holds heads 4..7
    got = zero_unattended_rows(out, per_head, causal=False, heads=[4, 5, 6, 7])
    assert got[0, 1, 1].abs().max() == 0 and float(got.sum()) == out.sum() - 5
    additive = torch.full((2, 1, 3, 3), torch.finfo(torch.float32).min)
    assert torch.equal(zero_unattended_rows(out, additive, causal=True), out)  # eager: as given (uniform rows)
    assert zero_unattended_rows(out, None, causal=True) is out
