"""Reference backend: plain PyTorch, any device and dtype (float64 included), any band mask.

Legend: ``a`` query rows and ``b`` key rows of one tile; scores ``s_KGab`` with ``K`` KV heads and
``G = H // K`` query heads per KV head, so grouped-query attention never repeats K or V.
It materialises each tile's scores: exact and simple, meant for checking and for the CPU.
"""

from __future__ import annotations

import torch

from ringpack.backends.base import AttnSpec, Backend
from ringpack.merge import accumulation_dtype
from ringpack.schedule import Tile, Wave


def _band_mask(tile: Tile, device: torch.device) -> torch.Tensor:
    diag = torch.arange(tile.k_len, device=device)[None, :] - torch.arange(tile.q_len, device=device)[:, None]
    return (diag >= tile.lo) & (diag <= tile.hi)


class ReferenceBackend(Backend):
    name = "reference"

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        if not spec.dtype.is_floating_point:
            return [f"dtype {spec.dtype} is not a floating-point type"]
        return []

    @staticmethod
    def _scores(q_NHD, k_MHD, tile: Tile, scale: float, softcap: float, acc: torch.dtype):
        n_kv = k_MHD.shape[1]
        q_aKGD = q_NHD[tile.q_start:tile.q_start + tile.q_len].to(acc).unflatten(1, (n_kv, -1))
        k_bKD = k_MHD[tile.k_start:tile.k_start + tile.k_len].to(acc)
        s = torch.einsum("akgd,bkd->kgab", q_aKGD, k_bKD) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        return q_aKGD, k_bKD, s, _band_mask(tile, q_NHD.device)

    def fwd(self, q_NHD, k_MHD, v_MHD, wave: Wave, *, scale, softcap):
        acc = accumulation_dtype(q_NHD.dtype)
        n_heads, head_dim = q_NHD.shape[1:]
        q0, q1 = wave.q_span
        out = torch.zeros(q1 - q0, n_heads, head_dim, dtype=acc, device=q_NHD.device)
        lse = torch.full((n_heads, q1 - q0), float("-inf"), dtype=acc, device=q_NHD.device)
        for tile in wave.tiles:
            _, _, s, mask = self._scores(q_NHD, k_MHD, tile, scale, softcap, acc)
            s = s.masked_fill(~mask, float("-inf"))
            lse_KGa = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - _finite(lse_KGa)[..., None])
            v_bKD = v_MHD[tile.k_start:tile.k_start + tile.k_len].to(acc)
            rows = slice(tile.q_start - q0, tile.q_start - q0 + tile.q_len)
            out[rows] = torch.einsum("kgab,bkd->akgd", p, v_bKD).flatten(1, 2)
            lse[:, rows] = lse_KGa.flatten(0, 1)
        return out.to(q_NHD.dtype), lse if acc == torch.float64 else lse.float()

    def bwd(self, dout_NHD, q_NHD, k_MHD, v_MHD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        acc = accumulation_dtype(q_NHD.dtype)
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        n_kv = k_MHD.shape[1]
        dq = torch.zeros(q1 - q0, *q_NHD.shape[1:], dtype=acc, device=q_NHD.device)
        dk = torch.zeros(k1 - k0, *k_MHD.shape[1:], dtype=acc, device=q_NHD.device)
        dv = torch.zeros_like(dk)
        for tile in wave.tiles:
            q_aKGD, k_bKD, s, mask = self._scores(q_NHD, k_MHD, tile, scale, softcap, acc)
            rows = slice(tile.q_start, tile.q_start + tile.q_len)
            lse_KGa = lse_HN[:, rows].to(acc).unflatten(0, (n_kv, -1))
            p = torch.exp(s.masked_fill(~mask, float("-inf")) - _finite(lse_KGa)[..., None])
            do_aKGD = dout_NHD[rows].to(acc).unflatten(1, (n_kv, -1))
            v_bKD = v_MHD[tile.k_start:tile.k_start + tile.k_len].to(acc)
            # softmax backward: ds = p * (dp - rowsum(dout * out) + dlse), with the ring's final out and lse
            delta_KGa = (do_aKGD * out_NHD[rows].to(acc).unflatten(1, (n_kv, -1))).sum(-1).permute(1, 2, 0)
            if dlse_HN is not None:
                delta_KGa = delta_KGa - dlse_HN[:, rows].to(acc).unflatten(0, (n_kv, -1))
            ds = p * (torch.einsum("akgd,bkd->kgab", do_aKGD, v_bKD) - delta_KGa[..., None])
            if softcap > 0:
                ds = ds * (1 - (s / softcap) ** 2)
            ds = ds * scale
            qr = slice(tile.q_start - q0, tile.q_start - q0 + tile.q_len)
            kr = slice(tile.k_start - k0, tile.k_start - k0 + tile.k_len)
            dq[qr] += torch.einsum("kgab,bkd->akgd", ds, k_bKD).flatten(1, 2)
            dk[kr] += torch.einsum("kgab,akgd->bkd", ds, q_aKGD)
            dv[kr] += torch.einsum("kgab,akgd->bkd", p, do_aKGD)
        return dq, dk, dv


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf rows (no visible key) replaced by 0, so exp(s - lse) gives 0, not NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
