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

from ringpack.merge import merge_
from ringpack.schedule import Tile, Wave


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
    # bwd returns 16-bit gradients for 16-bit inputs (cuDNN, FlashAttention): each partial dq is then an
    # exact 16-bit value, and the ring may sum two of them in the input dtype (see ring.ROUND_ONCE_DEPTH)
    grads_in_input_dtype: bool = False
    # ``accepts`` turns some tiles away (auto looks further down its list); False: it takes every tile it can run
    selective: bool = False

    @abc.abstractmethod
    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        """Why this backend cannot run ``spec``; empty when it can."""

    def accepts(self, tile: Tile) -> bool:
        """Whether ``auto`` should give ``tile`` to this backend: it can run it and is worth a call for it.

        A backend that overrides this sets ``selective``."""
        return True

    @abc.abstractmethod
    def fwd(self, q_NHD: torch.Tensor, k_MHD: torch.Tensor, v_MHD: torch.Tensor, wave: Wave, *,
            scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out[q_span], lse[:, q_span])``; ``out`` in the input dtype, ``lse`` in fp32 (fp64 for fp64).

        Results are new tensors (or views of new tensors) that the caller may update in place."""

    @abc.abstractmethod
    def bwd(self, dout_NHD: torch.Tensor, q_NHD: torch.Tensor, k_MHD: torch.Tensor, v_MHD: torch.Tensor,
            out_NHD: torch.Tensor, lse_HN: torch.Tensor, dlse_HN: torch.Tensor | None, wave: Wave, *,
            scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(dq[q_span], dk[k_span], dv[k_span])`` in the input or the accumulation dtype.

        The ring accumulates them in fp32 (fp64 for fp64 inputs); 16-bit kernels may return 16-bit.
        Like ``fwd``'s, the results are new tensors the caller may update in place.

        ``out_NHD`` and ``lse_HN`` are the final results of the whole ring, not this wave's partials:
        that makes every tile's gradient exact on its own.
        """

    # Where the caller already holds accumulators, a backend whose results come in several pieces
    # (``assembles``) merges or adds each piece into them directly instead of first assembling
    # hull-sized results in new buffers: fewer kernels and fewer passes over memory.

    def assembles(self, wave: Wave) -> bool:
        """Whether ``fwd``/``bwd`` on ``wave`` would assemble several pieces into new buffers."""
        return False

    def fwd_merge_(self, out_acc_NHD: torch.Tensor, lse_acc_HN: torch.Tensor, q_NHD: torch.Tensor,
                   k_MHD: torch.Tensor, v_MHD: torch.Tensor, wave: Wave, *, scale: float, softcap: float) -> None:
        """Merge ``wave``'s partial results into the accumulators ``[N, H, D]``/``[H, N]`` in place."""
        out, lse = self.fwd(q_NHD, k_MHD, v_MHD, wave, scale=scale, softcap=softcap)
        a, b = wave.q_span
        merge_(out_acc_NHD[a:b], lse_acc_HN[:, a:b], out, lse)

    def bwd_add_(self, dq_acc_NHD: torch.Tensor, dk_acc_MHD: torch.Tensor, dv_acc_MHD: torch.Tensor,
                 dout_NHD: torch.Tensor, q_NHD: torch.Tensor, k_MHD: torch.Tensor, v_MHD: torch.Tensor,
                 out_NHD: torch.Tensor, lse_HN: torch.Tensor, dlse_HN: torch.Tensor | None, wave: Wave, *,
                 scale: float, softcap: float) -> None:
        """Add ``wave``'s gradients into the accumulators (all rows of the queries and of the source's keys)."""
        dq, dk, dv = self.bwd(dout_NHD, q_NHD, k_MHD, v_MHD, out_NHD, lse_HN, dlse_HN, wave, scale=scale,
                              softcap=softcap)
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        dq_acc_NHD[q0:q1] += dq
        dk_acc_MHD[k0:k1] += dk
        dv_acc_MHD[k0:k1] += dv
