"""Partition strategies: which global tokens each rank owns, as (start, length) runs in local order.

A strategy only decides ownership; ``plan.make_plan`` turns ownership into segments and tiles.

``balanced`` keeps documents whole wherever that balances the work, and cuts only the largest
documents, zigzag-style over every rank, as far as balance needs::

    one long document (L) and crumbs (c), 2 ranks, causal:
      rank 0: L0 L3  c c c c        L cut in 4 chunks: rank r owns chunks r and 3 - r,
      rank 1: L1 L2  c c c          so each rank gets the same share of L's causal work
                                    at every ring step; the crumbs never leave their rank.

Two loads are balanced at once: attention work, counted in visible (query, key) pairs under the
mask plus a fixed cost per tile, and tokens, which set the cost of everything else in a layer
(projections, MLP, norms) and the activation memory. Balancing work alone would, for example,
give a rank holding one long causal document a third of the tokens of its neighbour.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from ringpack.mask import band, band_pairs

Runs = list[list[tuple[int, int]]]  # [rank] -> [(global start, length)] in local order


@dataclass(frozen=True)
class CostModel:
    """Work of a rank in units of one visible (query, key) pair."""

    tile_overhead: int = 16384  # fixed cost of one tile (a kernel call, a partly filled block)
    target_imbalance: float = 1.02  # ``balanced`` stops cutting documents once max/mean work is below this
    target_token_imbalance: float = 1.02  # ... and max/mean tokens too


COST = CostModel()


def contiguous(cu: tuple[int, ...], world: int, causal: bool, window: tuple[int, int]) -> Runs:
    """The packed stream cut into ``world`` near-equal token ranges; documents are cut where they fall."""
    total = cu[-1]
    bounds = [r * total // world for r in range(world + 1)]
    return [[(bounds[r], bounds[r + 1] - bounds[r])] if bounds[r + 1] > bounds[r] else [] for r in range(world)]


def _zigzag_chunks(start: int, length: int, world: int, rank: int) -> list[tuple[int, int]]:
    """Chunks ``rank`` and ``2*world-1-rank`` of a document cut into ``2*world`` near-equal chunks."""
    n = 2 * world
    out = []
    for c in (rank, n - 1 - rank):
        a, b = start + c * length // n, start + (c + 1) * length // n
        if b > a:
            out.append((a, b - a))
    return out


def zigzag(cu: tuple[int, ...], world: int, causal: bool, window: tuple[int, int]) -> Runs:
    """Every document cut into ``2*world`` near-equal chunks; rank ``r`` owns chunks ``r`` and ``2*world-1-r``.

    Chunk ``c`` of a document of length ``L`` is ``[c*L // (2*world), (c+1)*L // (2*world))``: any length
    works, chunks may differ by one token or be empty, nothing is padded.
    """
    runs: Runs = [[] for _ in range(world)]
    for start, stop in zip(cu[:-1], cu[1:]):
        for r in range(world):
            runs[r].extend(_zigzag_chunks(start, stop - start, world, r))
    return runs


def query_work(q_offset: int, q_len: int, doc_len: int, causal: bool, window: tuple[int, int]) -> int:
    """Visible pairs of the queries ``[q_offset, q_offset + q_len)`` of a document against all its keys."""
    lo, hi = band(q_offset, 0, causal, window)
    return band_pairs(q_len, doc_len, lo, hi)


def balanced(cu: tuple[int, ...], world: int, causal: bool, window: tuple[int, int],
             cost: CostModel = COST) -> Runs:
    """Whole documents where that balances; the largest documents zigzag-cut over every rank as needed.

    Tries cutting the ``k`` largest documents for growing ``k`` and keeps the first assignment whose
    estimated max/mean work and max/mean tokens are both under their targets (else the one whose worse
    ratio is lowest). Each try places the whole documents, largest first, on the rank whose larger
    share of the mean (work or tokens) is lowest, on top of the evenly cut ones.
    Deterministic: ties are broken by document index and rank.
    """
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    docs = sorted((d for d, n in enumerate(lengths) if n), key=lambda d: (-lengths[d], d))
    if world == 1 or not docs:
        return [[(cu[d], lengths[d]) for d in docs]] + [[] for _ in range(world - 1)]
    whole_cost = {d: query_work(0, lengths[d], lengths[d], causal, window) + cost.tile_overhead for d in docs}
    best: tuple[float, int, dict[int, int]] | None = None
    k = 0
    while True:
        imbalance, owner = _assign(docs, k, lengths, whole_cost, world, causal, window, cost)
        if best is None or max(imbalance) < best[0]:
            best = (max(imbalance), k, owner)
        if (imbalance[0] <= cost.target_imbalance and imbalance[1] <= cost.target_token_imbalance) or k >= len(docs):
            break
        k = k + 1 if k < 2 * world else min(len(docs), k * 2)
    _, k, owner = best
    cut = set(docs[:k])
    runs: Runs = [[] for _ in range(world)]
    for d, n in enumerate(lengths):
        if d in cut:
            for r in range(world):
                runs[r].extend(_zigzag_chunks(cu[d], n, world, r))
        elif n:
            runs[owner[d]].append((cu[d], n))
    for r in range(world):
        runs[r].sort()
    return runs


def _assign(docs, k, lengths, whole_cost, world, causal, window, cost):
    """Cut ``docs[:k]`` over every rank, then place the rest whole, each on the least-loaded rank.

    A rank's load is the larger of its work and its tokens, each as a fraction of the mean. Returns
    ``((max/mean work, max/mean tokens), {doc: rank})``.
    """
    work = [0.0] * world
    tokens = [0] * world
    for d in docs[:k]:
        n = lengths[d]
        for r in range(world):
            chunks = _zigzag_chunks(0, n, world, r)
            # one tile per (own chunk, chunk elsewhere) pair at most: 2 chunks x 2 world chunks
            work[r] += sum(query_work(a, m, n, causal, window) for a, m in chunks) + 4 * world * cost.tile_overhead
            tokens[r] += sum(m for _, m in chunks)
    mean_work = (sum(work) + sum(whole_cost[d] for d in docs[k:])) / world
    mean_tokens = sum(lengths[d] for d in docs) / world

    def load(r: int) -> float:
        return max(work[r] / mean_work, tokens[r] / mean_tokens)

    heap = [(load(r), r) for r in range(world)]
    heapq.heapify(heap)
    owner = {}
    for d in docs[k:]:
        _, r = heapq.heappop(heap)
        owner[d] = r
        work[r] += whole_cost[d]
        tokens[r] += lengths[d]
        heapq.heappush(heap, (load(r), r))
    return (max(work) / mean_work, max(tokens) / mean_tokens), owner


# The strategies by name, in the order ``ringpack.STRATEGIES`` lists them (the default first).
STRATEGIES: dict[str, Callable[[tuple[int, ...], int, bool, tuple[int, int]], Runs]] = {
    "balanced": balanced,
    "zigzag": zigzag,
    "contiguous": contiguous,
}
