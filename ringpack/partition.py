"""Partition strategies: which global tokens each rank owns, as (start, length) runs in local order.

A strategy only decides ownership; ``plan.make_plan`` turns ownership into segments and tiles.
"""

from __future__ import annotations

from collections.abc import Callable

Runs = list[list[tuple[int, int]]]  # [rank] -> [(global start, length)] in local order


def contiguous(cu: tuple[int, ...], world: int) -> Runs:
    """The packed stream cut into ``world`` near-equal token ranges; documents are cut where they fall."""
    total = cu[-1]
    bounds = [r * total // world for r in range(world + 1)]
    return [[(bounds[r], bounds[r + 1] - bounds[r])] if bounds[r + 1] > bounds[r] else [] for r in range(world)]


def zigzag(cu: tuple[int, ...], world: int) -> Runs:
    """Every document cut into ``2*world`` near-equal chunks; rank ``r`` owns chunks ``r`` and ``2*world-1-r``.

    Chunk ``c`` of a document of length ``L`` is ``[c*L // (2*world), (c+1)*L // (2*world))``: any length
    works, chunks may differ by one token or be empty, nothing is padded.
    """
    runs: Runs = [[] for _ in range(world)]
    n = 2 * world
    for start, stop in zip(cu[:-1], cu[1:]):
        length = stop - start
        for r in range(world):
            for c in (r, n - 1 - r):
                a, b = start + c * length // n, start + (c + 1) * length // n
                if b > a:
                    runs[r].append((a, b - a))
    return runs


def balanced(cu: tuple[int, ...], world: int) -> Runs:
    """Balanced causal work for any length mix; currently the zigzag cut."""
    return zigzag(cu, world)


_STRATEGIES: dict[str, Callable[[tuple[int, ...], int], Runs]] = {
    "balanced": balanced,
    "zigzag": zigzag,
    "contiguous": contiguous,
}


def split(strategy: str, cu: tuple[int, ...], world: int, *, causal: bool, window: tuple[int, int]) -> Runs:
    """Ownership runs for ``strategy``; ``causal`` and ``window`` let a strategy weigh work."""
    del causal, window  # the cuts above do not depend on the mask yet
    return _STRATEGIES[strategy](cu, world)
