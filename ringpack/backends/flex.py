"""``flex``: FlexAttention (compiled Triton kernels) with a block mask built from the wave's tiles.

Legend: ``x_1HSD`` the ``[1, H, S, D]`` view of a ``[S, H, D]`` slice; ``L_S``/``R_S`` per query row the
first and last visible key (relative to the wave's key hull; ``L > R`` for a row that sees nothing).
In a wave every query row belongs to at most one tile, and a tile's band cut to the tile is one
interval of keys per row, so the whole mask is ``L[q] <= kv <= R[q]``::

    tiles (q rows 0-3 x keys 0-3 band, q rows 4-5 x keys 0-1 full)    L R per row
          kv: 0 1 2 3                                                0 0
    q=0       x . . .                                                0 1
    q=1       x x . .                                                ...
    q=4       x x . .                                                0 1

Blocks of 128 x 128 are classified on the device from ``L``/``R`` (no host sync): a block is skipped
when no row can reach it, *full* (no mask call) when every row covers it, else masked element-wise.
Exact for any offsets and windows (softcap is declined: see ``not_supported_reasons``). One piece per wave.
The backward recomputes the wave's partial result with autograd and feeds it the cotangents that the global
``(out, lse)`` induce on the partial ``(out_w, lse_w)``: ``dout_w = c * dout`` and
``dlse_w = c * (dlse + rowsum(dout * (out_w - out)))`` with ``c = exp(lse_w - lse)``.
"""

from __future__ import annotations

import functools
import importlib.util
import threading

import torch

from ringpack.backends.base import AttnSpec, Backend, BwdPiece, FwdPiece
from ringpack.backends.common import staged
from ringpack.schedule import Wave

BLOCK = 128
# Dynamo's tracing is not thread-safe: ranks run as threads of one process (the one-GPU test harness) tracing at
# once raised "using FX to symbolically trace a dynamo-optimized function" on an H200. Calls only issue kernels, so
# holding the lock around them costs no device time.
_LOCK = threading.Lock()


@functools.cache
def compiled_flex():
    """FlexAttention compiled once per process (dynamic shapes: a new packing does not recompile)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def row_bounds(wave: Wave) -> tuple[torch.Tensor, torch.Tensor]:
    """Host int32 ``L_S, R_S``: first and last visible key of each query row of the wave's hull."""
    (q0, q1), (k0, _) = wave.q_span, wave.k_span
    lo = torch.ones(q1 - q0, dtype=torch.int32)
    hi = torch.zeros(q1 - q0, dtype=torch.int32)
    for t in wave.tiles:
        a = torch.arange(t.q_len, dtype=torch.int32)
        base = t.k_start - k0
        lo[t.q_start - q0:t.q_start - q0 + t.q_len] = base + (a + t.lo).clamp(min=0)
        hi[t.q_start - q0:t.q_start - q0 + t.q_len] = base + (a + t.hi).clamp(max=t.k_len - 1)
    return lo, hi


def block_tables(lo_S: torch.Tensor, hi_S: torch.Tensor, k_len: int) -> tuple[torch.Tensor, ...]:
    """``(kv_num_blocks, kv_indices, full_num_blocks, full_indices)`` shaped ``[1, 1, nq(, nk)]`` from row bounds."""
    n = lo_S.shape[0]
    nq, nk = -(-n // BLOCK), -(-k_len // BLOCK)
    pad = nq * BLOCK - n
    empty = lo_S > hi_S
    big = torch.iinfo(torch.int32).max
    lo_any = torch.nn.functional.pad(torch.where(empty, big, lo_S), (0, pad), value=big).view(nq, BLOCK).amin(1)
    hi_any = torch.nn.functional.pad(torch.where(empty, -1, hi_S), (0, pad), value=-1).view(nq, BLOCK).amax(1)
    # Full: every row of the q block (padding rows count as not covering) covers the whole kv block.
    lo_all = torch.nn.functional.pad(torch.where(empty, big, lo_S), (0, pad), value=big).view(nq, BLOCK).amax(1)
    hi_all = torch.nn.functional.pad(torch.where(empty, -1, hi_S), (0, pad), value=-1).view(nq, BLOCK).amin(1)
    kv_first = torch.arange(nk, device=lo_S.device, dtype=torch.int32) * BLOCK
    kv_last = (kv_first + BLOCK).clamp(max=k_len) - 1
    touched = (lo_any[:, None] <= kv_last[None]) & (hi_any[:, None] >= kv_first[None])
    full = (lo_all[:, None] <= kv_first[None]) & (hi_all[:, None] >= kv_last[None])
    full &= (kv_last - kv_first + 1 == BLOCK)[None]
    partial = touched & ~full

    def table(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(sel.to(torch.int8), dim=1, descending=True, stable=True).to(torch.int32)
        return sel.sum(1, dtype=torch.int32)[None, None], order[None, None]

    return (*table(partial), *table(full))


def _as_1HSD(x_SHD: torch.Tensor) -> torch.Tensor:
    return x_SHD.unsqueeze(0).transpose(1, 2)


def _lse_request() -> dict:
    """The keyword that asks flex for the lse: ``return_aux`` where torch has it (``return_lse`` is deprecated)."""
    from torch.nn.attention import flex_attention as fa
    return {"return_aux": fa.AuxRequest(lse=True)} if hasattr(fa, "AuxRequest") else {"return_lse": True}


class FlexBackend(Backend):
    name = "flex"
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    HEAD_DIMS = (16, 256, 16)

    def __init__(self, flex=None) -> None:
        # The (compiled) flex_attention to call; a test passes the eager one, which needs no compiler.
        self.flex = flex

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        why = super().not_supported_reasons(spec)  # flex compiles Triton kernels: CUDA only
        if spec.head_dim & (spec.head_dim - 1):
            why.append(f"head_dim {spec.head_dim} is not a power of two")
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            why.append("this torch has no torch.nn.attention.flex_attention")
        if spec.softcap:
            # Measured on an H200 with torch 2.11: the tanh score_mod with this block mask fails in Inductor
            # (LoweringException: unbacked_bindings); declined until a torch where it compiles is tested.
            why.append("flex softcap does not compile with this block mask (Inductor: unbacked_bindings)")
        return why

    def _block_mask(self, wave: Wave, device: torch.device):
        from torch.nn.attention.flex_attention import BlockMask
        lo_S, hi_S = (staged(t, device) for t in row_bounds(wave))
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= lo_S[q_idx]) & (kv_idx <= hi_S[q_idx])

        tables = block_tables(lo_S, hi_S, k1 - k0)
        return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q1 - q0, k1 - k0))

    def _run(self, q_SHD, k_SKD, v_SKD, wave: Wave, scale: float):
        """Flex over the wave's hulls: ``q_SHD`` = rows ``q_span`` of the queries, ``k/v_SKD`` = rows ``k_span``."""
        block_mask = self._block_mask(wave, q_SHD.device)
        with _LOCK:
            out, aux = (self.flex or compiled_flex())(
                _as_1HSD(q_SHD), _as_1HSD(k_SKD), _as_1HSD(v_SKD), block_mask=block_mask, scale=scale,
                enable_gqa=q_SHD.shape[1] != k_SKD.shape[1], **_lse_request())
        lse = aux.lse if hasattr(aux, "lse") else aux
        return out[0].transpose(0, 1), lse[0]

    def forward(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        out, lse = self._run(q_NHD[q0:q1], k_MKD[k0:k1], v_MKD[k0:k1], wave, scale)
        yield FwdPiece(slice(q0, q1), out, lse.float())

    def backward(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        with torch.enable_grad():
            q = q_NHD[q0:q1].detach().requires_grad_()
            k = k_MKD[k0:k1].detach().requires_grad_()
            v = v_MKD[k0:k1].detach().requires_grad_()
            out_w, lse_w = self._run(q, k, v, wave, scale)
            lse_g = lse_HN[:, q0:q1].float()
            finite = torch.isfinite(lse_w.float()) & torch.isfinite(lse_g)
            c_HS = torch.where(finite, torch.exp(lse_w.float() - torch.where(finite, lse_g, 0)), 0)
            dout = dout_NHD[q0:q1].float()
            c_SH1 = c_HS.t()[..., None]
            dlse_w = (dout * (out_w.float() - out_NHD[q0:q1].float())).sum(-1).t()
            if dlse_HN is not None:
                dlse_w = dlse_w + dlse_HN[:, q0:q1].float()
            dq, dk, dv = torch.autograd.grad((out_w, lse_w), (q, k, v),
                                             ((c_SH1 * dout).to(out_w.dtype), (c_HS * dlse_w).to(lse_w.dtype)))
        yield BwdPiece(slice(q0, q1), slice(k0, k1), dq, dk, dv)
