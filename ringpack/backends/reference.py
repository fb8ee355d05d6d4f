"""Reference backend: plain PyTorch, any device and dtype (float64 included), any band mask.

Legend: ``a`` query rows and ``b`` key rows of one tile; scores ``s_KGab`` with ``K`` KV heads and
``G = H // K`` query heads per KV head, so grouped-query attention never repeats K or V.
It materialises the scores of a block of a tile's query rows at a time (``BLOCK_CELLS`` scores at most, so a long
document's tile does not need its whole ``[H, q, k]`` score matrix) and yields one piece per block: exact and simple,
meant for checking and for the CPU.
"""

from __future__ import annotations

import sys

import torch

from ringpack.backends.base import Backend, BwdPiece, FwdPiece
from ringpack.merge import accumulation_dtype
from ringpack.schedule import Tile, Wave


def _band_mask(tile: Tile, device: torch.device) -> torch.Tensor:
    diag = torch.arange(tile.k_len, device=device)[None, :] - torch.arange(tile.q_len, device=device)[:, None]
    return (diag >= tile.lo) & (diag <= tile.hi)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf rows (no visible key) replaced by 0, so exp(s - lse) gives 0, not NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)


BLOCK_CELLS = 1 << 26  # scores of one block of rows: 512 MiB in float64


def _row_blocks(tile: Tile, heads: int):
    """``tile`` as tiles of consecutive query-row blocks over the same keys (the band shifted with the rows)."""
    rows = max(1, BLOCK_CELLS // max(1, heads * tile.k_len))
    for r0 in range(0, tile.q_len, rows):
        n = min(rows, tile.q_len - r0)
        yield tile._replace(q_start=tile.q_start + r0, q_len=n, lo=tile.lo + r0, hi=tile.hi + r0)


class ReferenceBackend(Backend):
    name = "reference"
    DEVICES = ("cpu", "cuda")
    DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    HEAD_DIMS = (1, sys.maxsize, 1)
    SUPPORTS_SOFTCAP = True

    @staticmethod
    def _scores(q_NHD, k_MKD, tile: Tile, scale: float, softcap: float, acc: torch.dtype):
        n_kv = k_MKD.shape[1]
        q_aKGD = q_NHD[tile.q_start:tile.q_start + tile.q_len].to(acc).unflatten(1, (n_kv, -1))
        k_bKD = k_MKD[tile.k_start:tile.k_start + tile.k_len].to(acc)
        s = torch.einsum("akgd,bkd->kgab", q_aKGD, k_bKD) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        return q_aKGD, k_bKD, s, _band_mask(tile, q_NHD.device)

    def forward(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        acc = accumulation_dtype(q_NHD.dtype)
        for tile in (b for t in wave.tiles for b in _row_blocks(t, q_NHD.shape[1])):
            _, _, s, mask = self._scores(q_NHD, k_MKD, tile, scale, softcap, acc)
            s = s.masked_fill(~mask, float("-inf"))
            lse_KGa = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - _finite(lse_KGa)[..., None])
            v_bKD = v_MKD[tile.k_start:tile.k_start + tile.k_len].to(acc)
            out = torch.einsum("kgab,bkd->akgd", p, v_bKD).flatten(1, 2)
            yield FwdPiece(slice(tile.q_start, tile.q_start + tile.q_len), out.to(q_NHD.dtype), lse_KGa.flatten(0, 1))

    def backward(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        acc = accumulation_dtype(q_NHD.dtype)
        n_kv = k_MKD.shape[1]
        for tile in (b for t in wave.tiles for b in _row_blocks(t, q_NHD.shape[1])):
            q_aKGD, k_bKD, s, mask = self._scores(q_NHD, k_MKD, tile, scale, softcap, acc)
            rows = slice(tile.q_start, tile.q_start + tile.q_len)
            lse_KGa = lse_HN[:, rows].to(acc).unflatten(0, (n_kv, -1))
            p = torch.exp(s.masked_fill(~mask, float("-inf")) - _finite(lse_KGa)[..., None])
            do_aKGD = dout_NHD[rows].to(acc).unflatten(1, (n_kv, -1))
            v_bKD = v_MKD[tile.k_start:tile.k_start + tile.k_len].to(acc)
            # softmax backward: ds = p * (dp - rowsum(dout * out) + dlse), with the ring's final out and lse
            delta_KGa = (do_aKGD * out_NHD[rows].to(acc).unflatten(1, (n_kv, -1))).sum(-1).permute(1, 2, 0)
            if dlse_HN is not None:
                delta_KGa = delta_KGa - dlse_HN[:, rows].to(acc).unflatten(0, (n_kv, -1))
            ds = p * (torch.einsum("akgd,bkd->kgab", do_aKGD, v_bKD) - delta_KGa[..., None])
            if softcap > 0:
                ds = ds * (1 - (s / softcap) ** 2)
            ds = ds * scale
            yield BwdPiece(rows, slice(tile.k_start, tile.k_start + tile.k_len),
                           torch.einsum("kgab,bkd->akgd", ds, k_bKD).flatten(1, 2),
                           torch.einsum("kgab,akgd->bkd", ds, q_aKGD), torch.einsum("kgab,akgd->bkd", p, do_aKGD))
