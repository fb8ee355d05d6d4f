"""``auto``: each tile to the kernel measured fastest for its class, among the backends that support the request.

Legend: as in ``base``. A tile's class is its shape kind (*dense*: full, or square and plain causal; else a band)
and its size in visible pairs. ``RULES`` give classes to kernels, from the per-tile measurements committed under
``benchmarks/results/`` (``benchmarks/tile_kernels.py``); a tile no rule claims goes to the first backend, in
preference order, that no rule names and that runs it. The tiles of one backend form a sub-wave run in as few calls
as that backend allows; sub-waves have disjoint query rows, so their pieces simply follow each other.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

from ringpack.backends.base import AttnSpec, Backend
from ringpack.schedule import Tile, Wave


@dataclass(frozen=True)
class Rule:
    """Tiles of one class go to ``backend`` (when it supports the request and runs the tile)."""

    backend: str
    dense: bool = False  # only full tiles and plain causal squares
    min_pairs: int = 0
    max_pairs: int = sys.maxsize

    def claims(self, tile: Tile) -> bool:
        return (not self.dense or tile.full or tile.causal_square) and self.min_pairs <= tile.pairs <= self.max_pairs


# 1x H200, torch 2.11 (benchmarks/results/2026-12-01b-h200/tiles.md): cuDNN's dense kernel beats FA2 varlen from
# about 2048 x 2048 pairs; below it the per-call cost outweighs it and FA2 runs many small tiles in one call.
RULES = (Rule("cudnn", dense=True, min_pairs=2048 * 2048),)


class AutoBackend(Backend):
    """Runs each tile on the backend that ``rules`` give its class, else on the first general backend that runs it."""

    name = "auto"

    def __init__(self, backends: list[Backend], rules: tuple[Rule, ...] = RULES):
        if not backends:
            raise ValueError("auto needs at least one backend")
        named = {r.backend for r in rules}
        self.rules = tuple(r for r in rules if any(b.name == r.backend for b in backends))
        general = [b for b in backends if b.name not in named] or backends[-1:]
        # Backends after the first general one that runs every tile never get a tile, and must not decide what auto
        # promises (on a GPU: flex and the reference stay unused behind torch_flash).
        last = next((i for i, b in enumerate(general) if b.RUNS_EVERY_TILE), len(general) - 1)
        self.general = general[:last + 1]
        self.backends = [b for b in backends if b.name in {r.backend for r in self.rules}] + self.general
        self.EXACT_16BIT_GRADS = all(b.EXACT_16BIT_GRADS for b in self.backends)

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        return [r for b in self.backends for r in b.not_supported_reasons(spec)]

    def backend_for(self, tile: Tile) -> Backend:
        """The backend that runs ``tile``."""
        for rule in self.rules:
            if rule.claims(tile):
                backend = next(b for b in self.backends if b.name == rule.backend)
                if backend.runs_tile(tile):
                    return backend
        return next((b for b in self.general if b.runs_tile(tile)), self.general[-1])

    def split(self, wave: Wave) -> tuple[tuple[Backend, Wave], ...]:
        """``(backend, sub-wave)`` pairs covering ``wave``'s tiles, in the order of ``backends``."""
        return _split(self, wave)

    def forward(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        for backend, sub in self.split(wave):
            yield from backend.forward(q_NHD, k_MKD, v_MKD, sub, scale=scale, softcap=softcap)

    def backward(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        for backend, sub in self.split(wave):
            yield from backend.backward(dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, sub, scale=scale,
                                        softcap=softcap)

    def __repr__(self) -> str:
        return f"AutoBackend({', '.join(b.name for b in self.backends)})"


@functools.lru_cache(maxsize=4096)
def _split(auto: AutoBackend, wave: Wave) -> tuple[tuple[Backend, Wave], ...]:
    """Cached: a plan is reused by every layer, so each wave is split once."""
    chosen: dict[int, list[Tile]] = {}
    for tile in wave.tiles:
        chosen.setdefault(auto.backends.index(auto.backend_for(tile)), []).append(tile)
    if len(chosen) == 1:
        (i,) = chosen
        return ((auto.backends[i], wave),)
    return tuple((auto.backends[i], Wave.of(tuple(tiles))) for i, tiles in sorted(chosen.items()))
