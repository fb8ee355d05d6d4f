"""Optional CUDA extension (csrc/). Every caller has a torch fallback when it is not built."""

from __future__ import annotations

import torch

try:
    from ringpack import _C  # type: ignore[attr-defined]
except ImportError:
    _C = None


def available() -> bool:
    return _C is not None


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> bool:
    """Fused in-place merge; returns False when the extension is absent (the caller falls back)."""
    if _C is None:
        return False
    _C.merge_(out_acc, lse_acc, out, lse)
    return True
