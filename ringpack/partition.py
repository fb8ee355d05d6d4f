"""Partition strategies: which global tokens each rank owns, as ``ringpack.ownership`` forms (``Chunked`` or
``Contiguous``).

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

Ownership is kept per document (``ringpack.ownership``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from ringpack.mask import band, band_pairs
from ringpack.ownership import CUT, Chunked, Contiguous, Owners


@dataclass(frozen=True)
class CostModel:
    """Work of a rank in units of one visible (query, key) pair."""

    tile_overhead: int = 16384  # fixed cost of one tile (a kernel call, a partly filled block)
    target_imbalance: float = 1.02  # ``balanced`` stops cutting documents once max/mean work is below this
    target_token_imbalance: float = 1.02  # ... and max/mean tokens too


COST = CostModel()


def contiguous(cu: tuple[int, ...], world: int, causal: bool, window: tuple[int, int]) -> Contiguous:
    """The packed stream cut into ``world`` near-equal token ranges; documents are cut where they fall."""
    return Contiguous(cu, world)


def zigzag(cu: tuple[int, ...], world: int, causal: bool, window: tuple[int, int]) -> Chunked:
    """Every document cut into ``2*world`` near-equal chunks; rank ``r`` owns chunks ``r`` and ``2*world-1-r``."""
    return Chunked(cu, world)


def query_work(q_offset: int, q_len: int, doc_len: int, causal: bool, window: tuple[int, int]) -> int:
    """Visible pairs of the queries ``[q_offset, q_offset + q_len)`` of a document against all its keys."""
    lo, hi = band(q_offset, 0, causal, window)
    return band_pairs(q_len, doc_len, lo, hi)


def balanced(cu: tuple[int, ...], world: int, causal: bool, window: tuple[int, int],
             cost: CostModel = COST) -> Chunked:
    """Whole documents where that balances; the largest documents zigzag-cut over every rank as needed.

    Tries cutting the ``k`` largest documents for growing ``k`` and keeps the first assignment whose
    estimated max/mean work and max/mean tokens are both under their targets (else the one whose worse
    ratio is lowest). Each try places the whole documents, largest first, on the rank whose larger
    share of the mean (work or tokens) is lowest, on top of the evenly cut ones.
    Deterministic: ties are broken by document index and rank.
    """
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    docs = sorted((d for d, n in enumerate(lengths) if n), key=lengths.__getitem__, reverse=True)  # stable
    if world == 1 or not docs:
        return Chunked(cu, world, (0,) * len(lengths), tuple(docs) if world == 1 else None)
    by_length = {n: query_work(0, n, n, causal, window) + cost.tile_overhead for n in set(lengths)}
    whole = [by_length[lengths[d]] for d in docs]
    rest = [0] * (len(docs) + 1)  # rest[k]: work of docs[k:] placed whole
    for i in range(len(docs) - 1, -1, -1):
        rest[i] = rest[i + 1] + whole[i]
    search = _Search(docs, lengths, whole, rest, _CutLoads(world, causal, window, cost), cost)
    over: list[tuple[float, int]] = []  # tries stopped over a target: (a lower bound of their worse ratio, k)
    under = None  # (worse ratio, k, owner) of the first try under both targets
    k = 0
    while True:
        ratios, owner = search.place(k, stop_over=True)
        if owner is not None:
            under = (max(ratios), k, owner)
            break
        over.append((max(ratios), k))
        if k >= len(docs):
            break
        k = k + 1 if k < 2 * world else min(len(docs), k * 2)
    # The rule: the first try with the lowest worse ratio among those up to the first one under the targets. A try
    # over a target can only win when the targets differ (or none is under them): place those in full, lowest
    # bound first, while their bound can still beat (or tie with an earlier index) the best so far.
    best = under
    for bound, k in sorted(over):
        if best is not None and bound > best[0]:
            break
        ratios, owner = search.place(k, stop_over=False)
        if best is None or (max(ratios), k) < best[:2]:
            best = (max(ratios), k, owner)
    return Chunked(cu, world, tuple(best[2]))


class _CutLoads:
    """Work and tokens every rank gets from the ``k`` largest documents cut over all ranks, grown one at a time."""

    def __init__(self, world: int, causal: bool, window: tuple[int, int], cost: CostModel):
        self.world, self.causal, self.window, self.cost = world, causal, window, cost
        self.k, self.work, self.tokens = 0, [0.0] * world, [0] * world

    def add(self, n: int) -> None:
        world, n_chunks = self.world, 2 * self.world
        for r in range(world):
            chunks = [(a, b - a) for c in (r, n_chunks - 1 - r)
                      for a, b in [(c * n // n_chunks, (c + 1) * n // n_chunks)] if b > a]
            # one tile per (own chunk, chunk elsewhere) pair at most: 2 chunks x 2 world chunks
            self.work[r] += (sum(query_work(a, m, n, self.causal, self.window) for a, m in chunks)
                             + 4 * world * self.cost.tile_overhead)
            self.tokens[r] += sum(m for _, m in chunks)
        self.k += 1


class _Search:
    """Tries of ``balanced``: cut the ``k`` largest documents over every rank, place the rest whole."""

    def __init__(self, docs: list[int], lengths: list[int], whole: list[int], rest: list[int], cut: _CutLoads,
                 cost: CostModel):
        self.docs, self.lengths, self.whole, self.rest, self.cut, self.cost = docs, lengths, whole, rest, cut, cost
        self.mean_tokens = sum(lengths[d] for d in docs) / cut.world
        self.loads: dict[int, tuple[list[float], list[int]]] = {}  # k -> the cut documents' (work, tokens) per rank

    def place(self, k: int, *, stop_over: bool) -> tuple[tuple[float, float], list[int] | None]:
        """Cut ``docs[:k]`` over every rank, then place the rest whole, each on the least-loaded rank.

        A rank's load is the larger of its work and its tokens, each as a fraction of the mean. Returns
        ``((max/mean work, max/mean tokens), owner per document)``. ``stop_over``: stop as soon as a ratio is
        over its target (both only grow as documents are placed), returning the ratios so far and no owners.
        """
        while self.cut.k < k:
            self.cut.add(self.lengths[self.docs[self.cut.k]])
            self.loads[self.cut.k] = (list(self.cut.work), list(self.cut.tokens))
        docs, lengths, whole, cost = self.docs, self.lengths, self.whole, self.cost
        work, tokens = self.loads.get(k, ([0.0] * self.cut.world, [0] * self.cut.world))
        work, tokens = list(work), list(tokens)
        mean_work, mean_tokens = (sum(work) + self.rest[k]) / len(work), self.mean_tokens
        heap = [(max(work[r] / mean_work, tokens[r] / mean_tokens), r) for r in range(len(work))]
        heapq.heapify(heap)
        top_work, top_tokens = max(work), max(tokens)
        if stop_over and (top_work / mean_work > cost.target_imbalance
                          or top_tokens / mean_tokens > cost.target_token_imbalance):
            return (top_work / mean_work, top_tokens / mean_tokens), None
        owner = [0] * len(lengths)
        for d in docs[:k]:
            owner[d] = CUT
        for i in range(k, len(docs)):
            d = docs[i]
            r = heap[0][1]
            owner[d] = r
            w = work[r] = work[r] + whole[i]
            t = tokens[r] = tokens[r] + lengths[d]
            heapq.heapreplace(heap, (max(w / mean_work, t / mean_tokens), r))  # ranks differ: no ties, pops as before
            if w > top_work or t > top_tokens:
                top_work, top_tokens = max(top_work, w), max(top_tokens, t)
                if stop_over and (top_work / mean_work > cost.target_imbalance
                                  or top_tokens / mean_tokens > cost.target_token_imbalance):
                    return (top_work / mean_work, top_tokens / mean_tokens), None
        return (top_work / mean_work, top_tokens / mean_tokens), owner


# The strategies by name, in the order ``ringpack.STRATEGIES`` lists them (the default first).
STRATEGIES: dict[str, Callable[[tuple[int, ...], int, bool, tuple[int, int]], Owners]] = {
    "balanced": balanced,
    "zigzag": zigzag,
    "contiguous": contiguous,
}
