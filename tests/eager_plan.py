"""The planner as it was before plans became lazy (ringpack 4fdb32d): every rank and every step built at once,
the obvious way, from the strategies' token runs. The tests compare every lazily built plan with it: the same
ownership, the same tiles in the same waves, the same rows sent, the same depths.

Copied, not imported, so that it stays the yardstick whatever the package does next.
"""

import bisect
import heapq
from types import SimpleNamespace

from ringpack.mask import band, band_pairs
from ringpack.partition import COST
from ringpack.plan import Segment
from ringpack.schedule import Step, Tile, Wave, band_tile, prefix_sums, tile

Runs = list[list[tuple[int, int]]]

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


def balanced(cu: tuple[int, ...], world: int, causal: bool, window: tuple[int, int], cost=COST) -> Runs:
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
    # a rank's cut documents first, then its whole ones, each in global order
    cut_runs: Runs = [[] for _ in range(world)]
    whole_runs: Runs = [[] for _ in range(world)]
    for d, n in enumerate(lengths):
        if d in cut:
            for r in range(world):
                cut_runs[r].extend(_zigzag_chunks(cu[d], n, world, r))
        elif n:
            whole_runs[owner[d]].append((cu[d], n))
    return [sorted(c) + w for c, w in zip(cut_runs, whole_runs)]


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


STRATEGIES = {"balanced": balanced, "zigzag": zigzag, "contiguous": contiguous}


def _deepest(spans: list[tuple[int, int]]) -> int:
    """The most ``[start, stop)`` spans that share one row (0 for none)."""
    edges = sorted((pos, d) for a, b in spans for pos, d in ((a, 1), (b, -1)))
    depth = deepest = 0
    for _, d in edges:  # at a shared edge, ends (-1) sort before starts
        depth += d
        deepest = max(deepest, depth)
    return deepest


def _segments(cu: tuple[int, ...], runs: list[tuple[int, int]]) -> tuple[Segment, ...]:
    """Cut a rank's global token runs at document boundaries; merge pieces that touch."""
    segs: list[Segment] = []
    local = 0
    for start, length in runs:
        pos, stop = start, start + length
        while pos < stop:
            doc = bisect.bisect_right(cu, pos) - 1
            end = min(stop, cu[doc + 1])
            last = segs[-1] if segs else None
            if last is not None and last.doc == doc and last.start + last.length == pos:
                segs[-1] = Segment(doc, last.doc_offset, last.start, last.length + end - pos, last.local_start)
            else:
                segs.append(Segment(doc, pos - cu[doc], pos, end - pos, local))
            local += end - pos
            pos = end
    return tuple(segs)


def _index_by_doc(segs: tuple[Segment, ...]) -> dict[int, list[Segment]]:
    out: dict[int, list[Segment]] = {}
    for s in segs:
        out.setdefault(s.doc, []).append(s)
    return out


def _step(q_segs: tuple[Segment, ...], k_by_doc: dict[int, list[Segment]], source: int, causal: bool,
          window: tuple[int, int], *, compact: bool) -> Step:
    tiles, segment_of, doc_of = [], [], []  # tiles of one query segment may overlap after trimming: waves
    for qs in q_segs:                           # keep them apart
        for ks in k_by_doc.get(qs.doc, ()):
            t = band_tile(qs.local_start, qs.length, ks.local_start, ks.length,
                          *band(qs.doc_offset, ks.doc_offset, causal, window))
            if t is not None:
                tiles.append(t)
                segment_of.append(qs.local_start)
                doc_of.append(qs.doc)
    if not compact:
        return Step(source=source, waves=_waves(*_fuse_tiles(tiles, segment_of, doc_of)))
    runs = _merge_runs(sorted((t.k_start, t.k_len) for t in tiles))
    offsets = prefix_sums(n for _, n in runs)  # where each received run starts in the buffer
    starts = [start for start, _ in runs]

    def moved(t: Tile) -> Tile:
        i = bisect.bisect_right(starts, t.k_start) - 1
        return t._replace(k_start=offsets[i] + t.k_start - starts[i])

    return Step(source=source, waves=_waves(*_fuse_tiles([moved(t) for t in tiles], segment_of, doc_of)),
                recv_runs=tuple(runs))


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (start, length) runs -> the union as disjoint, maximal runs."""
    out: list[list[int]] = []
    for start, length in runs:
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return [(a, n) for a, n in out]


def _fuse_tiles(tiles: list[Tile], segment_of: list[int],
                doc_of: list[int]) -> tuple[list[Tile], list[frozenset[int]]]:
    """Fuse consecutive tiles of one document whose union is one band over their bounding box.

    A rank holding two zigzag chunks ``c0 c3`` of one document gets ``c0xc0``, ``c3xc0`` and ``c3xc3`` at
    step 0: together one causal square over its shard, one kernel call instead of three::

        c0xc0  .          x . . .
        c3xc0  c3xc3  ->  x x . .     (local rows c0 c3, keys c0 c3)
                          x x x .
                          x x x x

    ``tiles`` come in query-segment, then key-segment order, and the segments of one document are
    adjacent in a shard, so only neighbours are tried. Two tiles fuse when the band of ``b - a`` spanning
    both, over their bounding box, holds exactly their pairs (tiles of one step never share a pair, so
    equal counts mean equal sets); a fused tile is again trimmed, since rows and keys between two that
    see something see something too. Returns the tiles and, for each, the query segments it covers.
    """
    out: list[Tile] = []
    covers: list[frozenset[int]] = []
    last_doc = None
    for t, seg, doc in zip(tiles, segment_of, doc_of):
        fused = _fuse(out[-1], t) if doc == last_doc else None
        if fused is None:
            out.append(t)
            covers.append(frozenset((seg,)))
        else:
            out[-1] = fused
            covers[-1] = covers[-1] | {seg}
        last_doc = doc
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


def _waves(tiles: list[Tile], segment_of: list[frozenset[int]]) -> tuple[Wave, ...]:
    """Group tiles so that no two tiles of one wave cover the same query segment (first fit, order kept)."""
    groups: list[list[Tile]] = []
    used: list[set[int]] = []
    for t, segs in zip(tiles, segment_of):
        for g, u in zip(groups, used):
            if u.isdisjoint(segs):
                g.append(t)
                u.update(segs)
                break
        else:
            groups.append([t])
            used.append(set(segs))
    return tuple(Wave.of(tuple(g)) for g in groups)




def make_plan(cu: tuple[int, ...], world_size: int, strategy: str, causal: bool, window: tuple[int, int],
              runs: Runs | None = None) -> SimpleNamespace:
    """Everything of every rank, eagerly, as the old ``Plan`` had it (``runs``: another plan's ownership)."""
    if runs is None:
        runs = STRATEGIES[strategy](cu, world_size, causal, window)
    segments = tuple(_segments(cu, rank_runs) for rank_runs in runs)
    by_doc = [_index_by_doc(segs) for segs in segments]
    holders: dict[int, int] = {}
    for segs in by_doc:
        for doc in segs:
            holders[doc] = holders.get(doc, 0) + 1
    shared = [tuple(sg for sg in segs if holders[sg.doc] > 1) for segs in segments]
    steps = tuple(
        tuple(_step(segments[r] if s == 0 else shared[r], by_doc[(r - s) % world_size], (r - s) % world_size,
                    causal, window, compact=s > 0)
              for s in range(world_size))
        for r in range(world_size))
    world = world_size

    def send_runs(rank, step):
        return () if step == 0 else steps[(rank + step) % world][step].recv_runs

    spans: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for rank_steps in steps:
        for s, step in enumerate(rank_steps):
            at = prefix_sums(n for _, n in step.recv_runs)
            for t in step.tiles:
                a, b = t.k_start, t.k_start + t.k_len
                if s == 0:
                    spans[step.source].append((a, b))
                    continue
                i = bisect.bisect_right(at, a) - 1
                while i < len(step.recv_runs) and at[i] < b:
                    row = step.recv_runs[i][0]
                    spans[step.source].append((row + max(a, at[i]) - at[i], row + min(b, at[i + 1]) - at[i]))
                    i += 1
    return SimpleNamespace(
        ranges=ranges(cu, runs), segments=segments, steps=steps, send_runs=send_runs,
        busy=tuple(tuple(s for s in range(world) if s == 0 or steps[r][s].waves or send_runs(r, s))
                   for r in range(world)),
        send_tokens=tuple(tuple(sum(n for _, n in send_runs(r, s)) for s in range(world)) for r in range(world)),
        query_depth=tuple(_deepest([(t.q_start, t.q_start + t.q_len) for step in rs for t in step.tiles])
                          for rs in steps),
        key_depth=tuple(_deepest(x) for x in spans))


def ranges(cu: tuple[int, ...], runs: Runs) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per rank, the maximal (global start, length) runs of its segments in local order."""
    out = []
    for rank_runs in runs:
        merged: list[list[int]] = []
        for sg in _segments(cu, rank_runs):
            if merged and merged[-1][0] + merged[-1][1] == sg.start:
                merged[-1][1] += sg.length
            else:
                merged.append([sg.start, sg.length])
        out.append(tuple((a, n) for a, n in merged))
    return tuple(out)
