"""One rank's schedule, built from *cells*: the tiles one rank computes on one document's keys of one source.

Legend: a *layout* is one rank's segments of one document, ``((offset in the document, length), ...)`` in local
order. A rank's segments of one document are consecutive rows of its shard, so a cell is written relative to
the document: query rows from its first row on the computing rank, key rows from its first row on the source
(step 0) or from its first received row (later steps), and the source rows read from its first row there. A cell
depends on the two layouts and the mask only, so documents cut alike (every zigzag document of one length) share
one, and a step is its documents' cells shifted to where each document sits::

    rank r, step s, source r - s, documents d0 and d1 on both:
      cells   d0: tiles on query rows 0..a, keys 0..7 read from source rows 0..7 of d0
              d1: tiles on query rows 0..b, keys 0..1 read from source rows 3..4 of d1
      step    d0's tiles + (d0's first row on r, 0), d1's + (d1's first row on r, 8 = what d0 reads)
              recv_runs: d0's reads + d0's first row on the source, then d1's (merged where they touch)

A rank's steps and its sends (what the others read of it) are made per *group* of its documents (documents cut
alike: one per length under zigzag) against their holders, then shifted in bulk: a zigzag rank of a 1M-token pack
holds a part of every document, hundreds of thousands of tiles, so no loop here runs per tile or per document::

    entries   group g: (step, cell) per holder with something visible       (Python, once per group)
    pairs     document x its group's entries, ordered by step, documents in local order   (int64 columns)
    tiles     pair x its cell's tiles, shifted by the pair's rows, ordered by step and wave  -> Wave tables

Its key depth is one walk over the documents it shares and their holders, stopped once deep enough. Nothing here
needs another rank's schedule.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

from ringpack.mask import band_pairs, clipped_band
from ringpack.ownership import Documents, Layout, Owners
from ringpack.schedule import TILE_BYTES, Runs, Step, Tile, Wave, band_tile, prefix_sums, tile

_new = tuple.__new__  # a moved copy of a checked tile needs no new checks


class Cell(NamedTuple):
    """One document's tiles of one (rank, step), relative to the document (see the module docstring)."""

    tiles: tuple[Tile, ...]  # fused where exact, each trimmed
    waves: tuple[int, ...]  # the wave of each tile: first fit among these (other documents' tiles share no rows)
    reads: Runs  # source rows read (maximal runs); empty at step 0
    n_read: int


def cell(q_layout: Layout, k_layout: Layout, causal: bool, window: tuple[int, int], *, compact: bool,
         memo: dict) -> Cell | None:
    """The tiles of queries ``q_layout`` x keys ``k_layout`` of one document; None when nothing is visible.

    ``compact``: the keys come from another rank, which sends only the rows read (a tile's keys then index
    those rows, in order); at step 0 they index the local shard. The tiles follow from each segment pair's
    place and band clipped to it alone, so cells with the same ones are made once (``memo``, one per plan):
    the cells of a cut document against most ranks are one full tile alike."""
    pairs = []
    q_row = 0
    for i, (q_offset, q_len) in enumerate(q_layout):
        k_row = 0
        for k_offset, k_len in k_layout:
            visible = clipped_band(q_offset, q_len, k_offset, k_len, causal, window)
            if visible is not None:
                pairs.append((i, q_row, q_len, k_row, k_len, *visible))
            k_row += k_len
        q_row += q_len
    if not pairs:
        return None
    key = (compact, *pairs)
    found = memo.get(key)
    return found if found is not None else memo.setdefault(key, _cell(pairs, compact))


def _cell(pairs: list[tuple[int, int, int, int, int, int, int]], compact: bool) -> Cell:
    tiles = [band_tile(q_row, q_len, k_row, k_len, lo, hi) for _, q_row, q_len, k_row, k_len, lo, hi in pairs]
    segment_of = [p[0] for p in pairs]  # tiles of one query segment may overlap after trimming: waves keep them apart
    reads: list[tuple[int, int]] = []
    if compact:
        reads = _merge_runs(sorted((t.k_start, t.k_len) for t in tiles))
        at = prefix_sums(n for _, n in reads)  # where each read run lands in the buffer
        starts = [a for a, _ in reads]
        tiles = [_new(Tile, (q0, q_len, at[i] + k0 - starts[i], *rest))
                 for (q0, q_len, k0, *rest), i in ((t, bisect.bisect_right(starts, t.k_start) - 1) for t in tiles)]
    tiles, covers = _fuse_tiles(tiles, segment_of)
    return Cell(tuple(tiles), tuple(_first_fit(covers)), tuple(reads), sum(n for _, n in reads))


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (start, length) runs -> the union as disjoint, maximal runs."""
    out: list[list[int]] = []
    for start, length in runs:
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return [(a, n) for a, n in out]


def _fuse_tiles(tiles: list[Tile], segment_of: list[int]) -> tuple[list[Tile], list[frozenset[int]]]:
    """Fuse consecutive tiles of one document whose union is one band over their bounding box.

    A rank holding two zigzag chunks ``c0 c3`` of one document gets ``c0xc0``, ``c3xc0`` and ``c3xc3`` at
    step 0: together one causal square over its shard, one kernel call instead of three::

        c0xc0  .          x . . .
        c3xc0  c3xc3  ->  x x . .     (local rows c0 c3, keys c0 c3)
                          x x x .
                          x x x x

    ``tiles`` come in query-segment, then key-segment order, so only neighbours are tried. Two tiles fuse when
    the band of ``b - a`` spanning both, over their bounding box, holds exactly their pairs (tiles of one step
    never share a pair, so equal counts mean equal sets); a fused tile is again trimmed, since rows and keys
    between two that see something see something too. Returns the tiles and, for each, the query segments
    it covers.
    """
    out: list[Tile] = []
    covers: list[frozenset[int]] = []
    for t, seg in zip(tiles, segment_of):
        fused = _fuse(out[-1], t) if out else None
        if fused is None:
            out.append(t)
            covers.append(frozenset((seg,)))
        else:
            out[-1] = fused
            covers[-1] = covers[-1] | {seg}
    return out, covers


def _fuse(a: Tile, b: Tile) -> Tile | None:
    """The one band tile whose pairs are exactly those of ``a`` and ``b``, or None."""
    q0, k0 = min(a.q_start, b.q_start), min(a.k_start, b.k_start)
    q_len = max(a.q_start + a.q_len, b.q_start + b.q_len) - q0
    k_len = max(a.k_start + a.k_len, b.k_start + b.k_len) - k0
    # the band of each tile in rows of the bounding box, then the band spanning both
    lo = min(a.lo + (a.k_start - k0) - (a.q_start - q0), b.lo + (b.k_start - k0) - (b.q_start - q0))
    hi = max(a.hi + (a.k_start - k0) - (a.q_start - q0), b.hi + (b.k_start - k0) - (b.q_start - q0))
    lo, hi = max(lo, 1 - q_len), min(hi, k_len - 1)
    if band_pairs(q_len, k_len, lo, hi) != a.pairs + b.pairs:
        return None
    return tile(q0, q_len, k0, k_len, lo, hi, a.pairs + b.pairs)


def _first_fit(covers: list[frozenset[int]]) -> list[int]:
    """The wave of each tile: the first whose tiles cover none of its query segments (order kept)."""
    used: list[set[int]] = []
    out = []
    for segs in covers:
        for w, u in enumerate(used):
            if u.isdisjoint(segs):
                u.update(segs)
                out.append(w)
                break
        else:
            out.append(len(used))
            used.append(set(segs))
    return out


def deepest(spans: Iterable[tuple[int, int]]) -> int:
    """The most ``[start, stop)`` spans that share one row (0 for none)."""
    edges = sorted((pos, d) for a, b in spans for pos, d in ((a, 1), (b, -1)))
    depth = most = 0
    for _, d in edges:  # at a shared edge, ends (-1) sort before starts
        depth += d
        most = max(most, depth)
    return most


class Steps(Sequence):
    """One rank's steps, ``[step]`` as a tuple of ``world`` steps reads. Only steps with tiles are stored; an idle
    step is made when asked for, so a rank of a wide ring keeps no memory for the steps it sits out."""

    __slots__ = ("_rank", "_world", "_steps")

    def __init__(self, rank: int, world: int, steps: dict[int, Step]):
        self._rank, self._world, self._steps = rank, world, steps

    def __len__(self) -> int:
        return self._world

    def __getitem__(self, step):
        if isinstance(step, slice):
            return tuple(self[s] for s in range(self._world)[step])
        s = range(self._world)[step]  # negative indices and IndexError as a tuple has them
        found = self._steps.get(s)
        return found if found is not None else Step(source=(self._rank - s) % self._world, waves=())

    def __iter__(self) -> Iterator[Step]:
        return (self[s] for s in range(self._world))

    def __eq__(self, other) -> bool:
        return isinstance(other, (Steps, tuple)) and tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return f"Steps(rank={self._rank}, busy={sorted(self._steps)} of {self._world})"

    def computing(self) -> list[int]:
        """The steps with tiles, ascending."""
        return sorted(self._steps)


class Row(NamedTuple):
    """What one rank computes: its steps, the most waves on one query row, its visible pairs."""

    steps: Steps
    query_depth: int
    work: int


def row(owners: Owners, rank: int, documents: Documents, causal: bool, window: tuple[int, int], cells: dict) -> Row:
    """The steps of ``rank``: the cells of each group of its documents against every holder, shifted in bulk to where
    each document sits in the shard (queries, and keys at step 0) and in the step's received rows (keys later)."""
    world, doc, first, group = owners.world, *documents[:3]
    found = [_queries(owners.holders(d), rank, world, causal, window, cells) for d in documents.reps]
    times = torch.bincount(group, minlength=len(found)).tolist()
    depth = max((f[1] for f in found), default=0)
    work = sum(f[2] * n for f, n in zip(found, times))
    t = _Cells.of([f[0] for f in found], tiles=True)
    pair_doc, step, entry = t.pairs(group)  # (document, step) pairs with a cell, by step, documents in local order
    n_read = t.n_read[entry]
    received = n_read.cumsum(0) - n_read  # rows read by the pairs before, over all steps
    per_step = torch.zeros(world, dtype=torch.int64).index_add_(0, step, n_read)
    k_shift = torch.where(step == 0, first[pair_doc], received - (per_step.cumsum(0) - per_step)[step])
    waves = _waves(t, entry, step, first[pair_doc], k_shift)
    # received rows: each pair's reads, at its document's first row on the source
    remote = step > 0
    sources = torch.unique_consecutive(step[remote], return_counts=True)
    rows = [owners.first_rows((rank - s) % world, d)
            for s, d in zip(sources[0].tolist(), doc[pair_doc[remote]].split(sources[1].tolist()))]
    at = torch.zeros_like(step)
    at[remote] = torch.cat(rows) if rows else at[:0]
    received_runs = _runs(t, entry, step, at)
    steps = {s: Step(source=(rank - s) % world, waves=tuple(w), recv_runs=received_runs.get(s, ()))
             for s, w in waves.items()}
    return Row(Steps(rank, world, steps), depth, work)


def _queries(holders, rank: int, world: int, causal: bool, window: tuple[int, int], memo: dict):
    """``rank``'s cells of one document against each holder (with the step it is at), the most tiles on one of its
    rows, their pairs."""
    layout = dict(holders)[rank]
    cells = [((rank - source) % world, c) for source, k_layout in holders
             for c in [cell(layout, k_layout, causal, window, compact=source != rank, memo=memo)] if c is not None]
    tiles = [t for _, c in cells for t in c.tiles]
    return cells, deepest((t.q_start, t.q_start + t.q_len) for t in tiles), sum(t.pairs for t in tiles)


def sends(owners: Owners, rank: int, documents: Documents, causal: bool, window: tuple[int, int],
          cells: dict) -> dict[int, Runs]:
    """The rows of ``rank``'s shard it sends at each step (to rank + step): what each other holder of each document
    it shares reads of it, in local order, per group of documents and then shifted in bulk."""
    world, per_group = owners.world, []
    for d in documents.reps:
        holders = owners.holders(d)
        layout = dict(holders)[rank]
        per_group.append([((target - rank) % world, c) for target, q_layout in holders if target != rank
                          for c in [cell(q_layout, layout, causal, window, compact=True, memo=cells)] if c is not None])
    t = _Cells.of(per_group, tiles=False)
    pair_doc, step, entry = t.pairs(documents.group)
    return dict(sorted(_runs(t, entry, step, documents.first[pair_doc]).items()))


class _Cells(NamedTuple):
    """The cells of every group of a rank's documents as int64 tables: per group its *entries* (a cell at a step,
    ``start`` and ``count`` into the entry columns), per entry where its tiles and reads are in ``tiles``/``reads``.
    A cell met twice (groups share them) is stored once."""

    start: torch.Tensor  # [G]
    count: torch.Tensor  # [G]
    step: torch.Tensor  # [E]
    n_read: torch.Tensor  # [E]
    tile_start: torch.Tensor  # [E]
    tile_count: torch.Tensor  # [E]
    read_start: torch.Tensor  # [E]
    read_count: torch.Tensor  # [E]
    tiles: torch.Tensor  # [n, 9] tiles in ``Tile`` field order, relative to the document
    wave: torch.Tensor  # [n] the wave of each
    reads: torch.Tensor  # [m, 2] (source row, length), relative to the document

    @classmethod
    def of(cls, per_group: list[list[tuple[int, Cell]]], *, tiles: bool) -> _Cells:
        """``per_group``: each group's (step, cell) entries; ``tiles=False`` keeps the reads only."""
        start, count, entries, tile_rows, waves, reads, placed = [], [], [], [], [], [], {}
        for found in per_group:
            start.append(len(entries) // 6)
            count.append(len(found))
            for s, c in found:
                at = placed.get(id(c))
                if at is None:
                    at = placed[id(c)] = (c.n_read, len(tile_rows), len(c.tiles) if tiles else 0, len(reads),
                                          len(c.reads))
                    if tiles:
                        tile_rows.extend(c.tiles)
                        waves.extend(c.waves)
                    reads.extend(c.reads)
                entries.append(s)
                entries.extend(at)
        return cls(_int64(start), _int64(count), *_int64(entries).view(-1, 6).unbind(1),
                   _int64(tile_rows).view(-1, len(Tile._fields)), _int64(waves), _int64(reads).view(-1, 2))

    def pairs(self, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(document, step, entry)`` of every document (its index in ``group``) and entry of its group, by step
        and, within a step, in document order."""
        pair_doc, entry = _expand(self.start[group], self.count[group])
        step, order = torch.sort(self.step[entry], stable=True)
        return pair_doc[order], step, entry[order]


def _int64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _expand(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges ``[starts[i], starts[i] + counts[i])`` end to end: for each element, its range ``i`` and its value."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return owner, torch.arange(len(owner)) + (starts - (counts.cumsum(0) - counts))[owner]


def _waves(t: _Cells, entry: torch.Tensor, step: torch.Tensor, q_shift: torch.Tensor,
           k_shift: torch.Tensor) -> dict[int, list[Wave]]:
    """The waves of each step with tiles: the pairs' tiles shifted, a tile to its cell's wave (of its step), the
    tiles of a wave in pair order, i.e. document order, as one ``Wave.table`` each."""
    pair, tmpl = _expand(t.tile_start[entry], t.tile_count[entry])
    if not len(pair):
        return {}
    n_waves = int(t.wave.max()) + 1
    key, order = torch.sort(step[pair] * n_waves + t.wave[tmpl], stable=True)
    pair, tmpl = pair[order], tmpl[order]
    table = bytearray(len(pair) * TILE_BYTES)
    rows = torch.frombuffer(table, dtype=torch.int64).view(len(pair), len(Tile._fields))  # written in place: no copy
    torch.index_select(t.tiles, 0, tmpl, out=rows)
    rows[:, 0] += q_shift[pair]
    rows[:, 2] += k_shift[pair]
    keys, sizes = torch.unique_consecutive(key, return_counts=True)
    wave_of = torch.repeat_interleave(torch.arange(len(keys)), sizes)
    hulls = [torch.empty(len(keys), dtype=torch.int64).scatter_reduce_(0, wave_of, x, how, include_self=False)
             for x, how in ((rows[:, 0], "amin"), (rows[:, 0] + rows[:, 1], "amax"),
                            (rows[:, 2], "amin"), (rows[:, 2] + rows[:, 3], "amax"))]
    view, out, at = memoryview(table), {}, 0
    for key, size, q0, q1, k0, k1 in zip(keys.tolist(), sizes.tolist(), *(h.tolist() for h in hulls)):
        out.setdefault(key // n_waves, []).append(Wave(bytes(view[at:at + size * TILE_BYTES]), (q0, q1), (k0, k1)))
        at += size * TILE_BYTES
    return out


def _runs(t: _Cells, entry: torch.Tensor, step: torch.Tensor, shift: torch.Tensor) -> dict[int, Runs]:
    """The pairs' reads (of source rows), each pair's shifted by ``shift``, per step in pair order, merged where one
    ends where the next begins."""
    pair, read = _expand(t.read_start[entry], t.read_count[entry])
    if not len(pair):
        return {}
    step = step[pair]
    starts, lengths = t.reads[read, 0] + shift[pair], t.reads[read, 1]
    new = torch.ones_like(step, dtype=torch.bool)  # a run that does not continue the one before
    new[1:] = (step[1:] != step[:-1]) | (starts[:-1] + lengths[:-1] != starts[1:])
    merged = torch.zeros(int(new.sum()), dtype=torch.int64).index_add_(0, new.cumsum(0) - 1, lengths)
    steps, counts = torch.unique_consecutive(step[new], return_counts=True)
    starts, lengths, out, at = starts[new].tolist(), merged.tolist(), {}, 0
    for s, n in zip(steps.tolist(), counts.tolist()):
        out[s] = tuple(zip(starts[at:at + n], lengths[at:at + n]))
        at += n
    return out


def key_depth(owners: Owners, rank: int, causal: bool, window: tuple[int, int], cells: dict,
              cap: int | None = None) -> int:
    """The most tiles (of every rank and step) reading one key row of the documents ``rank`` shares; with ``cap``,
    ``min(cap, that)``, walking the documents, and each one's holders, only until ``cap`` is reached."""
    depth = 0
    for _, found in _shared(owners, rank, lambda holders, layout: _doc_key_depth(holders, rank, layout, causal,
                                                                              window, cells, cap)):
        depth = max(depth, found)
        if cap is not None and depth >= cap:
            return cap
    return depth


def _shared(owners: Owners, rank: int, of):
    """``(document, of(holders, rank's layout))`` per document ``rank`` shares, in local order, ``of`` made once
    per pattern of documents."""
    memo: dict[tuple, object] = {}
    for doc, layout in owners.shared(rank):
        key = owners.pattern(doc)
        found = memo.get(key, memo) if key is not None else memo
        if found is memo:
            found = of(owners.holders(doc), layout)
            if key is not None:
                memo[key] = found
        yield doc, found


def _doc_key_depth(holders, rank: int, layout: Layout, causal: bool, window: tuple[int, int], memo: dict,
                   cap: int | None) -> int:
    """The most tiles reading one row of ``rank``'s part of a document (``min(cap, ...)``: counted after 1, 2, 4...
    holders, stopping once it is reached).

    Tiles of one wave may read the same keys (their query rows are disjoint, not their keys), so tiles are counted,
    not waves. A received tile's keys index the rows read: ``reads`` maps them back::

        reads (40, 8), (4, 2): buffer rows 0..7 are rows 40..47, buffer rows 8..9 are 4..5
    """
    spans: list[tuple[int, int]] = []
    check = 1
    for i, (target, q_layout) in enumerate(holders, 1):
        c = cell(q_layout, layout, causal, window, compact=target != rank, memo=memo)
        if c is not None:
            spans.extend(_key_spans(c, target == rank))
        if cap is not None and (i == check or i == len(holders)):
            if deepest(spans) >= cap:
                return cap
            check *= 2
    return deepest(spans)


def _key_spans(c: Cell, local: bool) -> list[tuple[int, int]]:
    """The key rows each tile of ``c`` reads, as rows of the source's part of the document."""
    if local:
        return [(t.k_start, t.k_start + t.k_len) for t in c.tiles]
    out = []
    at = prefix_sums(n for _, n in c.reads)
    for t in c.tiles:
        a, b = t.k_start, t.k_start + t.k_len
        i = bisect.bisect_right(at, a) - 1
        while i < len(c.reads) and at[i] < b:
            start = c.reads[i][0]
            out.append((start + max(a, at[i]) - at[i], start + min(b, at[i + 1]) - at[i]))
            i += 1
    return out
