"""``flash_attn``: the flash-attn package's FlashAttention-2 varlen kernels, through its registered ops.

flash-attn 2.7 and 2.8 register their kernels as ``torch.library`` ops, ``flashattn::_flash_attn_varlen_forward``
and ``flashattn::_flash_attn_varlen_backward``. An op's schema is checked when the backend is first asked
(``not_supported_reasons``): argument names and order must be the ones below, so a release that changes them
is declined with the two schemas side by side instead of being called with shifted arguments. No Python-level
private function of the package is imported or called.

These are the kernels ``torch_flash`` reaches through aten (same layout, bottom-right windows, lse +inf for rows
that see no key, the same host-side window rewriting), so the wave geometry is shared (``VarlenFA2``). What the
package adds is ``softcap`` (Gemma-2's tanh capping), forward and backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ringpack.backends.base import AttnSpec
from ringpack.backends.common import import_release
from ringpack.backends.torch_flash import VarlenFA2
from ringpack.backends.varlen import VarlenGroup, cu_seqlens_on

SUPPORTED = ">=2.7,<2.9"  # the releases whose op schemas are below; setup.py's ``flash`` extra pins the same
FWD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
            "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap", "alibi_slopes",
            "return_softmax", "block_table", "leftpad_k", "seqused_k")
BWD_ARGS = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "cu_seqlens_q", "cu_seqlens_k",
            "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale", "causal", "window_size_left",
            "window_size_right", "softcap", "alibi_slopes", "deterministic", "rng_state")


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string; ``(0, 0)`` when it does not start with two numbers."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _schema_problem(op, expected: tuple[str, ...]) -> str | None:
    """Why ``op``'s registered schema is not the one ringpack calls, or None when it is."""
    names = tuple(a.name for a in op.default._schema.arguments)
    if names != expected:
        return (f"{op.default._schema.name} takes ({', '.join(names)}); ringpack calls it as "
                f"({', '.join(expected)})")
    return None


def find_ops() -> tuple[Callable | None, Callable | None, str | None]:
    """``(fwd_op, bwd_op, None)`` when an installed flash-attn in the supported range registered both ops with
    the expected schemas; otherwise ``(None, None, why)``."""
    # importing flash_attn_interface registers the ops
    interface, version, why = import_release("flash-attn", "flash", SUPPORTED, lambda v: (2, 7) <= release(v) < (2, 9),
                                             "flash_attn.flash_attn_interface")
    if interface is None:
        return None, None, why
    try:
        fwd_op, bwd_op = torch.ops.flashattn._flash_attn_varlen_forward, torch.ops.flashattn._flash_attn_varlen_backward
    except AttributeError:
        return None, None, f"flash-attn {version} registered no flashattn::_flash_attn_varlen_forward/_backward ops"
    for op, expected in ((fwd_op, FWD_ARGS), (bwd_op, BWD_ARGS)):
        problem = _schema_problem(op, expected)
        if problem:
            return None, None, f"flash-attn {version}: {problem}"
    return fwd_op, bwd_op, None


load_ops = functools.cache(find_ops)  # looked up once per process: importing flash-attn is slow


class FlashAttnBackend(VarlenFA2):
    name = "flash_attn"
    SUPPORTS_SOFTCAP = True

    def __init__(self, fwd_op: Callable | None = None, bwd_op: Callable | None = None) -> None:
        # The registered ops are looked up on first use; a test passes float64 emulations of them instead.
        self.ops = (fwd_op, bwd_op) if fwd_op is not None else None

    def _ops(self) -> tuple[Callable | None, Callable | None, str | None]:
        return (*self.ops, None) if self.ops is not None else load_ops()

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        why = super().not_supported_reasons(spec)
        if spec.device_type == "cuda":  # on other devices the package is not looked up at all
            problem = self._ops()[2]
            if problem:
                why.append(problem)
        return why

    def call_fwd(self, q, k, v, g: VarlenGroup, scale: float, softcap: float):
        left, right, max_k = g.fa2_window()
        out, lse, _, _ = self._ops()[0](q, k, v, *cu_seqlens_on(g, q.device), g.max_q, max_k, 0.0, scale,
                                        (left, right) == (-1, 0), left, right, softcap, None, False, None, None, None)
        return out, lse

    def call_bwd(self, dout, q, k, v, out, lse, g: VarlenGroup, scale: float, softcap: float):
        left, right, max_k = g.fa2_window()
        # The op writes into dq/dk/dv; zeroed, so keys of query-less sequences need no help from the kernel.
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        self._ops()[1](dout, q, k, v, out, lse, dq, dk, dv, *cu_seqlens_on(g, q.device), g.max_q, max_k, 0.0, scale,
                       (left, right) == (-1, 0), left, right, softcap, None, False, None)
        return dq, dk, dv
