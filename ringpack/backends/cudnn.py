"""``cudnn``: cuDNN's dense fused attention (aten ``_scaled_dot_product_cudnn_attention``), one call per batch
of equal tiles.

Legend: ``x_BHSD`` the ``[B, H, S, D]`` view of ``B`` consecutive ``[S, H, D]`` slices (no copy);
``lse_BHS1`` fp32. One piece per batch of equal tiles.
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

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ringpack.backends.base import AttnSpec, Backend, BwdPiece, FwdPiece
from ringpack.backends.common import lse_adjusted_out
from ringpack.schedule import Tile, Wave


@dataclass(frozen=True)
class Batch:
    """``count`` tiles of one shape laid end to end (rows after rows, keys after keys): one cuDNN call.

    A pack of equal documents on the diagonal is one batch, ``[B, H, S, D]`` views of the shard::

        rows  d0 d1 d2        q_NHD[q_start : q_start + count * q_len]  ->  [count, H, q_len, D]
        keys  d0 d1 d2        k_MKD[k_start : k_start + count * k_len]  ->  [count, Hk, k_len, D]
    """

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool  # plain causal square, else full
    count: int

    @property
    def rows(self) -> slice:
        return slice(self.q_start, self.q_start + self.count * self.q_len)

    @property
    def keys(self) -> slice:
        return slice(self.k_start, self.k_start + self.count * self.k_len)


@functools.lru_cache(maxsize=4096)
def batches(wave: Wave) -> tuple[Batch, ...]:
    """``wave``'s tiles, consecutive equal ones batched; ValueError for a tile cuDNN cannot run.

    Cached: a plan is reused by every layer, so each wave is laid out once (host tuples only)."""
    out: list[Batch] = []
    for t in wave.tiles:
        if not (t.full or t.causal_square):
            raise ValueError(f"cudnn: tile {t} is neither full nor square causal; use torch_flash or flex")
        if t.q_len == t.k_len == 1:
            raise ValueError(f"cudnn: tile {t} is 1 query x 1 key, which cuDNN's backward rejects "
                             "(s_q = s_kv = 1 is not supported); use auto or torch_flash")
        b = out[-1] if out else None
        if (b is not None and (b.q_len, b.k_len, b.causal) == (t.q_len, t.k_len, t.causal_square)
                and b.rows.stop == t.q_start and b.keys.stop == t.k_start):
            out[-1] = dataclasses.replace(b, count=b.count + 1)
        else:
            out.append(Batch(t.q_start, t.q_len, t.k_start, t.k_len, t.causal_square, 1))
    return tuple(out)


def _as_BHSD(x_NHD: torch.Tensor, count: int) -> torch.Tensor:
    return x_NHD.unflatten(0, (count, -1)).transpose(1, 2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous, in one copy of 8-byte words where the layout allows (a quarter of the elements of a
    16-bit copy). cuDNN lays a result out like its inputs when they are dense rows; where they are not, its result
    comes in ``[B, H, S, D]`` storage, a transposed view as rows that flattening would copy element by element
    and later adds would read strided."""
    if x.is_contiguous():
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = 8 // x.element_size()
    if (x.stride(-1) == 1 and x.shape[-1] % w == 0 and x.storage_offset() % w == 0
            and all(st % w == 0 for st in x.stride()[:-1])):
        out.view(torch.int64).copy_(x.view(torch.int64))  # the same bits, a quarter of the elements
    else:
        out.copy_(x)
    return out


def _as_NHD(x_BHSD: torch.Tensor) -> torch.Tensor:
    """The ``[B * S, H, D]`` rows of a result: a view where cuDNN laid it out as rows like its inputs, else one copy
    (``_rows``)."""
    return _rows(x_BHSD.transpose(1, 2)).flatten(0, 1)


def _lse_HN(lse_BHS1: torch.Tensor) -> torch.Tensor:
    return lse_BHS1[..., 0].transpose(0, 1).flatten(1)  # a view for one tile, a copy for a batch


@functools.cache
def _unused_seed(device: torch.device) -> torch.Tensor:
    """The backward's dropout seed and offset: required arguments, never read without dropout."""
    return torch.zeros((), dtype=torch.int64, device=device)


class CudnnBackend(Backend):
    name = "cudnn"
    SUPPORTS_WINDOW = False
    EXACT_16BIT_GRADS = True
    RUNS_EVERY_TILE = False

    def __init__(self, fwd_op=None, bwd_op=None) -> None:
        # The two aten ops; a test passes float64 emulations of their contracts instead.
        self.fwd_op = fwd_op or getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
        self.bwd_op = bwd_op or getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward", None)

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        why = super().not_supported_reasons(spec)
        if self.fwd_op is None or self.bwd_op is None:
            why.append("this torch has no aten::_scaled_dot_product_cudnn_attention(_backward)")
        elif spec.device_type == "cuda" and torch.cuda.is_available() and not torch.backends.cudnn.is_available():
            why.append("cuDNN is not available")
        return why

    def runs_tile(self, tile: Tile) -> bool:
        """Dense tiles: full, or square and plain causal; never 1 x 1 (cuDNN's backward rejects it)."""
        return (tile.full or tile.causal_square) and tile.q_len * tile.k_len > 1

    def forward(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        for b in batches(wave):
            o, lse = self.fwd_op(_as_BHSD(q_NHD[b.rows], b.count), _as_BHSD(k_MKD[b.keys], b.count),
                                 _as_BHSD(v_MKD[b.keys], b.count), None, True, 0.0, b.causal, False, scale=scale)[:2]
            yield FwdPiece(b.rows, _as_NHD(o), _lse_HN(lse))

    def backward(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        seed = _unused_seed(q_NHD.device)
        for b in batches(wave):
            rows, keys, n = b.rows, b.keys, b.count
            dout = dout_NHD[rows].contiguous()
            out = out_NHD[rows].contiguous()
            if dlse_HN is not None:
                out = lse_adjusted_out(out, dout, dlse_HN[:, rows])
            lse = lse_HN[:, rows].unflatten(1, (n, b.q_len)).transpose(0, 1).unsqueeze(-1).contiguous()
            dq, dk, dv = self.bwd_op(
                _as_BHSD(dout, n), _as_BHSD(q_NHD[rows], n), _as_BHSD(k_MKD[keys], n), _as_BHSD(v_MKD[keys], n),
                _as_BHSD(out, n), lse, seed, seed, None, None, None, b.q_len, b.k_len, 0.0, b.causal, scale=scale)
            yield BwdPiece(rows, keys, _as_NHD(dq), _as_NHD(dk), _as_NHD(dv))
