"""``flash_attn_4``: FlashAttention-4's varlen kernels (the ``flash-attn-4`` package, ``flash_attn.cute``).

FlashAttention-4 is written in NVIDIA's CuTe DSL: pure Python, compiled on first use for each kernel class (mask
kind, head dim, dtype, GQA ratio, softcap), then cached for the process; a new packing of the same class does not
compile again (``ringpack.warmup`` compiles a configuration's classes before the first step). Hopper (sm90) and
Blackwell (sm100/sm110).

It has no registered ops. ringpack calls the two functions of ``flash_attn.cute.interface`` that take and return
what a ring needs, ``_flash_attn_fwd`` (out and the lse) and ``_flash_attn_bwd`` (given the final ``out``, ``lse``
and the lse gradient ``dlse``), every argument by keyword; before the first call their signatures are checked for
those keywords, and a release that lacks one is declined with both parameter lists in ``not_supported_reasons``.
The forward's first two results are taken, whatever follows them (releases differ in how many they return).

Kernel facts relied on (flash-attn-4 4.0.0b36, checked on an H200 against float64): windows are bottom-right aligned
per sequence with ``None`` for an unbounded side; a sequence with no key gives out 0 and lse -inf; GQA needs no
repeated heads; softcap is native forward and backward.
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
from collections.abc import Callable

import torch

from ringpack.backends.base import AttnSpec, Backend, BwdPiece, FwdPiece
from ringpack.backends.common import import_release
from ringpack.backends.flash_attn import release
from ringpack.backends.varlen import VarlenGroup, call_keys, cu_seqlens_on, varlen_groups
from ringpack.schedule import Wave

# The CuTe DSL compiles a kernel class on its first call, and two threads compiling at once abort the process
# ("An MLIR function requires a Location", seen on an H200 with ranks as threads of one process). Calls only enqueue
# kernels once compiled, so holding a lock around them costs no device time.
_LOCK = threading.Lock()
SUPPORTED = ">=4.0.0b36,<4.1"  # setup.py's ``fa4`` extra pins the same
FWD_KEYWORDS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
                "causal", "softcap", "window_size_left", "window_size_right", "return_lse")
BWD_KEYWORDS = ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", "softcap", "window_size_left",
                "window_size_right", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dq", "dk", "dv",
                "dlse")
ARCHS = (9, 10, 11)  # compute capability majors: Hopper, Blackwell


def _signature_problem(fn: Callable, keywords: tuple[str, ...]) -> str | None:
    """Why ``fn`` cannot be called with ``keywords`` (its parameters and ringpack's side by side), or None."""
    params = inspect.signature(fn).parameters
    missing = [k for k in keywords if k not in params]
    if missing:
        return (f"{fn.__qualname__} takes ({', '.join(params)}); ringpack calls it with ({', '.join(keywords)}), "
                f"missing {', '.join(missing)}")
    return None


def find_kernels() -> tuple[Callable | None, Callable | None, str | None]:
    """``(fwd, bwd, None)`` when an installed flash-attn-4 in the supported range has both functions with the
    keywords ringpack passes; otherwise ``(None, None, why)``."""
    interface, version, why = import_release("flash-attn-4", "fa4", SUPPORTED, supported_release,
                                             "flash_attn.cute.interface")
    if interface is None:  # not there, another release, or the CuTe DSL libraries missing or for another CUDA
        return None, None, why
    fwd, bwd = getattr(interface, "_flash_attn_fwd", None), getattr(interface, "_flash_attn_bwd", None)
    if fwd is None or bwd is None:
        return None, None, f"flash-attn-4 {version} has no flash_attn.cute.interface._flash_attn_fwd/_flash_attn_bwd"
    for fn, keywords in ((fwd, FWD_KEYWORDS), (bwd, BWD_KEYWORDS)):
        problem = _signature_problem(fn, keywords)
        if problem:
            return None, None, f"flash-attn-4 {version}: {problem}"
    return fwd, bwd, None


def supported_release(version: str) -> bool:
    """Whether ``version`` lies in ``SUPPORTED``: a 4.0 release, from beta 36 on (earlier betas return other
    values and take other arguments)."""
    if release(version) != (4, 0):
        return False
    pre = re.fullmatch(r"4\.0\.0(a|b|rc)(\d+)", version)
    return pre is None or pre[1] == "rc" or pre[1] == "b" and int(pre[2]) >= 36


load_kernels = functools.cache(find_kernels)  # looked up once per process: importing the CuTe DSL is slow


def _side(w: int) -> int | None:
    return None if w < 0 else w


class FlashAttn4Backend(Backend):
    name = "flash_attn_4"
    SUPPORTS_SOFTCAP = True
    EXACT_16BIT_GRADS = True  # dq, dk, dv are rounded once from the kernel's fp32 accumulators

    def __init__(self, fwd: Callable | None = None, bwd: Callable | None = None) -> None:
        # The package's functions are looked up on first use; a test passes float64 emulations instead.
        self.kernels = (fwd, bwd) if fwd is not None else None

    def _kernels(self) -> tuple[Callable | None, Callable | None, str | None]:
        return (*self.kernels, None) if self.kernels is not None else load_kernels()

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        why = super().not_supported_reasons(spec)
        if spec.device_type != "cuda" or why:
            return why  # the package is not looked up for a request it could not run anyway
        major = torch.cuda.get_device_capability()[0] if self.kernels is None else ARCHS[0]
        if major not in ARCHS:
            why.append(f"compute capability {major}.x is not Hopper (9.x) or Blackwell (10.x, 11.x)")
        elif major >= 10 and not (spec.head_dim <= 128 or spec.head_dim == 256):
            why.append(f"head_dim {spec.head_dim} is not <= 128 or 256 on Blackwell")
        elif major >= 10 and spec.head_dim == 256 and spec.lse_grad:
            why.append("the gradient of the lse is not supported with head_dim 256 on Blackwell")
        problem = self._kernels()[2]
        if problem:
            why.append(problem)
        return why

    def forward(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        q, k_hull, v_hull = q_NHD[q0:q1], k_MKD[k0:k1], v_MKD[k0:k1]
        fwd = self._kernels()[0]
        for g in varlen_groups(wave):
            cu_q, cu_k = cu_seqlens_on(g, q.device)
            with _LOCK:
                res = fwd(q=q, k=call_keys(k_hull, g), v=call_keys(v_hull, g), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=g.max_q, max_seqlen_k=g.max_k, softmax_scale=scale, causal=False,
                          softcap=softcap, window_size_left=_side(g.left), window_size_right=_side(g.right),
                          return_lse=True)
            yield FwdPiece(slice(q0, q1), res[0], res[1])

    def backward(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        q, k_hull, v_hull = q_NHD[q0:q1], k_MKD[k0:k1], v_MKD[k0:k1]
        dout, out = dout_NHD[q0:q1].contiguous(), out_NHD[q0:q1].contiguous()
        lse = lse_HN[:, q0:q1].contiguous()
        dlse = None if dlse_HN is None else dlse_HN[:, q0:q1].contiguous()
        bwd = self._kernels()[1]
        for g in varlen_groups(wave):
            cu_q, cu_k = cu_seqlens_on(g, q.device)
            k, v = call_keys(k_hull, g), call_keys(v_hull, g)
            dk, dv = _key_grads(k, v, g)
            with _LOCK:
                dq, dk, dv = bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, softmax_scale=scale, causal=False,
                                 softcap=softcap, window_size_left=_side(g.left), window_size_right=_side(g.right),
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=g.max_q, max_seqlen_k=g.max_k,
                                 dq=None, dk=dk, dv=dv, dlse=dlse)[:3]
            yield BwdPiece(slice(q0, q1), g.keys(k0), dq, dk, dv)


def _key_grads(k: torch.Tensor, v: torch.Tensor, g: VarlenGroup) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Zeroed dk/dv buffers for a call with keys that no query reads (the kernel writes only what it computes);
    None, for the kernel to allocate, otherwise."""
    if any(n_q == 0 and n_k > 0 for n_q, n_k in zip(g.q_lens, g.k_lens)):
        return torch.zeros_like(k), torch.zeros_like(v)
    return None, None
