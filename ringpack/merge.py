"""Exact merge of partial attention results.

Legend: ``out_THD`` partial output ``[T, H, D]``; ``lse_HT`` its natural-log softmax normaliser ``[H, T]``.

Two partial results over disjoint key sets combine exactly::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

A row that has seen no key yet has ``lse = -inf`` and contributes weight 0; a row that sees no key
at all stays ``out = 0, lse = -inf`` (never NaN). NaN or Inf in the inputs propagate.
"""

from __future__ import annotations

import torch

from ringpack import _ext, _triton


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs; float64 stays float64 so that a float64 ring is exact to rounding."""
    return torch.promote_types(dtype, torch.float32)


def merge_(out_acc_THD: torch.Tensor, lse_acc_HT: torch.Tensor, out_THD: torch.Tensor,
           lse_HT: torch.Tensor) -> None:
    """Merge ``(out_THD, lse_HT)`` into the accumulators in place.

    ``lse_acc_HT`` is fp32 or fp64. ``out_acc_THD`` is fp32 or fp64, or ``out_THD``'s 16-bit dtype for a
    row's last merge: the arithmetic stays fp32 and the result is rounded once, exactly as an fp32
    accumulator converted afterwards would be.
    """
    assert out_acc_THD.shape == out_THD.shape and lse_acc_HT.shape == lse_HT.shape, "merge_: shape mismatch"
    # Triton's kernel first: on an H200 it merged 1.1x (fp32 accumulator) to 1.9x (bf16) faster than the
    # extension's (benchmarks/results/2026-12-02-h200/merge_kernels.md); the extension where Triton is missing.
    if _triton.merge_(out_acc_THD, lse_acc_HT, out_THD, lse_HT):
        return
    if out_THD.is_cuda and _ext.merge_(out_acc_THD, lse_acc_HT, out_THD, lse_HT):
        return
    lse_b = lse_HT.to(lse_acc_HT.dtype)
    hi = torch.maximum(lse_acc_HT, lse_b)
    # When both are -inf the row has seen nothing: shift by 0 so that exp gives 0, not NaN.
    hi = torch.where(hi == float("-inf"), torch.zeros_like(hi), hi)
    w_a = torch.exp(lse_acc_HT - hi)
    w_b = torch.exp(lse_b - hi)
    total = w_a + w_b
    lse_acc_HT.copy_(hi + torch.log(total))
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    w_a = (w_a * inv).t().unsqueeze(-1)
    w_b = (w_b * inv).t().unsqueeze(-1)
    if out_acc_THD.dtype == accumulation_dtype(out_acc_THD.dtype):
        out_acc_THD.mul_(w_a).add_(out_THD.to(out_acc_THD.dtype) * w_b)
    else:  # a 16-bit accumulator: compute in the lse's precision, round once
        out_acc_THD.copy_(out_acc_THD.to(w_a.dtype) * w_a + out_THD.to(w_a.dtype) * w_b)
