"""Optional CUDA extension (csrc/). Every caller has a torch fallback when it is not built.

Legend: ``out_THD`` ``[T, H, D]`` rows of the THD layout; ``lse_HT`` ``[H, T]`` fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    from ringpack import _C  # type: ignore[attr-defined]
except ImportError:
    _C = None

_MERGE_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """True when ``ringpack._C`` was built and imports."""
    return _C is not None


def merge_(out_acc_THD: torch.Tensor, lse_acc_HT: torch.Tensor, out_THD: torch.Tensor, lse_HT: torch.Tensor) -> bool:
    """Fused in-place merge on CUDA; False when the extension is absent or the dtypes are not its own.

    The kernel takes a float32/float16/bfloat16 partial, an fp32 lse and lse accumulator, and an output
    accumulator in fp32 or in the partial's dtype; row and head strides are free (row-slices and
    ``[:, a:b]`` views work), the head dim must have unit stride. fp64 accumulators (float64 inputs)
    take the torch path in ``merge.merge_``.
    """
    if _C is None or not out_THD.is_cuda:
        return False
    if out_acc_THD.dtype not in (torch.float32, out_THD.dtype):
        return False
    if lse_acc_HT.dtype != torch.float32 or lse_HT.dtype != torch.float32:
        return False
    if out_THD.dtype not in _MERGE_OUT_DTYPES:
        return False
    merge_cuda(out_acc_THD, lse_acc_HT, out_THD, lse_HT)
    return True


def merge_cuda(out_acc_THD: torch.Tensor, lse_acc_HT: torch.Tensor, out_THD: torch.Tensor,
               lse_HT: torch.Tensor) -> None:
    """The extension's merge kernel, after checking every input (a ValueError names the broken constraint)."""
    tensors = (out_acc_THD, lse_acc_HT, out_THD, lse_HT)
    if not all(t.is_cuda for t in tensors):
        raise ValueError("ringpack merge_: all four tensors must be CUDA tensors, got devices "
                         f"{[str(t.device) for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("ringpack merge_: all four tensors must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")
    if out_acc_THD.dim() != 3 or out_THD.dim() != 3:
        raise ValueError(f"ringpack merge_: out_acc and out must be 3-D [T, H, D], got {out_acc_THD.dim()}-D and "
                         f"{out_THD.dim()}-D")
    if out_acc_THD.shape != out_THD.shape:
        raise ValueError(f"ringpack merge_: out_acc {tuple(out_acc_THD.shape)} and out {tuple(out_THD.shape)} must "
                         "have the same shape")
    rows, heads = out_THD.shape[:2]
    if lse_acc_HT.shape != (heads, rows) or lse_HT.shape != (heads, rows):
        raise ValueError(f"ringpack merge_: lse_acc {tuple(lse_acc_HT.shape)} and lse {tuple(lse_HT.shape)} must be "
                         f"[H, T] = [{heads}, {rows}]")
    if lse_acc_HT.dtype != torch.float32:
        raise ValueError(f"ringpack merge_: lse_acc must be float32, got {lse_acc_HT.dtype}")
    if lse_HT.dtype != torch.float32:
        raise ValueError(f"ringpack merge_: lse must be float32, got {lse_HT.dtype}")
    if out_THD.dtype not in _MERGE_OUT_DTYPES:
        raise ValueError(f"ringpack merge_: out must be float32, float16 or bfloat16, got {out_THD.dtype}")
    if out_acc_THD.dtype not in (torch.float32, out_THD.dtype):
        raise ValueError(f"ringpack merge_: out_acc must be float32 or out's dtype ({out_THD.dtype}), got "
                         f"{out_acc_THD.dtype}")
    if out_THD.shape[2] and (out_acc_THD.stride(2) != 1 or out_THD.stride(2) != 1):
        raise ValueError("ringpack merge_: out_acc and out must have unit stride along the head dim (last), got "
                         f"strides {out_acc_THD.stride()} and {out_THD.stride()}")
    if _C is None:
        raise ValueError("ringpack merge_: the CUDA extension ringpack._C is not built")
    raise_if(_C.merge_(*tensors))


def gathers(x: torch.Tensor) -> bool:
    """Whether ``copy_runs`` from ``x`` runs the extension's one-launch kernel: a contiguous CUDA tensor, the
    extension built, and no autograd to record (the kernel is not differentiable)."""
    return (_C is not None and x.is_cuda and x.is_contiguous()
            and not (x.requires_grad and torch.is_grad_enabled()))


def copy_runs(dst: torch.Tensor, src: torch.Tensor, runs: Sequence[tuple[int, int, int]]) -> None:
    """``dst[d:d + n] = src[s:s + n]`` for every ``(s, n, d)`` of ``runs``, in one launch on CUDA.

    Falls back to one slice copy per run without the extension, off CUDA, or for non-contiguous tensors.
    """
    if not runs:
        return
    if dst.dtype != src.dtype:
        raise ValueError(f"ringpack copy_runs: dst and src must share a dtype, got {dst.dtype} and {src.dtype}")
    if dst.device != src.device:
        raise ValueError(f"ringpack copy_runs: dst and src must be on one device, got {dst.device} and {src.device}")
    if dst.dim() < 1 or dst.shape[1:] != src.shape[1:]:
        raise ValueError(f"ringpack copy_runs: dst {tuple(dst.shape)} and src {tuple(src.shape)} must have the same "
                         "shape after dim 0")
    for s, n, d in runs:
        if n < 0 or s < 0 or d < 0 or s + n > src.shape[0] or d + n > dst.shape[0]:
            raise ValueError(f"ringpack copy_runs: run (src {s}, length {n}, dst {d}) is outside src rows "
                             f"{src.shape[0]} or dst rows {dst.shape[0]}")
    if _C is None or not dst.is_cuda or len(runs) > 65535 or not (dst.is_contiguous() and src.is_contiguous()):
        for s, n, d in runs:
            dst[d:d + n].copy_(src[s:s + n])
        return
    table = torch.tensor(runs, dtype=torch.int64).t().contiguous().pin_memory().to(dst.device, non_blocking=True)
    raise_if(_C.copy_runs_(dst, src, table[0], table[1], table[2]))


def raise_if(message: str) -> None:
    """The extension's ops return "" or a defensive-check message; raise the latter as a ValueError."""
    if message:
        raise ValueError(message)
