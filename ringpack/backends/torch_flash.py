"""``torch_flash``: PyTorch's built-in varlen FlashAttention-2 kernels, called through their aten ops.

Legend: ``q_NHD`` local queries, ``k_MKD``/``v_MKD`` the source rank's keys/values (``K`` KV heads); ``lse_HN`` fp32.
One wave runs as one varlen call per distinct window of its tiles (``varlen.varlen_groups``), each over the wave's
whole query hull: one piece per call.

Kernel facts relied on (torch 2.11): causal and windows are bottom-right aligned per sequence; a sequence with no
key gives out 0 and lse +inf; GQA needs no repeated heads; the backward reads ``out`` only through
``rowsum(dout * out)``, which is how the gradient of the lse enters (``common.lse_adjusted_out``).
"""

from __future__ import annotations

import abc

import torch

from ringpack.backends.base import AttnSpec, Backend, BwdPiece, FwdPiece
from ringpack.backends.common import lse_adjusted_out
from ringpack.backends.varlen import VarlenGroup, call_keys, cu_seqlens_on, varlen_groups
from ringpack.schedule import Wave


def replaced_flash_kernels() -> str | None:
    """The implementation that ``torch.nn.attention.activate_flash_attention_impl`` put in place of aten's own
    FlashAttention-2 kernels, or None. Such a replacement keeps the aten op names but not their contract (FA4's
    forward returns other values, its empty rows have another lse, its windows another convention)."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    return current() if current is not None else None


class VarlenFA2(Backend):
    """A backend over an entry point to FlashAttention-2's varlen kernels: the wave geometry, the lse gradient and
    the pieces; a subclass supplies the two calls."""

    EXACT_16BIT_GRADS = True

    @abc.abstractmethod
    def call_fwd(self, q, k, v, g: VarlenGroup, scale: float, softcap: float):
        """``(out, lse)`` of one varlen call; rows of key-less sequences come back as out 0, lse +inf."""

    @abc.abstractmethod
    def call_bwd(self, dout, q, k, v, out, lse, g: VarlenGroup, scale: float, softcap: float):
        """``(dq, dk, dv)`` of one varlen call, against the final ``out``/``lse``."""

    def forward(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        q, k_hull, v_hull = q_NHD[q0:q1], k_MKD[k0:k1], v_MKD[k0:k1]
        for g in varlen_groups(wave):
            out, lse = self.call_fwd(q, call_keys(k_hull, g), call_keys(v_hull, g), g, scale, softcap)
            yield FwdPiece(slice(q0, q1), out, lse.masked_fill_(lse == float("inf"), float("-inf")))

    def backward(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        q, k_hull, v_hull = q_NHD[q0:q1], k_MKD[k0:k1], v_MKD[k0:k1]
        dout, out = dout_NHD[q0:q1].contiguous(), out_NHD[q0:q1]
        if dlse_HN is not None:
            out = lse_adjusted_out(out, dout, dlse_HN[:, q0:q1])
        # Rows no tile of this wave computes may have lse -inf (they see nothing anywhere): the kernel never reads them.
        lse = lse_HN[:, q0:q1].contiguous()
        for g in varlen_groups(wave):
            dq, dk, dv = self.call_bwd(dout, q, call_keys(k_hull, g), call_keys(v_hull, g), out, lse, g, scale,
                                       softcap)
            yield BwdPiece(slice(q0, q1), g.keys(k0), dq, dk, dv)


class TorchFlashBackend(VarlenFA2):
    name = "torch_flash"

    def __init__(self, fwd_op=None, bwd_op=None) -> None:
        # The two aten ops; a test passes float64 emulations of their contracts instead.
        self.fwd_op = fwd_op or getattr(torch.ops.aten, "_flash_attention_forward", None)
        self.bwd_op = bwd_op or getattr(torch.ops.aten, "_flash_attention_backward", None)
        self.emulated = fwd_op is not None

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        why = super().not_supported_reasons(spec)
        if self.fwd_op is None or self.bwd_op is None:
            why.append("this torch has no aten::_flash_attention_forward/_backward")
        elif spec.device_type == "cuda" and not self.emulated and replaced_flash_kernels():
            why.append(f"torch.nn.attention.activate_flash_attention_impl({replaced_flash_kernels()!r}) replaced "
                       "aten's FlashAttention-2 kernels, whose contract torch_flash relies on; use flash_attn_4, or "
                       "torch.nn.attention.restore_flash_attention_impl()")
        return why

    def call_fwd(self, q, k, v, g: VarlenGroup, scale: float, softcap: float):
        left, right, max_k = g.fa2_window()
        return self.fwd_op(q, k, v, *cu_seqlens_on(g, q.device), g.max_q, max_k, 0.0, (left, right) == (-1, 0),
                           False, scale=scale, window_size_left=left, window_size_right=right)[:2]

    def call_bwd(self, dout, q, k, v, out, lse, g: VarlenGroup, scale: float, softcap: float):
        left, right, max_k = g.fa2_window()
        rng, unused = torch.empty(2, dtype=torch.int64, device=q.device), torch.empty(0, device=q.device)
        return self.bwd_op(dout, q, k, v, out, lse, *cu_seqlens_on(g, q.device), g.max_q, max_k, 0.0,
                           (left, right) == (-1, 0), rng, unused, scale=scale, window_size_left=left,
                           window_size_right=right)
