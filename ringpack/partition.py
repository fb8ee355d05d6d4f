"""Partition strategies: which global tokens each rank owns, as an :class:`Owners` (``Chunked`` or ``Contiguous``).

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

Ownership is kept per document (whole on one rank, or cut), never as ``ranks x documents`` runs: a plan
asks for one rank's segments or one document's holders, and a zigzag pack of 100k documents over 64 ranks
would otherwise cost millions of runs before any rank needs one.
"""

from __future__ import annotations

import bisect
import functools
import heapq
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ringpack.mask import band, band_pairs

CUT = -1  # ``Chunked.owner`` of a document cut into ``2 * world`` chunks over every rank
Layout = tuple[tuple[int, int], ...]  # one rank's segments of one document: (offset in the document, length), in order


@dataclass(frozen=True)
class CostModel:
    """Work of a rank in units of one visible (query, key) pair."""

    tile_overhead: int = 16384  # fixed cost of one tile (a kernel call, a partly filled block)
    target_imbalance: float = 1.02  # ``balanced`` stops cutting documents once max/mean work is below this
    target_token_imbalance: float = 1.02  # ... and max/mean tokens too


COST = CostModel()


class Chunked:
    """Documents either whole on one rank or cut into ``2 * world`` near-equal chunks, rank ``r`` owning chunks
    ``r`` and ``2*world-1-r``; a rank lays out its documents in global order (``order``: rank 0's, one rank).

    Chunk ``c`` of a document of length ``L`` is ``[c*L // (2*world), (c+1)*L // (2*world))``: any length works,
    chunks may differ by one token or be empty, nothing is padded. A cut document's layout on every rank depends
    on its length only, so it is worked out once per length.
    """

    def __init__(self, cu: tuple[int, ...], world: int, owner: tuple[int, ...] | None = None,
                 order: tuple[int, ...] | None = None):
        self.cu, self.world = cu, world
        self.owner = owner  # per document: its rank, or CUT; None: every document cut (zigzag)
        self.order = order
        self.key = (owner, order)
        self._layouts: dict[int, tuple[tuple[tuple[int, Layout], ...], dict[int, Layout]]] = {}

    def _chunks(self, length: int) -> tuple[tuple[tuple[int, Layout], ...], dict[int, Layout]]:
        """Every rank holding a chunk of a cut document of ``length`` tokens, with its layout (ranks ascending)."""
        found = self._layouts.get(length)
        if found is None:
            n, pieces = 2 * self.world, {}
            # with fewer tokens than chunks, chunk c holds token t iff c == ceil((t+1) n / L) - 1: visit those only
            chunks = range(n) if length >= n else ((((t + 1) * n + length - 1) // length - 1) for t in range(length))
            for c in chunks:
                a, b = c * length // n, (c + 1) * length // n
                if b > a:
                    rank = c if c < self.world else n - 1 - c
                    got = pieces.setdefault(rank, [])
                    if got and got[-1][0] + got[-1][1] == a:  # touching chunks of one rank are one segment
                        got[-1] = (got[-1][0], got[-1][1] + b - a)
                    else:
                        got.append((a, b - a))
            layouts = {r: tuple(p) for r, p in sorted(pieces.items())}
            found = self._layouts.setdefault(length, (tuple(layouts.items()), layouts))
        return found

    def _is_cut(self, doc: int) -> bool:
        return self.owner is None or self.owner[doc] == CUT

    def segments(self, rank: int) -> list[tuple[int, int, int]]:
        """``rank``'s segments in local order: (document, offset in it, length)."""
        cu, out = self.cu, []
        if self.order is not None:
            docs = self.order
        elif self.owner is None:
            docs = range(len(cu) - 1)
        else:
            lengths, owner = self._tensors
            docs = sorted(((owner == rank) & (lengths > 0)).nonzero().flatten().tolist() + self._cut)
        for d in docs:
            length = cu[d + 1] - cu[d]
            if not length:
                continue
            layout = self._chunks(length)[1].get(rank, ()) if self._is_cut(d) else ((0, length),)
            out.extend((d, a, n) for a, n in layout)
        return out

    def shared(self, rank: int) -> Iterator[tuple[int, Layout]]:
        """``rank``'s documents that other ranks hold parts of too, in local order, with its layout of each."""
        cu = self.cu
        for d in range(len(cu) - 1) if self.owner is None else self._cut:
            length = cu[d + 1] - cu[d]
            if length:
                holders, layouts = self._chunks(length)
                if len(holders) > 1 and rank in layouts:
                    yield d, layouts[rank]

    def holders(self, doc: int) -> tuple[tuple[int, Layout], ...]:
        """Every rank holding a part of ``doc``, with its layout, ranks ascending."""
        length = self.cu[doc + 1] - self.cu[doc]
        return self._chunks(length)[0] if self._is_cut(doc) else ((self.owner[doc], ((0, length),)),)

    def pattern(self, doc: int) -> tuple:
        """Documents of one pattern have the same holders and layouts (what a rank computes of them is the same)."""
        return ("cut" if self._is_cut(doc) else "whole", self.cu[doc + 1] - self.cu[doc])

    def first_rows(self, rank: int, docs: list[int]) -> list[int]:
        """The row of ``rank``'s shard where its first token of each cut document in ``docs`` sits."""
        if not docs:
            return []
        index = docs if self.owner is None else [self._cut_index[d] for d in docs]
        rows = self._chunk_tokens(rank, self._cut_lengths).cumsum(0)
        index = torch.tensor(index)
        rows = torch.cat([rows.new_zeros(1), rows])[index]
        if self.owner is not None:  # and the whole documents before them
            rows += self._whole_before[rank, index]
        return rows.tolist()

    def num_tokens(self) -> tuple[int, ...]:
        counts = Counter(self.cu[d + 1] - self.cu[d] for d in self._cut)
        per_rank = [0] * self.world
        if counts:
            lengths, times = (torch.tensor(x, dtype=torch.int64) for x in zip(*counts.items()))
            per_rank = (self._chunk_tokens(torch.arange(self.world)[:, None], lengths[None]) * times).sum(1).tolist()
        if self.owner is not None:
            per_rank = [x + y for x, y in zip(per_rank, self._whole_before[:, -1].tolist())]
        return tuple(per_rank)

    def _chunk_tokens(self, rank, lengths: torch.Tensor) -> torch.Tensor:
        """Tokens of chunks ``rank`` and ``2*world-1-rank`` of documents of ``lengths``."""
        n = 2 * self.world
        return ((rank + 1) * lengths // n - rank * lengths // n + (n - rank) * lengths // n
                - (n - 1 - rank) * lengths // n)

    @functools.cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every document's length and owner (CUT when cut), int64."""
        cu = torch.tensor(self.cu, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
        owner = torch.full_like(lengths, CUT) if self.owner is None else torch.tensor(self.owner, dtype=torch.int64)
        return lengths, owner

    @functools.cached_property
    def _cut(self) -> list[int]:
        if self.owner is None:
            return list(range(len(self.cu) - 1))
        return (self._tensors[1] == CUT).nonzero().flatten().tolist()

    @functools.cached_property
    def _cut_index(self) -> dict[int, int]:
        return {d: i for i, d in enumerate(self._cut)}

    @functools.cached_property
    def _cut_lengths(self) -> torch.Tensor:
        lengths, owner = self._tensors
        return lengths[owner == CUT]

    @functools.cached_property
    def _whole_before(self) -> torch.Tensor:
        """``[rank, j]``: tokens of the rank's whole documents before cut document ``j`` (``j = k``: all of them)."""
        lengths, owner = self._tensors
        whole = (owner != CUT).nonzero().flatten()
        k = len(self._cut)
        before = torch.searchsorted(torch.tensor(self._cut, dtype=torch.int64), whole)  # cut documents before each
        table = torch.zeros(self.world * (k + 1), dtype=torch.int64)
        table.index_add_(0, owner[whole] * (k + 1) + before, lengths[whole])
        return table.view(self.world, k + 1).cumsum(1)


class Contiguous:
    """The packed stream cut into ``world`` near-equal token ranges; documents are cut where they fall."""

    def __init__(self, cu: tuple[int, ...], world: int):
        self.cu, self.world = cu, world
        self.bounds = [r * cu[-1] // world for r in range(world + 1)]
        self.key = ()

    def segments(self, rank: int) -> list[tuple[int, int, int]]:
        cu, lo, hi = self.cu, self.bounds[rank], self.bounds[rank + 1]
        out = []
        d = bisect.bisect_right(cu, lo) - 1
        while lo < hi:
            end = min(hi, cu[d + 1])
            if end > lo:
                out.append((d, lo - cu[d], end - lo))
            lo, d = end, d + 1
        return out

    def shared(self, rank: int) -> Iterator[tuple[int, Layout]]:
        """``rank``'s documents that other ranks hold parts of too (at most its first and its last)."""
        cu, lo, hi = self.cu, self.bounds[rank], self.bounds[rank + 1]
        if lo == hi:
            return
        first, last = (bisect.bisect_right(cu, x) - 1 for x in (lo, hi - 1))
        for d in dict.fromkeys((first, last)):
            if self._span(d)[0] != self._span(d)[1]:
                start = max(cu[d], lo)
                yield d, ((start - cu[d], min(cu[d + 1], hi) - start),)

    def _span(self, doc: int) -> tuple[int, int]:
        """The first and last rank holding tokens of a non-empty ``doc``."""
        return (bisect.bisect_right(self.bounds, self.cu[doc]) - 1,
                bisect.bisect_right(self.bounds, self.cu[doc + 1] - 1) - 1)

    def holders(self, doc: int) -> tuple[tuple[int, Layout], ...]:
        start, stop = self.cu[doc], self.cu[doc + 1]
        first, last = self._span(doc)
        return tuple((r, ((a - start, b - a),)) for r in range(first, last + 1)
                     for a, b in [(max(start, self.bounds[r]), min(stop, self.bounds[r + 1]))] if b > a)

    def pattern(self, doc: int) -> tuple | None:
        first, last = self._span(doc)
        return ("whole", self.cu[doc + 1] - self.cu[doc]) if first == last else None

    def first_rows(self, rank: int, docs: list[int]) -> list[int]:
        return [max(self.cu[d], self.bounds[rank]) - self.bounds[rank] for d in docs]

    def num_tokens(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))


Owners = Chunked | Contiguous


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
