"""``cudnn``: cuDNN's dense fused attention (aten ``_scaled_dot_product_cudnn_attention``), one call per tile.

Legend: ``x_1HSD`` the ``[1, H, S, D]`` view of a ``[S, H, D]`` slice (no copy); ``lse_1HS1`` fp32.
cuDNN's causal mask is top-left aligned, so it runs only *dense* tiles: full tiles, and square tiles
whose band is plain causal (where top-left and bottom-right agree)::

    full             causal square
    x x x x          x . . .
    x x x x          x x . .
    x x x x          x x x .

The ragged (varlen) path of this op is not used. Its backward reads ``out`` only through
``rowsum(dout * out)``, so the lse gradient enters as in ``torch_flash``.
"""

from __future__ import annotations

import torch

from ringpack.backends import layout
from ringpack.backends.base import AttnSpec, Backend
from ringpack.backends.torch_flash import common_reasons, lse_adjusted_out
from ringpack.merge import accumulation_dtype
from ringpack.plan import Tile, Wave

# auto gives cudnn dense tiles of at least this many (query, key) pairs: below it the per-call
# cost outweighs cuDNN's faster kernel, and torch_flash runs many small tiles in one call.
MIN_TILE_PAIRS = 2048 * 2048


def _as_1HSD(x_SHD: torch.Tensor) -> torch.Tensor:
    return x_SHD.unsqueeze(0).transpose(1, 2)


def _as_SHD(x_1HSD: torch.Tensor) -> torch.Tensor:
    return x_1HSD[0].transpose(0, 1)


def _partition(start: int, stop: int, starts: list[int], lengths: list[int]) -> bool:
    """Whether the runs ``(starts[i], lengths[i])``, in order, cover ``[start, stop)`` exactly."""
    at = start
    for a, n in zip(starts, lengths):
        if a != at:
            return False
        at += n
    return at == stop


class CudnnBackend(Backend):
    name = "cudnn"
    min_tile_pairs = MIN_TILE_PAIRS

    def __init__(self) -> None:
        # The two aten ops, held here so that a test can put a float64 emulation in their place.
        self.fwd_op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
        self.bwd_op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward", None)

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        why = common_reasons(spec, self.name)
        if spec.window:
            why.append("cudnn runs dense tiles only (full or causal), not sliding windows")
        if self.fwd_op is None or self.bwd_op is None:
            why.append("this torch has no aten::_scaled_dot_product_cudnn_attention(_backward)")
        elif spec.device_type == "cuda" and torch.cuda.is_available() and not torch.backends.cudnn.is_available():
            why.append("cuDNN is not available")
        return why

    def accepts(self, tile: Tile) -> bool:
        """Dense tiles big enough that one call per tile beats batching them into a varlen call."""
        if tile.q_len * tile.k_len < max(self.min_tile_pairs, 2):  # never 1 x 1: cuDNN rejects it
            return False
        kt = layout.trim(tile)
        return kt.full or kt.causal_square

    def _tiles(self, wave: Wave) -> list[layout.KernelTile]:
        tiles = [layout.trim(t) for t in wave.tiles]
        for t, kt in zip(wave.tiles, tiles):
            if not (kt.full or kt.causal_square):
                raise ValueError(f"cudnn: tile {t} is neither full nor square causal; use torch_flash or flex")
            if kt.q_len == kt.k_len == 1:
                raise ValueError(f"cudnn: tile {t} is 1 query x 1 key, which cuDNN's backward rejects "
                                 "(s_q = s_kv = 1 is not supported); use auto or torch_flash")
        return tiles

    def fwd(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        (q0, q1) = wave.q_span
        results = []
        for kt in self._tiles(wave):
            o, lse = self.fwd_op(
                _as_1HSD(q_NHD[kt.q_start:kt.q_start + kt.q_len]), _as_1HSD(k_MKD[kt.k_start:kt.k_start + kt.k_len]),
                _as_1HSD(v_MKD[kt.k_start:kt.k_start + kt.k_len]), None, True, 0.0, kt.causal_square, False,
                scale=scale)[:2]
            results.append((kt, _as_SHD(o), lse.reshape(lse.shape[1], lse.shape[2])))
        if _partition(q0, q1, [kt.q_start for kt, _, _ in results], [kt.q_len for kt, _, _ in results]):
            # the tiles cover the query hull in order (one tile, or documents on the diagonal): no assembly
            if len(results) == 1:
                return results[0][1], results[0][2]
            return torch.cat([o for _, o, _ in results]), torch.cat([l_ for _, _, l_ in results], dim=1)
        out = q_NHD.new_zeros((q1 - q0, *q_NHD.shape[1:]))
        lse = torch.full((q_NHD.shape[1], q1 - q0), float("-inf"), dtype=accumulation_dtype(q_NHD.dtype),
                         device=q_NHD.device)
        for kt, o, l_ in results:
            out[kt.q_start - q0:kt.q_start - q0 + kt.q_len] = o
            lse[:, kt.q_start - q0:kt.q_start - q0 + kt.q_len] = l_
        return out, lse

    def bwd(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        tiles = self._tiles(wave)
        seed = torch.zeros((), dtype=torch.int64, device=q_NHD.device)  # no dropout: never read
        grads = []
        for kt in tiles:
            rows, keys = slice(kt.q_start, kt.q_start + kt.q_len), slice(kt.k_start, kt.k_start + kt.k_len)
            dout = dout_NHD[rows].contiguous()
            out = out_NHD[rows].contiguous()
            if dlse_HN is not None:
                out = lse_adjusted_out(out, dout, dlse_HN[:, rows])
            lse = lse_HN[:, rows].contiguous().view(1, -1, kt.q_len, 1)
            dq, dk, dv = self.bwd_op(
                _as_1HSD(dout), _as_1HSD(q_NHD[rows]), _as_1HSD(k_MKD[keys]), _as_1HSD(v_MKD[keys]), _as_1HSD(out),
                lse, seed, seed, None, None, None, kt.q_len, kt.k_len, 0.0, kt.causal_square, scale=scale)
            grads.append((kt, _as_SHD(dq), _as_SHD(dk), _as_SHD(dv)))
        kts = [g[0] for g in grads]
        if (_partition(q0, q1, [kt.q_start for kt in kts], [kt.q_len for kt in kts])
                and _partition(k0, k1, [kt.k_start for kt in kts], [kt.k_len for kt in kts])):
            # rows and keys both covered in order by disjoint tiles: gradients line up, nothing to add
            if len(grads) == 1:
                return grads[0][1:]
            return tuple(torch.cat([g[i] for g in grads]) for i in (1, 2, 3))
        acc = accumulation_dtype(q_NHD.dtype)
        dq_acc = torch.zeros((q1 - q0, *q_NHD.shape[1:]), dtype=acc, device=q_NHD.device)
        dk_acc = torch.zeros((k1 - k0, *k_MKD.shape[1:]), dtype=acc, device=q_NHD.device)
        dv_acc = torch.zeros_like(dk_acc)
        for kt, dq, dk, dv in grads:
            dq_acc[kt.q_start - q0:kt.q_start - q0 + kt.q_len] += dq
            dk_acc[kt.k_start - k0:kt.k_start - k0 + kt.k_len] += dk
            dv_acc[kt.k_start - k0:kt.k_start - k0 + kt.k_len] += dv
        return dq_acc, dk_acc, dv_acc
