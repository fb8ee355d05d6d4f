"""Who owns which token: per document, whole on one rank or cut over several, and each rank's local order.

Legend: a *layout* is one rank's segments of one document, ``(offset in the document, length)`` in order.
Three forms: ``Chunked`` (whole documents, or documents cut into ``2 * world`` zigzag chunks: ``zigzag``,
``balanced``), ``Contiguous`` (the stream cut into ``world`` ranges) and ``Refined`` (another form's ownership over
documents cut further). Ownership is kept per document, never as ``ranks x documents`` runs: a plan asks for one
rank's segments or one document's holders, and a zigzag pack of 100k documents over 64 ranks would otherwise cost
millions of runs before any rank needs one.
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import torch

CUT = -1  # ``Chunked.owner`` of a document cut into ``2 * world`` chunks over every rank
Layout = tuple[tuple[int, int], ...]  # one rank's segments of one document: (offset in the document, length), in order


def stream_segments(cu, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Tokens ``[lo, hi)`` of the packed stream as (document, offset in it, length), in order, over boundaries
    ``cu``; empty documents give nothing."""
    out = []
    d = bisect.bisect_right(cu, lo) - 1
    while lo < hi:
        end = min(hi, cu[d + 1])
        if end > lo:
            out.append((d, lo - cu[d], end - lo))
        lo, d = end, d + 1
    return out


class Documents(NamedTuple):
    """One rank's documents in local order, as int64 columns. Documents of one *group* are cut alike (the same
    holders with the same layouts), so what a rank computes of them is the same but for where each sits."""

    doc: torch.Tensor  # [D] the document
    first: torch.Tensor  # [D] the row of the rank's shard where its first token of it sits
    group: torch.Tensor  # [D] its group: an index into ``reps``
    reps: list[int]  # one document of each group


def documents_of(owners, segments: list[tuple[int, int, int]]) -> Documents:
    """``Documents`` from a rank's segments in local order (a rank's segments of one document are consecutive);
    ``owners.pattern`` groups them, and a document it gives no pattern is a group of its own."""
    docs, first, group, reps, groups = [], [], [], [], {}
    row = 0
    for doc, _, length in segments:
        if not docs or docs[-1] != doc:
            key = owners.pattern(doc)
            g = groups.setdefault(("doc", doc) if key is None else key, len(groups))
            if g == len(reps):
                reps.append(doc)
            docs.append(doc)
            first.append(row)
            group.append(g)
        row += length
    return Documents(*(torch.tensor(x, dtype=torch.int64) for x in (docs, first, group)), reps)


class Chunked:
    """Documents either whole on one rank or cut into ``2 * world`` near-equal chunks, rank ``r`` owning chunks
    ``r`` and ``2*world-1-r``. A rank lays out its cut documents first, then its whole ones, each in global order
    (``order``: rank 0's, one rank)::

        pack   A(cut) b c D(cut) e        rank 0 of 2: chunks of A, of D, then its whole b, e
        rank 0 rows   A0 A3 D0 D3 b e     only cut documents have tiles at a step past 0: their query rows
                                          lie within the shard's leading rows (a short hull for the step's
                                          kernel calls and merges), and so do the rows a source sends

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
            docs = self._cut + ((owner == rank) & (lengths > 0)).nonzero().flatten().tolist()
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

    def documents(self, rank: int) -> Documents:
        """``rank``'s documents, grouped by length and by whether they are cut, with no loop over them."""
        lengths, owner = self._tensors
        cut = owner == CUT
        tokens = torch.where(cut, self._chunk_tokens(rank, lengths), torch.where(owner == rank, lengths, 0))
        if self.order is None:
            docs = (tokens > 0).nonzero().flatten()
            docs = torch.cat([docs[cut[docs]], docs[~cut[docs]]])  # cut ones first (the local order)
        else:
            docs = torch.tensor(self.order, dtype=torch.int64)
        tokens = tokens[docs]
        keys, group = torch.unique(lengths[docs] * 2 + cut[docs], return_inverse=True)
        first_of_group = torch.full_like(keys, len(docs)).scatter_reduce_(0, group, torch.arange(len(docs)), "amin")
        return Documents(docs, tokens.cumsum(0) - tokens, group, docs[first_of_group].tolist())

    def first_rows(self, rank: int, docs: torch.Tensor) -> torch.Tensor:
        """The row of ``rank``'s shard where its first token of each cut document in ``docs`` sits."""
        if not len(docs):
            return docs
        index = docs if self.owner is None else self._cut_index[docs]
        lengths, inverse = self._cut_length_classes
        tokens = self._chunk_tokens(rank, lengths)[inverse]  # one rank's tokens per length, then per document
        return torch.cat([tokens.new_zeros(1), tokens.cumsum(0)])[index]  # cut documents come first

    def num_tokens(self) -> tuple[int, ...]:
        counts = Counter(self.cu[d + 1] - self.cu[d] for d in self._cut)
        per_rank = [0] * self.world
        if counts:
            lengths, times = (torch.tensor(x, dtype=torch.int64) for x in zip(*counts.items()))
            per_rank = (self._chunk_tokens(torch.arange(self.world)[:, None], lengths[None]) * times).sum(1).tolist()
        if self.owner is not None:
            lengths, owner = self._tensors
            whole = owner != CUT
            per_rank = [x + y for x, y in zip(per_rank, torch.zeros(self.world, dtype=torch.int64).index_add_(
                0, owner[whole], lengths[whole]).tolist())]
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
    def _cut_index(self) -> torch.Tensor:
        """Per document, its index among the cut ones (-1 for a whole one)."""
        index = torch.full((len(self.cu) - 1,), -1, dtype=torch.int64)
        index[self._cut] = torch.arange(len(self._cut))
        return index

    @functools.cached_property
    def _cut_length_classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct lengths of the cut documents and, per cut document, which one is its length: a rank's
        tokens of every cut document are worked out per length (there are far fewer lengths than documents)."""
        lengths, owner = self._tensors
        return torch.unique(lengths[owner == CUT], return_inverse=True)


class Contiguous:
    """The packed stream cut into ``world`` near-equal token ranges; documents are cut where they fall."""

    def __init__(self, cu: tuple[int, ...], world: int):
        self.cu, self.world = cu, world
        self.bounds = [r * cu[-1] // world for r in range(world + 1)]
        self.key = ()

    def segments(self, rank: int) -> list[tuple[int, int, int]]:
        return stream_segments(self.cu, self.bounds[rank], self.bounds[rank + 1])

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

    def documents(self, rank: int) -> Documents:
        return documents_of(self, self.segments(rank))

    def first_rows(self, rank: int, docs: torch.Tensor) -> torch.Tensor:
        return torch.tensor([max(self.cu[d], self.bounds[rank]) - self.bounds[rank] for d in docs.tolist()],
                            dtype=torch.int64)

    def num_tokens(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))


class Refined:
    """The token ownership of ``base`` over finer document boundaries ``cu`` (every boundary of ``base.cu`` is one of
    ``cu``'s): the same tokens on the same ranks in the same local order, documents cut at more places (chunked
    attention cuts every document at its chunk boundaries and keeps the hidden states' sharding)."""

    def __init__(self, base: Chunked | Contiguous, cu: tuple[int, ...]):
        self.cu, self.world, self.base = cu, base.world, base
        self.key = ("refined", base.key)
        self._segments: dict[int, list[tuple[int, int, int]]] = {}

    def segments(self, rank: int) -> list[tuple[int, int, int]]:
        """``rank``'s segments in local order: the base's, cut at every boundary of ``cu``."""
        if rank not in self._segments:
            self._segments[rank] = self._cut(rank)
        return self._segments[rank]

    def _cut(self, rank: int) -> list[tuple[int, int, int]]:
        base_cu = self.base.cu
        return [piece for doc, offset, length in self.base.segments(rank)
                for piece in stream_segments(self.cu, base_cu[doc] + offset, base_cu[doc] + offset + length)]

    @functools.cached_property
    def _by_doc(self) -> tuple[dict[int, dict[int, Layout]], list[dict[int, int]]]:
        """Per document its holders' layouts; per rank the row of its first token of each document."""
        holders: dict[int, dict[int, list[tuple[int, int]]]] = {}
        first: list[dict[int, int]] = []
        for rank in range(self.world):
            rows, row = {}, 0
            for doc, offset, length in self.segments(rank):
                rows.setdefault(doc, row)
                holders.setdefault(doc, {}).setdefault(rank, []).append((offset, length))
                row += length
            first.append(rows)
        return {d: {r: tuple(x) for r, x in sorted(h.items())} for d, h in holders.items()}, first

    def shared(self, rank: int) -> Iterator[tuple[int, Layout]]:
        holders = self._by_doc[0]
        for doc in dict.fromkeys(d for d, _, _ in self.segments(rank)):
            if len(holders[doc]) > 1:
                yield doc, holders[doc][rank]

    def holders(self, doc: int) -> tuple[tuple[int, Layout], ...]:
        return tuple(self._by_doc[0].get(doc, {}).items())

    def pattern(self, doc: int) -> tuple | None:
        return ("whole", self.cu[doc + 1] - self.cu[doc]) if len(self.holders(doc)) == 1 else None

    def documents(self, rank: int) -> Documents:
        return documents_of(self, self.segments(rank))

    def first_rows(self, rank: int, docs: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._by_doc[1][rank][d] for d in docs.tolist()], dtype=torch.int64)

    def num_tokens(self) -> tuple[int, ...]:
        return self.base.num_tokens()


Owners = Chunked | Contiguous | Refined
