"""``auto``: each tile to the kernel measured fastest for its class, among the backends that support the request.

Legend: as in ``base``. A tile's class is its shape kind (*full*; *causal*: square and plain causal; else a band)
and its size in query x key cells. ``RULES`` give classes to kernels, from the per-tile measurements committed under
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
    kind: str = "any"  # "full", "causal" (a plain causal square), "dense" (either) or "any"
    min_area: int = 0  # in query x key cells, q_len * k_len
    max_area: int = sys.maxsize

    def claims(self, tile: Tile) -> bool:
        kind = {"any": True, "full": tile.full, "causal": tile.causal_square,
                "dense": tile.full or tile.causal_square}[self.kind]
        return kind and self.min_area <= tile.q_len * tile.k_len <= self.max_area


# The rules for each kernel that runs the other tiles (auto's first general backend), from the per-tile
# measurements of benchmarks/tile_kernels.py on 1x H200 (torch 2.11, cuDNN 9.19, flash-attn-4 4.0.0b36):
# - FA2 varlen runs the rest: cuDNN's dense kernel is faster from 2048 x 2048 cells (2026-12-01b-h200/tiles.md);
#   below it the per-call cost outweighs it and FA2 runs many small tiles in one call.
# - FlashAttention-4 runs everything: forward + backward it beat cuDNN on every tile class measured, full and causal,
#   8k to 64k, packs of 8k and 2k documents and the long tail (1.06x to 1.20x), except packs of equal 512-token
#   documents, which cuDNN batches 7% faster (2026-12-02-h200/tiles.md); a tile alone cannot tell such a pack from
#   the long tail's short documents, where one FA4 call beats many cuDNN ones.
RULES: dict[str, tuple[Rule, ...]] = {
    "torch_flash": (Rule("cudnn", "dense", min_area=2048 * 2048),),
    "flash_attn": (Rule("cudnn", "dense", min_area=2048 * 2048),),
    "flash_attn_4": (),
}


class AutoBackend(Backend):
    """Runs each tile on the backend that ``rules`` give its class, else on the first backend that runs every tile."""

    name = "auto"

    def __init__(self, backends: list[Backend], rules: tuple[Rule, ...] | None = None):
        if not backends:
            raise ValueError("auto needs at least one backend")
        if rules is None:  # the measured rules against the first backend that could run the rest
            rules = next((RULES[b.name] for b in backends if b.name in RULES), ())
        named = {r.backend for r in rules}
        self.rules = tuple(r for r in rules if any(b.name == r.backend for b in backends))
        # A backend that runs only some tiles (cuDNN) gets them through a rule only; the first backend that runs every
        # tile takes the rest, and those after it never get a tile, so they must not decide what auto promises (on a
        # GPU: flex and the reference stay unused behind torch_flash or flash_attn_4).
        general = [b for b in backends if b.name not in named and b.RUNS_EVERY_TILE] or backends[-1:]
        self.general = general[:1]
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
        return self.general[0]

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
    if not auto.rules:  # the general backend takes every tile: no tile needs looking at
        return ((auto.general[0], wave),)
    chosen: dict[int, list[Tile]] = {}
    for tile in wave.tiles:
        chosen.setdefault(auto.backends.index(auto.backend_for(tile)), []).append(tile)
    if len(chosen) == 1:
        (i,) = chosen
        return ((auto.backends[i], wave),)
    return tuple((auto.backends[i], Wave.of(tuple(tiles))) for i, tiles in sorted(chosen.items()))
