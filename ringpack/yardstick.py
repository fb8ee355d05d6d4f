"""The float64 yardstick of ``check`` and the test-suite: per-document softmax attention over a global pack.

Written from the mask rule of DESIGN.md directly (dense softmax over the keys a query may see, autograd for the
gradients) and sharing no code with the plan, the backends or the merge. Each document is cut into blocks of
query rows, each dense over the keys its rows may see, so memory stays linear in the document length (a dense
[H, L, L] score matrix is 57 GiB at L = 43690 and 4 heads) while every row is still one exact softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

BLOCK_SCORES = 1 << 22  # scores (heads x query rows x keys) of one block: 32 MiB per float64 tensor


class _Block(NamedTuple):
    """Query rows ``[r0, r1)`` of the document starting at token ``start``, against its keys ``[k0, k1)``: every key
    that one of those rows may see under the mask (positions counted from the document's start)."""

    start: int
    r0: int
    r1: int
    k0: int
    k1: int


def _blocks(cu: Sequence[int], heads: int, causal: bool, window_size) -> list[_Block]:
    """Every document cut into query blocks of at most ``BLOCK_SCORES`` scores, in token order."""
    left, right = window_size
    blocks = []
    for a, b in zip(cu[:-1], cu[1:]):
        n = b - a
        rows = max(1, BLOCK_SCORES // (heads * max(n, 1)))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            k1 = r1 if causal else n
            if right >= 0:
                k1 = min(k1, r1 + right)
            blocks.append(_Block(a, r0, r1, max(0, r0 - left) if left >= 0 else 0, k1))
    return blocks


def _block_attention(q, k, v, block: _Block, *, causal: bool, window_size, scale: float, softcap: float):
    """Dense softmax attention of one block (``q`` its query rows, ``k, v`` its keys): ``(out [a, H, D], lse [H, a])``.

    The mask rule of DESIGN.md, written out: key ``j`` is visible to query ``i`` iff ``causal => j <= i`` and
    ``i - left <= j <= i + right`` (``-1`` unbounded), ``i, j`` counted from the document's start."""
    group = q.shape[1] // k.shape[1]
    left, right = window_size
    qd = q.transpose(0, 1)  # [H, a, D]
    kd = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vd = v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = qd @ kd.transpose(1, 2) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(block.r0, block.r1, device=q.device)[:, None]
    j = torch.arange(block.k0, block.k1, device=q.device)[None, :]
    visible = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=q.device)
    if causal:
        visible &= j <= i
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vd).transpose(0, 1), torch.logsumexp(s, dim=-1)


def _rows(block: _Block) -> tuple[slice, slice]:
    """The block's query rows and keys as slices of the global pack."""
    return slice(block.start + block.r0, block.start + block.r1), slice(block.start + block.k0, block.start + block.k1)


def reference_attention(q, k, v, cu_seqlens, *, causal: bool, window_size=(-1, -1), softmax_scale=None,
                        softcap: float = 0.0):
    """Per-document softmax attention over the global pack: ``(out [T, H, D], lse [H, T])``, differentiable.

    Computed block by block (each block dense over the keys its rows may see), so memory stays linear in the
    document length; under autograd each block is recomputed in the backward pass instead of being kept."""
    cu = [int(x) for x in cu_seqlens]
    n_heads = q.shape[1]
    options = {"causal": causal, "window_size": window_size, "softcap": softcap,
               "scale": 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else softmax_scale}
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, lses = [], []
    for block in _blocks(cu, n_heads, causal, window_size):
        rows, keys = _rows(block)
        if track:
            out, lse = checkpoint(_block_attention, q[rows], k[keys], v[keys], block, use_reentrant=False, **options)
        else:
            out, lse = _block_attention(q[rows], k[keys], v[keys], block, **options)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros(n_heads, 0)
    return torch.cat(outs), torch.cat(lses, dim=1)


def reference_grads(q, k, v, dout, dlse, cu_seqlens, *, causal: bool, window_size=(-1, -1), softmax_scale=None,
                    softcap: float = 0.0, progress=None) -> list[torch.Tensor]:
    """``[out, lse, dq, dk, dv]`` of :func:`reference_attention`, the gradients those of
    ``sum(out * dout) + sum(lse * dlse)``, block by block: the loss is a sum over query rows, so its gradient is
    the sum of every block's (autograd's, on that block alone). ``progress(fraction)`` is called after each block."""
    cu = [int(x) for x in cu_seqlens]
    options = {"causal": causal, "window_size": window_size, "softcap": softcap,
               "scale": 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else softmax_scale}
    out, dq, dk, dv = (torch.zeros_like(t) for t in (q, q, k, v))
    lse = q.new_zeros(q.shape[1], q.shape[0])
    blocks = _blocks(cu, q.shape[1], causal, window_size)
    total, done = sum((b.r1 - b.r0) * (b.k1 - b.k0) for b in blocks), 0
    for block in blocks:
        rows, keys = _rows(block)
        inputs = [t[s].detach().requires_grad_(True) for t, s in ((q, rows), (k, keys), (v, keys))]
        with torch.enable_grad():
            out_b, lse_b = _block_attention(*inputs, block, **options)
            loss = (out_b * dout[rows]).sum() + (lse_b * dlse[:, rows]).sum()
            grads = torch.autograd.grad(loss, inputs)
        out[rows], lse[:, rows] = out_b.detach(), lse_b.detach()
        dq[rows] += grads[0]
        dk[keys] += grads[1]
        dv[keys] += grads[2]
        done += (block.r1 - block.r0) * (block.k1 - block.k0)
        if progress is not None:
            progress(done / total)
    return [out, lse, dq, dk, dv]
