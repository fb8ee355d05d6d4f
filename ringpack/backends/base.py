"""The contract every local attention kernel implements: what it supports, and two generators over one wave.

Legend: ``q_NHD`` local queries ``[N, H, D]``; ``k_MKD``/``v_MKD`` keys and values of the source rank ``[M, Hk, D]``
with ``H % Hk == 0`` (grouped-query heads are never repeated); ``lse_HN`` fp32 (fp64 for fp64 inputs).

A backend **declares** what it runs, as class attributes the base class checks (device, dtypes, head dims, windows,
softcap, the lse gradient), answers ``not_supported_reasons`` for anything else, and may turn single tiles down
(``runs_tile``: cuDNN runs dense tiles only). It runs one :class:`~ringpack.schedule.Wave` (tiles with disjoint query
rows) in as many kernel calls as it needs and **yields pieces**:

- ``forward`` yields ``FwdPiece(rows, out, lse)``: ``out[rows]``, ``lse[:, rows]`` of this wave; rows of the slice
  that the piece does not compute are ``out = 0, lse = -inf``.
- ``backward`` yields ``BwdPiece(rows, keys, dq, dk, dv)``: ``dq`` over ``rows``; ``dk``/``dv`` over ``keys``, a slice
  of key rows or ``Runs`` laid end to end (runs may overlap: each adds). Gradients are taken against the ring's final
  ``out``/``lse`` (not this wave's partials), which makes every tile exact on its own; ``dlse`` is the gradient of
  the returned lse, or None.

Pieces are new tensors (or views of new tensors) that the accumulator may update in place. A backend knows one
kernel and nothing of ranks: allocation, merging and adding belong to ``ringpack.accumulate``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ringpack.schedule import Runs, Tile, Wave


@dataclass(frozen=True)
class AttnSpec:
    """What one ``ring_attention`` call asks of a local kernel."""

    device_type: str  # "cpu" | "cuda"
    dtype: torch.dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int
    causal: bool
    window: bool  # a finite left or right window
    softcap: bool  # tanh soft-capping of the scores
    lse_grad: bool  # the caller differentiates through the returned lse


class FwdPiece(NamedTuple):
    rows: slice  # query rows of the local shard
    out: torch.Tensor  # [rows, H, D], input dtype
    lse: torch.Tensor  # [H, rows], fp32 (fp64 for fp64)


class BwdPiece(NamedTuple):
    rows: slice  # query rows of dq
    keys: slice | Runs  # key rows of dk/dv in the source's buffer
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


class Backend(abc.ABC):
    """A local attention kernel: forward pieces with the lse, backward pieces against the final out and lse."""

    name: ClassVar[str] = ""
    DEVICES: ClassVar[tuple[str, ...]] = ("cuda",)
    DTYPES: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16)
    HEAD_DIMS: ClassVar[tuple[int, int, int]] = (8, 256, 8)  # smallest, largest, multiple of
    SUPPORTS_WINDOW: ClassVar[bool] = True
    SUPPORTS_SOFTCAP: ClassVar[bool] = False
    SUPPORTS_LSE_GRAD: ClassVar[bool] = True
    # Backward pieces of 16-bit inputs are exact 16-bit values (the kernel rounds once from its fp32
    # accumulators), so the ring may sum two of them in the input dtype (``accumulate.ROUND_ONCE_DEPTH``).
    EXACT_16BIT_GRADS: ClassVar[bool] = False
    RUNS_EVERY_TILE: ClassVar[bool] = True  # False: ``runs_tile`` turns some tiles down

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        """Why this backend cannot run ``spec`` (empty when it can): the declared capabilities, checked here;
        a subclass adds what no attribute expresses and calls this first."""
        why = []
        if spec.device_type not in self.DEVICES:
            why.append(f"device {spec.device_type!r} is not {'/'.join(self.DEVICES)}")
        elif spec.device_type == "cuda" and not torch.cuda.is_available():
            why.append("CUDA is not available")
        if spec.dtype not in self.DTYPES:
            why.append(f"dtype {spec.dtype} is not {_names(self.DTYPES)}")
        low, high, multiple = self.HEAD_DIMS
        if not (low <= spec.head_dim <= high and spec.head_dim % multiple == 0):
            why.append(f"head_dim {spec.head_dim} is not a multiple of {multiple} in [{low}, {high}]")
        if spec.window and not self.SUPPORTS_WINDOW:
            why.append(f"{self.name} runs no sliding windows")
        if spec.softcap and not self.SUPPORTS_SOFTCAP:
            why.append(f"{self.name} has no softcap")
        if spec.lse_grad and not self.SUPPORTS_LSE_GRAD:
            why.append(f"{self.name} has no gradient of the lse")
        return why

    def runs_tile(self, tile: Tile) -> bool:
        """Whether this backend can run ``tile`` (a backend with ``RUNS_EVERY_TILE = False`` overrides it)."""
        return True

    @abc.abstractmethod
    def forward(self, q_NHD: torch.Tensor, k_MKD: torch.Tensor, v_MKD: torch.Tensor, wave: Wave, *,
                scale: float, softcap: float) -> Iterator[FwdPiece]:
        """The wave's ``(rows, out, lse)`` pieces: ``out`` in the input dtype, ``lse`` fp32 (fp64 for fp64)."""

    @abc.abstractmethod
    def backward(self, dout_NHD: torch.Tensor, q_NHD: torch.Tensor, k_MKD: torch.Tensor, v_MKD: torch.Tensor,
                 out_NHD: torch.Tensor, lse_HN: torch.Tensor, dlse_HN: torch.Tensor | None, wave: Wave, *,
                 scale: float, softcap: float) -> Iterator[BwdPiece]:
        """The wave's ``(rows, keys, dq, dk, dv)`` pieces, in the input dtype or fp32/fp64."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
