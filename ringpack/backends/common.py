"""Helpers that several kernels' backends share: host tables on the device, and the lse gradient through a kernel
backward that has no input for it."""

from __future__ import annotations

import torch

from ringpack.merge import accumulation_dtype


def staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync (pinned staging, non-blocking copy) on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def lse_adjusted_out(out_NHD: torch.Tensor, dout_NHD: torch.Tensor, dlse_HN: torch.Tensor) -> torch.Tensor:
    """``out'`` with ``rowsum(dout * out') = rowsum(dout * out) - dlse`` per row and head.

    A flash backward computes ``ds = p * (dp - rowsum(dout * out))``; the gradient of the lse adds ``p * dlse``, so
    shifting ``out`` along ``dout`` by ``dlse / |dout|^2`` makes the same kernel exact. Rounding ``out'`` to 16 bits
    perturbs the row sum by about ``eps * (|out||dout| + |dlse|)``, the size of the kernel's own rounding. A row with
    ``dout = 0`` and ``dlse != 0`` gets NaN (visible)."""
    acc = accumulation_dtype(out_NHD.dtype)
    dout = dout_NHD.to(acc)
    norm = (dout * dout).sum(-1)  # [N, H]
    dlse = dlse_HN.t().to(acc)
    coef = torch.where(dlse == 0, torch.zeros_like(dlse), dlse / norm)
    return (out_NHD.to(acc) - coef[..., None] * dout).to(out_NHD.dtype)
