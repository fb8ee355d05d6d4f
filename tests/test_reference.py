"""The float64 reference behind ``check`` (``ringpack.yardstick``): blockwise (memory linear in the document
length) and still exactly the dense per-document softmax attention of the mask rule.

The dense implementation below is the reference as it was before it went blockwise (it built [H, L, L] scores:
57 GiB at 131072 tokens). Both are float64; they differ only in how sums are grouped, hence 1e-13.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ringpack import checking, yardstick
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.yardstick import reference_attention, reference_grads

MIXES = [(0, 1, 7, 97, 31, 0, 13, 64), (211,), (5,) * 12 + (3, 1)]
MASKS = [(True, (-1, -1)), (False, (-1, -1)), (True, (9, -1)), (False, (6, 4)), (True, (0, 0)), (False, (-1, 2))]


def _dense(q, k, v, cu, *, causal, window_size, softcap):
    """Per-document softmax attention with the whole [H, L, L] score matrix of every document."""
    left, right = window_size
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        if b == a:
            continue
        qd = q[a:b].transpose(0, 1)
        kd, vd = (t[a:b].repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
        s = qd @ kd.transpose(1, 2) / math.sqrt(q.shape[2])
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        visible = (j <= i if causal else torch.ones_like(i == j)) & (j >= i - left if left >= 0 else True) & \
            (j <= i + right if right >= 0 else True)
        s = s.masked_fill(~visible, float("-inf"))
        outs.append((torch.softmax(s, -1) @ vd).transpose(0, 1))
        lses.append(torch.logsumexp(s, -1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _inputs(lengths, heads, kv_heads, seed=0):
    cu = lengths_to_cu_seqlens(lengths).tolist()
    gen = torch.Generator().manual_seed(seed)
    total = cu[-1]
    q, dout = (torch.randn(total, heads, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(total, kv_heads, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    return cu, q, k, v, dout, torch.randn(heads, total, generator=gen, dtype=torch.float64)


def _dense_grads(q, k, v, dout, dlse, cu, **mask):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = _dense(q, k, v, cu, **mask)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    return [out.detach(), lse.detach(), *grads]


@pytest.mark.parametrize("lengths", MIXES)
def test_blockwise_reference_is_the_dense_one(lengths, monkeypatch):
    """Blocks of a few rows (many per document) against the dense reference, for every mask, GQA and softcap:
    a block whose key range missed a visible key, or a row in two blocks, would be off by O(1)."""
    monkeypatch.setattr(yardstick, "BLOCK_SCORES", 12000)  # 4 heads: 14 rows a block at 211 tokens, 30 at 97
    for (causal, window), (heads, kv_heads, softcap) in itertools.product(MASKS, [(4, 4, 0.0), (4, 1, 2.5)]):
        cu, q, k, v, dout, dlse = _inputs(lengths, heads, kv_heads)
        mask = {"causal": causal, "window_size": window, "softcap": softcap}
        want = _dense_grads(q, k, v, dout, dlse, cu, **mask)
        got = reference_grads(q, k, v, dout, dlse, cu, **mask)
        for name, a, b in zip(checking.GRAD_NAMES, got, want):
            assert (a - b).abs().max() < 1e-13, (name, mask)
        out, lse = reference_attention(q, k, v, cu, **mask)
        assert (out - want[0]).abs().max() < 1e-13 and (lse - want[1]).abs().max() < 1e-13


def test_reference_attention_differentiates_through_its_blocks(monkeypatch):
    """``reference_attention`` recomputes each block in the backward pass (checkpoint): its autograd gradients
    must be those ``reference_grads`` takes block by block."""
    monkeypatch.setattr(yardstick, "BLOCK_SCORES", 100)
    cu, q, k, v, dout, dlse = _inputs(MIXES[0], 4, 2)
    want = reference_grads(q, k, v, dout, dlse, cu, causal=True, window_size=(9, -1))
    got = checking._grads(lambda a, b, c: reference_attention(a, b, c, cu, causal=True, window_size=(9, -1)),
                          q, k, v, dout, dlse)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-13


@pytest.mark.parametrize("causal, window", MASKS)
def test_blocks_cover_every_visible_pair_within_a_fixed_size(causal, window):
    """Memory stays linear in the document length: no block holds more than BLOCK_SCORES scores, even for a
    131072-token document with 32 heads; and on a small one the blocks hold every row once and every key
    each row may see (brute force over the mask rule)."""
    blocks = yardstick._blocks([0, 131072], 32, causal, window)
    assert max(32 * (b.r1 - b.r0) * (b.k1 - b.k0) for b in blocks) <= yardstick.BLOCK_SCORES
    left, right = window
    for heads in (1, 3):
        blocks = yardstick._blocks([0, 50, 50, 77], heads, causal, window)
        rows = [(b.start, r) for b in blocks for r in range(b.r0, b.r1)]
        assert rows == [(0, r) for r in range(50)] + [(50, r) for r in range(27)]
        for b in blocks:
            n = 50 if b.start == 0 else 27
            for i, j in itertools.product(range(b.r0, b.r1), range(n)):
                seen = (not causal or j <= i) and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
                assert not seen or b.k0 <= j < b.k1
