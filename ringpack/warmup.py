"""``warmup``: compile and load, before the first training step, every kernel a model's ring calls will use.

Some kernels compile on their first call for each *class* of tile (FlashAttention-4: 3-6 s per mask kind, head
dim, dtype, GQA ratio and softcap on an H200; FlexAttention: tens of seconds), and cuDNN builds a graph per shape.
Unwarmed, that cost lands in step 1, or in the first batch whose packing holds a tile of a new class. The tiles of
any plan are pieces of documents against pieces of the same documents under one mask, so a small synthetic pack cut
zigzag-wise over a few ranks holds every class a mask can produce: full tiles, causal squares, and the band tiles of
a window or of a cut diagonal. ``warmup`` runs the backend's forward and backward once on each of those tiles, on
this device, with no communication. A new packing of the same configuration then compiles nothing.
"""

from __future__ import annotations

import math
import time

import torch

from ringpack import accumulate
from ringpack.backends import AttnSpec, Backend, select_backend
from ringpack.merge import accumulation_dtype
from ringpack.plan import make_plan, validate_window
from ringpack.schedule import prefix_sums
from ringpack.validation import boolean, integer, real

# The synthetic packs: one document whose zigzag chunks are several kernel blocks and longer than the window (so
# that a chunk's tiles are bounded by it on either side), and small ones, so that tiles of every size and every
# class of the mask run.
WORLD = 3
SMALL = (96, 33, 5, 2, 1)


def _lengths(window: tuple[int, int]) -> tuple[tuple[int, ...], ...]:
    chunk = max(512, 2 * max(window) + 64)
    return (2 * WORLD * chunk,), SMALL


def warmup(*, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16, causal: bool = True,
           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, lse_grad: bool = False,
           backend: str | Backend = "auto", device: torch.device | str | None = None) -> float:
    """Run every tile class of this attention configuration once, forward and backward; the seconds it took.

    Call it on every rank before the first step, with the arguments the model's ``ring_attention`` calls use (one
    call per distinct configuration: e.g. a sliding-window and a global one). ``device`` defaults to the current
    CUDA device, or the CPU without CUDA."""
    window = validate_window(window_size)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    spec = AttnSpec(device_type=device.type, dtype=dtype, head_dim=integer("head_dim", head_dim, minimum=1),
                    num_heads=integer("heads", heads, minimum=1), num_kv_heads=integer("kv_heads", kv_heads, minimum=1),
                    causal=boolean("causal", causal), window=window != (-1, -1),
                    softcap=real("softcap", softcap, minimum=0.0) > 0, lse_grad=boolean("lse_grad", lse_grad))
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    impl = select_backend(backend, spec)
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    for lengths in _lengths(window):
        plan = make_plan(prefix_sums(lengths), WORLD, strategy="zigzag", causal=causal, window_size=window)
        for rank in range(WORLD):
            for step in plan.steps[rank]:
                rows = plan.num_tokens[rank]
                keys = step.recv_tokens if step.recv_runs else plan.num_tokens[step.source]
                _run_step(impl, step, rows, keys, spec, dtype, device, gen, softcap)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _run_step(impl: Backend, step, rows: int, keys: int, spec: AttnSpec, dtype, device, gen, softcap) -> None:
    """One step's waves on random inputs: the forward's pieces merged, then the backward against them."""
    if not step.waves:
        return

    def draw(n, h):
        return torch.randn(n, h, spec.head_dim, device=device, dtype=torch.float32, generator=gen).to(dtype)

    q, dout, k, v = draw(rows, spec.num_heads), draw(rows, spec.num_heads), draw(keys, spec.num_kv_heads), \
        draw(keys, spec.num_kv_heads)
    scale = 1.0 / math.sqrt(spec.head_dim)
    acc = accumulate.Softmax(q, accumulation_dtype(dtype))
    for wave in step.waves:
        for piece in impl.forward(q, k, v, wave, scale=scale, softcap=softcap):
            acc.add(*piece)
    out, lse = acc.result()
    dlse = torch.zeros_like(lse) if spec.lse_grad else None
    for wave in step.waves:
        for _ in impl.backward(dout, q, k, v, out, lse, dlse, wave, scale=scale, softcap=softcap):
            pass
