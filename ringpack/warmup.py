"""``warmup``: compile and load, before the first training step, every kernel a model's ring calls will use.

Some kernels compile on their first call for each *class* of tile (FlashAttention-4: about 2-6 s per mask kind,
head dim, dtype, GQA ratio and softcap on an H200; FlexAttention: tens of seconds), and cuDNN builds a graph per
shape. Unwarmed, that cost lands in step 1, or in the first batch whose packing holds a tile of a new class.

A tile's class is which sides of its bottom-right window are bounded (``tile_class``), and a mask allows the classes
its band allows: a bounded left side needs a window's left edge, a bounded right side a causal mask or a window's
right edge (``mask_classes``; every packing, strategy and world size draws from these). Kernels also specialise on
sizes: FA4 on a call whose rows or keys fit one block, and on calls of more than 256 sequences. So each class runs
alone at one-block and many-block sizes, and in calls of 2 and of 300 small tiles with every combination of one
block or many of rows and of keys (``warmup_waves``). ``warmup`` runs the backend's forward and backward once on
each, on this device, with no communication.

FlashAttention-4 can also keep its compiled kernels on disk (``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``, in
``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR``): a later process then loads them instead of compiling.
"""

from __future__ import annotations

import math
import time

import torch

from ringpack import accumulate
from ringpack.backends import AttnSpec, Backend, select_backend
from ringpack.merge import accumulation_dtype
from ringpack.plan import validate_window
from ringpack.schedule import Tile, Wave, band_tile, prefix_sums
from ringpack.validation import boolean, integer, real

SIZES = ((16, 16), (16, 512), (512, 16), (512, 512))  # one block and many, of rows and of keys
MANY = 300  # sequences in one call: past FA4's 256-sequence scheduler switch


def tile_class(tile: Tile) -> tuple[bool, int]:
    """What kernels specialise a tile's mask on: a bounded left side, and the right side unbounded (-1), 0, or
    bounded further (1)."""
    return tile.left >= 0, min(tile.right, 1)


def mask_classes(causal: bool, window: tuple[int, int]) -> list[tuple[bool, int]]:
    """Every class a tile of this mask can have: its left side bounded only under a window's left edge, its right
    side only under a causal mask or a window's right edge (and then at 0 or beyond it, by where the tile ends)."""
    lefts = (False, True) if window[0] >= 0 else (False,)
    rights = (-1, 0, 1) if causal or window[1] >= 0 else (-1,)
    return [(left, right) for left in lefts for right in rights]


def class_tile(kind: tuple[bool, int], q_len: int, k_len: int) -> Tile | None:
    """A ``q_len`` x ``k_len`` tile of class ``kind``, or None when that size cannot have it."""
    bounded_left, right = kind
    shift = k_len - q_len
    lo = shift - min(q_len, k_len) // 2 if bounded_left else 1 - q_len
    hi = k_len - 1 if right < 0 else shift + (0 if right == 0 else 1)
    t = band_tile(0, q_len, 0, k_len, lo, hi)
    return t if t is not None and (t.q_len, t.k_len) == (q_len, k_len) and tile_class(t) == kind else None


def _laid_out(tiles: list[Tile], q_gap: int = 0, k_gap: int = 0) -> tuple[Wave, int]:
    """``tiles`` one after another in rows and in keys, as a plan lays out documents, with ``q_gap`` rows and
    ``k_gap`` keys left out before the last one: the wave and its key rows."""
    q = prefix_sums(t.q_len + (q_gap if i == len(tiles) - 2 else 0) for i, t in enumerate(tiles))
    k = prefix_sums(t.k_len + (k_gap if i == len(tiles) - 2 else 0) for i, t in enumerate(tiles))
    return Wave.of(tuple(t._replace(q_start=q[i], k_start=k[i]) for i, t in enumerate(tiles))), k[-1]


def warmup_waves(causal: bool, window: tuple[int, int]) -> list[tuple[Wave, int]]:
    """``(wave, key rows)`` covering every class of tile the mask allows, at every size a kernel specialises on.

    A varlen call's sizes are its longest sequences, and rows or keys between a call's tiles are sequences too (with
    no keys, or no rows: ``backends.varlen``), so a call of small tiles can be one block of rows and many of keys, or
    the other way round, whatever the tiles' own shapes allow: those are made with gaps between two small tiles."""
    gap = max(size for size, _ in SIZES)
    waves = []
    for kind in mask_classes(causal, window):
        for q_len, k_len in SIZES:
            t = class_tile(kind, q_len, k_len)
            if t is not None:
                waves.append(_laid_out([t]))
        small = class_tile(kind, 16, 16) or class_tile(kind, 1, 1)
        if small is None:
            continue
        for count in (2, MANY):  # few sequences, and more than 256
            for q_gap in (0, gap):
                for k_gap in (0, gap):
                    waves.append(_laid_out([small] * count, q_gap, k_gap))
    return waves


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
    for wave, keys in warmup_waves(causal, window):
        _run_wave(impl, wave, keys, spec, dtype, device, gen, softcap)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _run_wave(impl: Backend, wave: Wave, keys: int, spec: AttnSpec, dtype, device, gen, softcap) -> None:
    """One wave on random inputs: the forward's pieces merged, then the backward against them."""
    def draw(n, h):
        return torch.randn(n, h, spec.head_dim, device=device, dtype=torch.float32, generator=gen).to(dtype)

    rows = wave.q_span[1]
    q, dout, k, v = draw(rows, spec.num_heads), draw(rows, spec.num_heads), draw(keys, spec.num_kv_heads), \
        draw(keys, spec.num_kv_heads)
    scale = 1.0 / math.sqrt(spec.head_dim)
    acc = accumulate.Softmax(q, accumulation_dtype(dtype))
    for piece in impl.forward(q, k, v, wave, scale=scale, softcap=softcap):
        acc.add(*piece)
    out, lse = acc.result()
    dlse = torch.zeros_like(lse) if spec.lse_grad else None
    for _ in impl.backward(dout, q, k, v, out, lse, dlse, wave, scale=scale, softcap=softcap):
        pass
