"""Triton kernels for the two operations the CUDA extension (``csrc/``) fuses: merging a partial ``(out, lse)`` into
the accumulators, and gathering row runs. Triton ships with CUDA builds of torch and compiles at run time, so a
plain ``pip install`` (no compiler) gets one kernel where torch alone takes many.

Legend: ``out_THD`` ``[T, H, D]`` rows (any row and head strides, unit stride along ``D``); ``lse_HT`` ``[H, T]`` fp32.
One program merges one row's heads (a block of them), in fp32::

    lse = log(exp(lse_acc) + exp(lse_b)),  out_acc = w_a * out_acc + w_b * out_b

An accumulator row with lse = -inf has weight 0 and is not read (it may hold anything); a pair that has seen no
key on either side gets out 0, lse -inf. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship no Triton
    triton = None

if triton is not None:
    # Full-precision expf/logf, as the extension's (the interpreter, which runs these kernels on the CPU in tests,
    # has only Triton's own fast ones).
    try:
        from triton.language.extra import libdevice as _math
    except ImportError:
        _math = tl
    if os.environ.get("TRITON_INTERPRET") == "1":
        _math = tl

    @triton.jit
    def _merge_kernel(acc, lacc, b, lb, heads, dim, acc_st, acc_sh, lacc_sh, lacc_st, b_st, b_sh, lb_sh, lb_st,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = h < heads
        la = tl.load(lacc + h * lacc_sh + t * lacc_st, mask=h_ok, other=float("-inf"))
        lbv = tl.load(lb + h * lb_sh + t * lb_st, mask=h_ok, other=float("-inf"))
        hi = tl.maximum(la, lbv)
        hi = tl.where(hi == float("-inf"), 0.0, hi)  # nothing seen on either side: weights 0, not NaN
        wa = _math.exp(la - hi)
        wb = _math.exp(lbv - hi)
        total = wa + wb
        inv = tl.where(total > 0, 1.0 / total, 0.0)
        d = tl.arange(0, BLOCK_D)
        cell = h_ok[:, None] & (d < dim)[None, :]
        at = acc + t * acc_st + h[:, None] * acc_sh + d[None, :]
        old = tl.load(at, mask=cell & (la != float("-inf"))[:, None], other=0.0).to(tl.float32)
        new = tl.load(b + t * b_st + h[:, None] * b_sh + d[None, :], mask=cell, other=0.0).to(tl.float32)
        # one explicit fma, so that the fp32 and the 16-bit accumulator's kernels round the same value (a 16-bit row
        # is then bitwise the fp32 one rounded once), whatever the compiler would contract
        mixed = tl.fma((wa * inv)[:, None], old, (wb * inv)[:, None] * new)
        tl.store(at, mixed.to(at.dtype.element_ty), mask=cell)
        tl.store(lacc + h * lacc_sh + t * lacc_st, hi + _math.log(total), mask=h_ok)

    @triton.jit
    def _gather_kernel(dst, src, rows_of, width, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        s = tl.load(rows_of + r)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < width
        tl.store(dst + r * width + col, tl.load(src + s * width + col, mask=ok), mask=ok)


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device: Triton imports and ``t`` is a CUDA tensor (or the CPU,
    under ``TRITON_INTERPRET=1``)."""
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def merge_(out_acc_THD: torch.Tensor, lse_acc_HT: torch.Tensor, out_THD: torch.Tensor, lse_HT: torch.Tensor) -> bool:
    """Fused in-place merge; False when Triton cannot run here or the dtypes are not its own (fp64 takes torch)."""
    if not available(out_THD) or out_THD.dtype not in _OUT_DTYPES or out_acc_THD.dtype not in (torch.float32,
                                                                                              out_THD.dtype):
        return False
    if lse_acc_HT.dtype != torch.float32 or lse_HT.dtype != torch.float32:
        return False
    rows, heads, dim = out_THD.shape
    if rows == 0 or heads == 0:
        return True
    if out_acc_THD.stride(2) != 1 or out_THD.stride(2) != 1:
        return False
    block_d = triton.next_power_of_2(dim)
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // block_d))
    _merge_kernel[(rows, triton.cdiv(heads, block_h))](
        out_acc_THD, lse_acc_HT, out_THD, lse_HT, heads, dim, out_acc_THD.stride(0), out_acc_THD.stride(1),
        lse_acc_HT.stride(0), lse_acc_HT.stride(1), out_THD.stride(0), out_THD.stride(1), lse_HT.stride(0),
        lse_HT.stride(1), BLOCK_H=block_h, BLOCK_D=block_d)
    return True


def gather_rows(src: torch.Tensor, runs: Sequence[tuple[int, int]], rows: int) -> torch.Tensor | None:
    """``cat(src[a:a + n] for a, n in runs)`` (``rows`` in all) in one kernel; None where Triton cannot run here or
    ``src`` is not contiguous."""
    if not available(src) or not src.is_contiguous() or src.dim() < 1 or src.dtype == torch.bool:
        return None
    if src.requires_grad and torch.is_grad_enabled():  # the kernel is not differentiable
        return None
    width = src[0].numel() if src.shape[0] else 0
    out = src.new_empty((rows, *src.shape[1:]))
    if rows == 0 or width == 0:
        return out
    starts = torch.tensor([a for a, _ in runs], dtype=torch.int64)
    lengths = torch.tensor([n for _, n in runs], dtype=torch.int64)
    first = torch.cumsum(lengths, 0) - lengths  # where each run lands in ``out``
    rows_of = torch.repeat_interleave(starts - first, lengths, output_size=rows) + torch.arange(rows)
    rows_of = rows_of.pin_memory().to(src.device, non_blocking=True) if src.is_cuda else rows_of
    block = min(triton.next_power_of_2(width), 4096)
    _gather_kernel[(rows, triton.cdiv(width, block))](out.view(rows, width), src.view(-1, width), rows_of, width,
                                              BLOCK=block)
    return out
