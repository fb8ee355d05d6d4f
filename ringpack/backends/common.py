"""Helpers that several kernels' backends share: an optional package looked up by release, host tables on the
device, and the lse gradient through a kernel backward that has no input for it."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from types import ModuleType

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


def import_release(package: str, extra: str, supported: str, accepts: Callable[[str], bool],
                   module: str) -> tuple[ModuleType | None, str, str | None]:
    """``(module, version, None)`` when ``package`` is installed in a release ``accepts`` and ``module`` imports;
    else ``(None, version, why)``, ``why`` naming what was found and what is supported."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None, "", f"{package} is not installed (pip install 'ringpack[{extra}]')"
    if not accepts(version):
        return None, version, f"{package} {version} is installed; this backend supports {package} {supported}"
    try:
        return importlib.import_module(module), version, None
    except (ImportError, OSError, RuntimeError) as e:  # a build for another torch or CUDA fails here
        return None, version, f"{package} {version} does not import: {type(e).__name__}: {e}"
