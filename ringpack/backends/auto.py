"""``auto``: per-tile dispatch over the backends that support a request, fastest first.

Legend: as in ``base``. Each tile of a wave goes to the first backend (in ``BACKENDS`` order) that
accepts it; the tiles of one backend form a sub-wave run in as few calls as that backend allows.
Sub-waves have disjoint query rows, and rows a sub-wave does not compute are ``out = 0, lse = -inf``,
so results combine by adding outputs and taking the maximum lse over each sub-wave's hull. Where the
ring already holds accumulators, each sub-wave merges into them instead (``fwd_merge_``/``bwd_add_``).
"""

from __future__ import annotations

import torch

from ringpack.backends.base import Backend
from ringpack.merge import accumulation_dtype
from ringpack.schedule import Tile, Wave


class AutoBackend(Backend):
    """Runs each tile on the first of ``backends`` that ``accepts`` it (the last takes any)."""

    name = "auto"

    def __init__(self, backends: list[Backend]):
        if not backends:
            raise ValueError("auto needs at least one backend")
        # The first backend that takes every tile gets all the rest: those after it never run, and must not
        # decide what auto promises (on a GPU: cudnn, torch_flash; flex and the reference stay unused).
        last = next((i for i, b in enumerate(backends) if not b.selective), len(backends) - 1)
        self.backends = backends[:last + 1]
        # an assembled wave holds one sub-wave's gradient per row: still exact 16-bit values
        self.grads_in_input_dtype = all(b.grads_in_input_dtype for b in self.backends)

    def not_supported_reasons(self, spec):
        return [r for b in self.backends for r in b.not_supported_reasons(spec)]

    def split(self, wave: Wave) -> list[tuple[Backend, Wave]]:
        """``(backend, sub-wave)`` pairs covering ``wave``'s tiles, in backend order."""
        chosen: dict[int, list[Tile]] = {}
        for tile in wave.tiles:
            idx = next((i for i, b in enumerate(self.backends[:-1]) if b.accepts(tile)), len(self.backends) - 1)
            chosen.setdefault(idx, []).append(tile)
        if len(chosen) == 1:
            (idx,) = chosen
            return [(self.backends[idx], wave)]
        return [(self.backends[i], Wave.of(tuple(tiles))) for i, tiles in sorted(chosen.items())]

    def assembles(self, wave: Wave) -> bool:
        parts = self.split(wave)
        return len(parts) > 1 or parts[0][0].assembles(wave)

    def fwd_merge_(self, out_acc_NHD, lse_acc_HN, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        for backend, sub in self.split(wave):
            backend.fwd_merge_(out_acc_NHD, lse_acc_HN, q_NHD, k_MKD, v_MKD, sub, scale=scale, softcap=softcap)

    def bwd_add_(self, dq_acc_NHD, dk_acc_MKD, dv_acc_MKD, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN,
                 wave: Wave, *, scale, softcap):
        for backend, sub in self.split(wave):
            backend.bwd_add_(dq_acc_NHD, dk_acc_MKD, dv_acc_MKD, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN,
                             dlse_HN, sub, scale=scale, softcap=softcap)

    def fwd(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        parts = self.split(wave)
        if len(parts) == 1:
            return parts[0][0].fwd(q_NHD, k_MKD, v_MKD, wave, scale=scale, softcap=softcap)
        q0, q1 = wave.q_span
        out = q_NHD.new_zeros((q1 - q0, *q_NHD.shape[1:]))
        lse = torch.full((q_NHD.shape[1], q1 - q0), float("-inf"), dtype=accumulation_dtype(q_NHD.dtype),
                         device=q_NHD.device)
        for backend, sub in parts:
            o, l_ = backend.fwd(q_NHD, k_MKD, v_MKD, sub, scale=scale, softcap=softcap)
            a, b = sub.q_span[0] - q0, sub.q_span[1] - q0
            out[a:b] += o
            torch.maximum(lse[:, a:b], l_.to(lse.dtype), out=lse[:, a:b])
        return out, lse

    def bwd(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        parts = self.split(wave)
        if len(parts) == 1:
            return parts[0][0].bwd(dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave, scale=scale,
                                   softcap=softcap)
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        acc = accumulation_dtype(q_NHD.dtype)
        dq = torch.zeros((q1 - q0, *q_NHD.shape[1:]), dtype=acc, device=q_NHD.device)
        dk = torch.zeros((k1 - k0, *k_MKD.shape[1:]), dtype=acc, device=q_NHD.device)
        dv = torch.zeros_like(dk)
        for backend, sub in parts:
            g = backend.bwd(dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, sub, scale=scale,
                            softcap=softcap)
            dq[sub.q_span[0] - q0:sub.q_span[1] - q0] += g[0]
            dk[sub.k_span[0] - k0:sub.k_span[1] - k0] += g[1]
            dv[sub.k_span[0] - k0:sub.k_span[1] - k0] += g[2]
        return dq, dk, dv
