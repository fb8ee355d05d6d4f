"""Plan: which rank owns which tokens, and which tiles every rank computes at every ring step.

Legend: ``T`` tokens in the global pack, ``N`` tokens on one rank, ``P`` ranks (world size).
A *segment* is a contiguous run of one document owned by one rank. A *tile* pairs a query
segment of rank ``r`` with a key segment of the same document held by the rank whose KV
reaches ``r`` at that step. Within a tile, query row ``a`` sees key row ``b`` iff
``lo <= b - a <= hi`` (a diagonal band from ``mask.band``). Tiles are trimmed to the rows and
keys that see something, so a window or a causal edge never costs a kernel block of nothing.

Step ``s`` on rank ``r`` uses the KV of rank ``(r - s) % P``, and only the rows its tiles read:
the source sends exactly those (``Step.recv_runs``) straight to ``r``. A step whose tiles are empty
moves nothing and computes nothing, so a window or whole-document placement shrinks the ring::

    zigzag, P = 2, one causal document cut into chunks c0 c1 c2 c3:
      rank 0 owns c0 c3, rank 1 owns c1 c2
      step 0: r0: c0xc0 c3xc3(band) c3xc0(full)   r1: c1xc1 c2xc2(band) c2xc1(full)
      step 1: r0: c3xc1 c3xc2(full)               r1: c1xc0 c2xc0(full)

Everything is computed once on the host from the global ``cu_seqlens``; no device is touched.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ringpack import partition
from ringpack.mask import band, band_pairs
from ringpack.schedule import Step, Tile, Wave, band_tile, prefix_sums, tile
from ringpack.validation import boolean, integer

STRATEGIES = tuple(partition.STRATEGIES)


class Segment(NamedTuple):
    """A contiguous run of one document owned by one rank."""

    doc: int  # document index in the global pack
    doc_offset: int  # position of the first token inside its document
    start: int  # global token index of the first token
    length: int
    local_start: int  # row of the first token in the owner's local shard


@dataclass(frozen=True)
class Plan:
    """Who owns which token and what every rank computes at every step. Frozen and deterministic."""

    cu_seqlens: tuple[int, ...]  # global document boundaries
    world_size: int
    strategy: str
    causal: bool
    window_size: tuple[int, int]
    segments: tuple[tuple[Segment, ...], ...]  # [rank] -> owned segments in local order
    steps: tuple[tuple[Step, ...], ...]  # [rank][step]

    @property
    def total_tokens(self) -> int:
        return self.cu_seqlens[-1]

    @functools.cached_property
    def num_tokens(self) -> tuple[int, ...]:
        """Tokens held by each rank."""
        return tuple(sum(s.length for s in segs) for segs in self.segments)

    def local_cu_seqlens(self, rank: int) -> tuple[int, ...]:
        """Boundaries of ``rank``'s segments in its shard (one sequence per segment)."""
        check_rank(rank, self.world_size)
        return tuple(prefix_sums(seg.length for seg in self.segments[rank]))

    def position_ids(self, rank: int) -> torch.Tensor:
        """Position of each local token inside its document (int64 ``[N]``)."""
        check_rank(rank, self.world_size)
        parts = [torch.arange(s.doc_offset, s.doc_offset + s.length) for s in self.segments[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @functools.cached_property
    def ranges(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per rank, maximal (global start, length) runs in local order; shard/unshard copy these."""
        out = []
        for segs in self.segments:
            runs: list[list[int]] = []
            for s in segs:
                if runs and runs[-1][0] + runs[-1][1] == s.start:
                    runs[-1][1] += s.length
                else:
                    runs.append([s.start, s.length])
            out.append(tuple((a, n) for a, n in runs))
        return tuple(out)

    def send_runs(self, rank: int, step: int) -> tuple[tuple[int, int], ...]:
        """Rows of ``rank``'s shard it sends at ``step`` (to rank ``rank + step``); empty at step 0."""
        if step == 0:
            return ()
        return self.steps[(rank + step) % self.world_size][step].recv_runs

    def busy_steps(self, rank: int) -> tuple[int, ...]:
        """The steps at which ``rank`` computes, sends or receives, ascending; step 0 always.

        Every rank walks its own busy steps in this order, so the exchanges of two ranks are posted in the
        same relative order on both ends (what point-to-point matching needs) and an idle step costs nothing."""
        return self._busy[rank]

    @functools.cached_property
    def _busy(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(s for s in range(self.world_size)
                           if s == 0 or self.steps[r][s].waves or self.send_runs(r, s))
                     for r in range(self.world_size))

    @functools.cached_property
    def send_tokens(self) -> tuple[tuple[int, ...], ...]:
        """KV tokens each rank sends at each forward step (``[rank][step]``; step 0 is local and sends none).

        Bytes on the wire are ``tokens * 2 * Hk * D * itemsize``; the backward sends the same KV and
        returns the dK/dV of the same rows to their owner (16-bit where ``key_depth`` allows, else fp32).
        """
        return tuple(tuple(sum(n for _, n in self.send_runs(r, s)) for s in range(self.world_size))
                     for r in range(self.world_size))

    @functools.cached_property
    def query_depth(self) -> tuple[int, ...]:
        """Per rank, the most partial results one query row receives: the waves (of all steps) covering it.

        A wave's tiles have disjoint rows, so each wave gives a row at most one partial ``out``/``dq``."""
        return tuple(_deepest([(t.q_start, t.q_start + t.q_len) for step in steps for t in step.tiles])
                     for steps in self.steps)

    @functools.cached_property
    def key_depth(self) -> tuple[int, ...]:
        """Per rank, the most partial dK/dV one of its key rows receives: the tiles of every rank and step reading it.

        Tiles of one wave may read the same keys (their query rows are disjoint, not their keys), so tiles are
        counted here, not waves. A tile's keys index the received buffer: ``recv_runs`` maps them back::

            recv_runs (40, 8), (4, 2): buffer rows 0..7 are source rows 40..47, buffer rows 8..9 are 4..5
        """
        spans: list[list[tuple[int, int]]] = [[] for _ in range(self.world_size)]
        for steps in self.steps:
            for s, step in enumerate(steps):
                at = prefix_sums(n for _, n in step.recv_runs)  # buffer row of each run's first row
                for t in step.tiles:
                    a, b = t.k_start, t.k_start + t.k_len
                    if s == 0:  # the own shard
                        spans[step.source].append((a, b))
                        continue
                    i = bisect.bisect_right(at, a) - 1
                    while i < len(step.recv_runs) and at[i] < b:
                        row = step.recv_runs[i][0]
                        spans[step.source].append((row + max(a, at[i]) - at[i], row + min(b, at[i + 1]) - at[i]))
                        i += 1
        return tuple(_deepest(x) for x in spans)

    def tiles_per_step(self, rank: int) -> tuple[int, ...]:
        return tuple(len(step.tiles) for step in self.steps[rank])

    def cost(self, rank: int, cost_model: partition.CostModel = partition.COST) -> int:
        """Estimated work of ``rank``: visible pairs plus a fixed overhead per tile."""
        return self.work(rank) + cost_model.tile_overhead * sum(self.tiles_per_step(rank))

    def work(self, rank: int) -> int:
        """Visible (query, key) pairs this rank computes over all steps."""
        return sum(t.pairs for step in self.steps[rank] for t in step.tiles)

    def summary(self) -> str:
        """A short human-readable table: tokens, tiles and pairs per rank."""
        lines = [f"plan: strategy={self.strategy} world_size={self.world_size} tokens={self.total_tokens} "
                 f"docs={len(self.cu_seqlens) - 1} causal={self.causal} window={self.window_size}"]
        for r in range(self.world_size):
            tiles = sum(len(s.tiles) for s in self.steps[r])
            lines.append(f"  rank {r}: tokens={self.num_tokens[r]} segments={len(self.segments[r])} "
                         f"tiles={tiles} pairs={self.work(r)}")
        return "\n".join(lines)


def _deepest(spans: list[tuple[int, int]]) -> int:
    """The most ``[start, stop)`` spans that share one row (0 for none)."""
    edges = sorted((pos, d) for a, b in spans for pos, d in ((a, 1), (b, -1)))
    depth = deepest = 0
    for _, d in edges:  # at a shared edge, ends (-1) sort before starts
        depth += d
        deepest = max(deepest, depth)
    return deepest


def make_plan(cu_seqlens: Sequence[int] | torch.Tensor, world_size: int, *, strategy: str = "balanced",
              causal: bool = True, window_size: tuple[int, int] = (-1, -1), layout: Plan | None = None) -> Plan:
    """Partition a packed batch over ``world_size`` ranks and schedule every ring step.

    ``cu_seqlens`` holds the global document boundaries (int, 1-D, starts at 0, non-decreasing;
    zero-length documents are allowed). Pass a host copy: a CUDA tensor costs one device sync.
    Every rank calls this with the same arguments and gets the same plan, with no communication.

    ``layout``: a plan of the same batch, strategy and world size whose token ownership to keep, so that
    layers with different masks (a model alternating sliding-window and global layers) share one
    sharding of the hidden states; only the tiles and the schedule follow this call's mask.
    """
    cu = validate_cu_seqlens(cu_seqlens)
    world_size = integer("world_size", world_size, minimum=1)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; supported: {', '.join(STRATEGIES)}")
    window = validate_window(window_size)
    causal = boolean("causal", causal)
    if layout is None:
        runs = partition.STRATEGIES[strategy](cu, world_size, causal, window)
    else:
        _check_layout(layout, cu, world_size, strategy)
        runs = layout.ranges
    segments = tuple(_segments(cu, rank_runs) for rank_runs in runs)
    by_doc = [_index_by_doc(segs) for segs in segments]
    holders: dict[int, int] = {}
    for segs in by_doc:
        for doc in segs:
            holders[doc] = holders.get(doc, 0) + 1
    # Only documents held by several ranks have tiles after step 0.
    shared = [tuple(sg for sg in segs if holders[sg.doc] > 1) for segs in segments]
    steps = tuple(
        tuple(_step(segments[r] if s == 0 else shared[r], by_doc[(r - s) % world_size], (r - s) % world_size,
                    causal, window, compact=s > 0)
              for s in range(world_size))
        for r in range(world_size))
    return Plan(cu_seqlens=cu, world_size=world_size, strategy=strategy, causal=causal, window_size=window,
                segments=segments, steps=steps)


def _check_layout(layout: Plan, cu: tuple[int, ...], world_size: int, strategy: str) -> None:
    """A ValueError naming what differs when ``layout`` is not a plan of this batch, strategy and world size."""
    if not isinstance(layout, Plan):
        raise ValueError(f"layout must be a ringpack.Plan from make_plan or None, got {type(layout).__name__}")
    if layout.strategy != strategy or layout.world_size != world_size:
        raise ValueError(f"layout was made with strategy {layout.strategy!r} over {layout.world_size} ranks, this plan "
                         f"asks {strategy!r} over {world_size}; make both with the same strategy and world size")
    if layout.cu_seqlens != cu:
        raise ValueError(f"layout was made for another batch: {_first_difference(layout.cu_seqlens, cu)}; pass the "
                         "plan of this batch")


def _first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> str:
    """Where two ``cu_seqlens`` first differ, in words (document counts and totals first)."""
    if len(a) != len(b) or a[-1] != b[-1]:
        return f"{len(a) - 1} documents of {a[-1]} tokens there, {len(b) - 1} documents of {b[-1]} tokens here"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"document {i - 1} ends at token {a[i]} there and at {b[i]} here (same count and total)"


_LENGTHS_HINT = "; for document lengths, ringpack.lengths_to_cu_seqlens(lengths) gives their cu_seqlens"
MAX_TOKENS = 2 ** 31 - 1  # the kernels index tokens with int32 cu_seqlens


def validate_cu_seqlens(cu_seqlens: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """Return ``cu_seqlens`` as a tuple of ints, or raise a ValueError naming what is wrong."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor (int32 or int64), got dtype {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be 1-D [n_docs + 1], got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device.type == "meta":
            raise ValueError("cu_seqlens is on the meta device and holds no values; pass the batch's real boundaries "
                             "(a host tensor or a list)")
        values = cu_seqlens.tolist()
    elif isinstance(cu_seqlens, (str, bytes)) or not isinstance(cu_seqlens, Sequence) and not hasattr(
            cu_seqlens, "__array__"):
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor or sequence [n_docs + 1], got "
                         f"{type(cu_seqlens).__name__}")
    else:
        if getattr(cu_seqlens, "ndim", 1) != 1:
            raise ValueError(f"cu_seqlens must be 1-D [n_docs + 1], got {cu_seqlens.ndim} dimensions")
        values = [_boundary(x) for x in cu_seqlens]
    if not values:
        raise ValueError("cu_seqlens must have at least one entry ([0] for an empty pack)")
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}" + _LENGTHS_HINT)
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"cu_seqlens must be non-decreasing, got {values[i - 1]} then {values[i]} at index {i}"
                             + _LENGTHS_HINT)
    if values[-1] > MAX_TOKENS:
        raise ValueError(f"cu_seqlens ends at {values[-1]} tokens; at most {MAX_TOKENS} (int32) are supported")
    return tuple(values)


def _boundary(x) -> int:
    try:
        return integer("cu_seqlens", x)
    except ValueError:
        raise ValueError(f"cu_seqlens must hold integers, got {x!r} of type {type(x).__name__}") from None


def validate_window(window_size: Sequence[int]) -> tuple[int, int]:
    """Return ``window_size`` as ``(left, right)``; each an int >= -1 (-1 = unbounded)."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    # -1 means unbounded, as in flash attention
    return integer("window_size left", left, minimum=-1), integer("window_size right", right, minimum=-1)


def _segments(cu: tuple[int, ...], runs: Sequence[tuple[int, int]]) -> tuple[Segment, ...]:
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


def check_rank(rank: int, world_size: int) -> int:
    """``rank`` if it is an integer in ``[0, world_size)``, else a ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    return rank
