"""Conversions between ``cu_seqlens``, document lengths and per-document ``position_ids``.

Packed Hugging Face batches carry ``position_ids`` that restart at 0 at every document; these
helpers turn them into the boundaries ringpack plans with, and back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringpack.plan import validate_cu_seqlens


def lengths_to_cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """Document lengths -> int32 ``cu_seqlens`` ``[n_docs + 1]`` (zero lengths allowed)."""
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"document lengths must be >= 0, got {lengths}")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return cu


def cu_seqlens_to_lengths(cu_seqlens: Sequence[int] | torch.Tensor) -> list[int]:
    """``cu_seqlens`` -> document lengths."""
    cu = validate_cu_seqlens(cu_seqlens)
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def cu_seqlens_to_position_ids(cu_seqlens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` -> int64 ``[T]`` positions restarting at 0 at every document."""
    cu = validate_cu_seqlens(cu_seqlens)
    total = cu[-1]
    starts = torch.tensor(cu[:-1], dtype=torch.int64)
    lengths = torch.tensor(cu_seqlens_to_lengths(cu), dtype=torch.int64)
    return torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, lengths, output_size=total)


def position_ids_to_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document (``[T]`` or ``[1, T]``) -> int32 ``cu_seqlens``.

    A new document starts wherever the position is 0. Positions must count up by one inside a
    document; anything else (a batch of several rows, gaps) is rejected rather than guessed at.
    Zero-length documents cannot be expressed by positions and never appear in the result.
    """
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must be [T] or [1, T] (one packed row), got shape {tuple(position_ids.shape)}")
    if position_ids.dtype.is_floating_point:
        raise ValueError(f"position_ids must be integers, got dtype {position_ids.dtype}")
    pos = position_ids.to(device="cpu", dtype=torch.int64)
    if pos.numel() == 0:
        return torch.zeros(1, dtype=torch.int32)
    if pos[0] != 0:
        raise ValueError(f"position_ids must start at 0 (a document start), got {int(pos[0])}")
    starts = torch.nonzero(pos == 0).flatten()
    steps_ok = (pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)
    if not bool(steps_ok.all()):
        bad = int(torch.nonzero(~steps_ok)[0]) + 1
        raise ValueError(f"position_ids must count up by 1 inside a document and restart at 0; "
                         f"index {bad} has {int(pos[bad])} after {int(pos[bad - 1])}")
    return torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int32)
