"""The one interface every local attention kernel implements.

Legend: ``q_NHD`` local queries ``[N, H, D]``; ``k_MHD``/``v_MHD`` keys and values of the source rank
``[M, Hk, D]`` with ``H % Hk == 0`` (grouped-query heads are never repeated); ``lse_HN`` fp32/fp64.

A backend runs one :class:`~ringpack.plan.Wave` (tiles with disjoint query rows) and knows nothing
of ranks. Results cover the wave's hull: rows ``q_span`` for ``out``/``lse``/``dq`` and rows
``k_span`` for ``dk``/``dv``; rows inside a hull that no tile touches get ``out = 0, lse = -inf``
and zero gradients.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ringpack.plan import Tile, Wave


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


def cuda_reasons(spec: AttnSpec, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Why a CUDA-only kernel taking ``dtypes`` cannot run ``spec``'s device and dtype; empty when it can."""
    why = []
    if spec.device_type != "cuda":
        why.append(f"device {spec.device_type!r} is not cuda")
    elif not torch.cuda.is_available():
        why.append("CUDA is not available")
    if spec.dtype not in dtypes:
        why.append(f"dtype {spec.dtype} is not {'/'.join(str(d).removeprefix('torch.') for d in dtypes)}")
    return why


class Backend(abc.ABC):
    """A local attention kernel: forward with LSE, backward against the final (global) out and lse."""

    name: str = ""

    @abc.abstractmethod
    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        """Why this backend cannot run ``spec``; empty when it can."""

    def accepts(self, tile: Tile) -> bool:
        """Whether ``auto`` should give ``tile`` to this backend: it can run it and is worth a call for it."""
        return True

    @abc.abstractmethod
    def fwd(self, q_NHD: torch.Tensor, k_MHD: torch.Tensor, v_MHD: torch.Tensor, wave: Wave, *,
            scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out[q_span], lse[:, q_span])``; ``out`` in the input dtype, ``lse`` in fp32 (fp64 for fp64)."""

    @abc.abstractmethod
    def bwd(self, dout_NHD: torch.Tensor, q_NHD: torch.Tensor, k_MHD: torch.Tensor, v_MHD: torch.Tensor,
            out_NHD: torch.Tensor, lse_HN: torch.Tensor, dlse_HN: torch.Tensor | None, wave: Wave, *,
            scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(dq[q_span], dk[k_span], dv[k_span])`` in the input or the accumulation dtype.

        The ring accumulates them in fp32 (fp64 for fp64 inputs); 16-bit kernels may return 16-bit.

        ``out_NHD`` and ``lse_HN`` are the final results of the whole ring, not this wave's partials:
        that makes every tile's gradient exact on its own.
        """
