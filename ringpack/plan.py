"""Plan: which rank owns which tokens, and which tiles every rank computes at every ring step.

Legend: ``T`` tokens in the global pack, ``N`` tokens on one rank, ``P`` ranks (world size).
A *segment* is a contiguous run of one document owned by one rank. A *tile* pairs a query
segment of rank ``r`` with a key segment of the same document held by the rank whose KV
reaches ``r`` at that step. Within a tile, query row ``a`` sees key row ``b`` iff
``lo <= b - a <= hi`` (a diagonal band; the whole mask rule of a document lives in ``_band``).

Ring step ``s`` on rank ``r`` uses the KV of rank ``(r - s) % P``::

    zigzag, P = 2, one causal document cut into chunks c0 c1 c2 c3:
      rank 0 owns c0 c3, rank 1 owns c1 c2
      step 0: r0: c0xc0 c3xc3(band) c3xc0(full)   r1: c1xc1 c2xc2(band) c2xc1(full)
      step 1: r0: c3xc1 c3xc2(full)               r1: c1xc0 c2xc0(full)

Everything is computed once on the host from the global ``cu_seqlens``; no device is touched.
"""

from __future__ import annotations

import bisect
import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ringpack import partition

STRATEGIES = ("balanced", "zigzag", "contiguous")


@dataclass(frozen=True)
class Segment:
    """A contiguous run of one document owned by one rank."""

    doc: int  # document index in the global pack
    doc_offset: int  # position of the first token inside its document
    start: int  # global token index of the first token
    length: int
    local_start: int  # row of the first token in the owner's local shard


@dataclass(frozen=True)
class Tile:
    """Local query rows x remote key rows of one document with at least one visible pair."""

    q_start: int  # first query row in the computing rank's shard
    q_len: int
    k_start: int  # first key row in the source rank's shard
    k_len: int
    lo: int  # key b is visible to query a iff lo <= b - a <= hi; clipped to the tile
    hi: int
    pairs: int  # number of visible (query, key) pairs

    @property
    def full(self) -> bool:
        """True when every query of the tile sees every key of the tile."""
        return self.lo == 1 - self.q_len and self.hi == self.k_len - 1


@dataclass(frozen=True)
class Wave:
    """Tiles of one step whose query rows are disjoint: one kernel call can run them together."""

    tiles: tuple[Tile, ...]
    q_span: tuple[int, int]  # [start, stop) hull of the query rows
    k_span: tuple[int, int]  # [start, stop) hull of the key rows


@dataclass(frozen=True)
class Step:
    """What one rank does at one ring step."""

    source: int  # rank whose KV is used
    waves: tuple[Wave, ...]

    @property
    def tiles(self) -> tuple[Tile, ...]:
        return tuple(t for w in self.waves for t in w.tiles)


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
        _check_rank(rank, self.world_size)
        out = [0]
        for seg in self.segments[rank]:
            out.append(out[-1] + seg.length)
        return tuple(out)

    def position_ids(self, rank: int) -> torch.Tensor:
        """Position of each local token inside its document (int64 ``[N]``)."""
        _check_rank(rank, self.world_size)
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

    @functools.cached_property
    def send_tokens(self) -> tuple[tuple[int, ...], ...]:
        """KV tokens each rank sends at each forward step (``[rank][step]``); the last step sends none.

        Bytes on the wire are ``tokens * 2 * Hk * D * itemsize``; the backward sends the same KV and,
        at every step, the fp32 dK/dV of the block just used.
        """
        world = self.world_size
        return tuple(tuple(self.num_tokens[(r - s) % world] if s + 1 < world else 0 for s in range(world))
                     for r in range(world))

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


def make_plan(cu_seqlens: Sequence[int] | torch.Tensor, world_size: int, *, strategy: str = "balanced",
              causal: bool = True, window_size: tuple[int, int] = (-1, -1)) -> Plan:
    """Partition a packed batch over ``world_size`` ranks and schedule every ring step.

    ``cu_seqlens`` holds the global document boundaries (int, 1-D, starts at 0, non-decreasing;
    zero-length documents are allowed). Pass a host copy: a CUDA tensor costs one device sync.
    Every rank calls this with the same arguments and gets the same plan, with no communication.
    """
    cu = validate_cu_seqlens(cu_seqlens)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; supported: {', '.join(STRATEGIES)}")
    window = validate_window(window_size)
    causal = bool(causal)
    runs = partition.split(strategy, cu, world_size, causal=causal, window=window)
    segments = tuple(_segments(cu, rank_runs) for rank_runs in runs)
    by_doc = [_index_by_doc(segs) for segs in segments]
    steps = tuple(
        tuple(_step(segments[r], by_doc[(r - s) % world_size], (r - s) % world_size, causal, window)
              for s in range(world_size))
        for r in range(world_size))
    return Plan(cu_seqlens=cu, world_size=world_size, strategy=strategy, causal=causal, window_size=window,
                segments=segments, steps=steps)


def validate_cu_seqlens(cu_seqlens: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """Return ``cu_seqlens`` as a tuple of ints, or raise a ValueError naming what is wrong."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor (int32 or int64), got dtype {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be 1-D [n_docs + 1], got shape {tuple(cu_seqlens.shape)}")
        values = [int(x) for x in cu_seqlens.tolist()]
    else:
        if getattr(cu_seqlens, "ndim", 1) != 1:
            raise ValueError(f"cu_seqlens must be 1-D [n_docs + 1], got {cu_seqlens.ndim} dimensions")
        values = []
        for x in cu_seqlens:
            try:
                if isinstance(x, bool):
                    raise TypeError
                values.append(operator.index(x))
            except TypeError:
                raise ValueError(f"cu_seqlens must hold integers, got {x!r} of type {type(x).__name__}") from None
    if not values:
        raise ValueError("cu_seqlens must have at least one entry ([0] for an empty pack)")
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"cu_seqlens must be non-decreasing, got {values[i - 1]} then {values[i]} at index {i}")
    return tuple(values)


def validate_window(window_size: Sequence[int]) -> tuple[int, int]:
    """Return ``window_size`` as ``(left, right)``; each an int >= -1 (-1 = unbounded)."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise ValueError(f"window_size {name} must be an integer >= -1 (-1 means unbounded), got {w!r}")
    return (left, right)


def band(q_offset: int, k_offset: int, causal: bool, window: tuple[int, int]) -> tuple[float, float]:
    """The visibility band of ``b - a`` for query rows at ``q_offset`` and keys at ``k_offset`` of one document.

    Key position ``j`` is visible to query position ``i`` iff ``causal => j <= i`` and
    ``i - left <= j <= i + right`` (``-1`` unbounded). With ``i = q_offset + a`` and
    ``j = k_offset + b`` this is ``lo <= b - a <= hi``.
    """
    delta = q_offset - k_offset
    left, right = window
    hi = float("inf")
    if causal:
        hi = delta
    if right >= 0:
        hi = min(hi, delta + right)
    lo = delta - left if left >= 0 else float("-inf")
    return lo, hi


def band_pairs(q_len: int, k_len: int, lo: float, hi: float) -> int:
    """Number of (a, b) in ``[0, q_len) x [0, k_len)`` with ``lo <= b - a <= hi``, in O(1)."""
    if q_len <= 0 or k_len <= 0 or lo > hi:
        return 0

    def below(c: float) -> int:  # pairs with b - a < c, i.e. sum over a of clamp(a + c, 0, k_len)
        if c == float("-inf"):
            return 0
        if c == float("inf"):
            return q_len * k_len
        c = int(c)
        first = min(max(1 - c, 0), q_len)  # from here on a + c >= 1
        last = min(max(k_len - c, 0), q_len)  # from here on a + c >= k_len (last >= first as k_len >= 1)
        middle = (last - first) * c + (first + last - 1) * (last - first) // 2
        return middle + (q_len - last) * k_len

    return below(hi + 1) - below(lo)


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
          window: tuple[int, int]) -> Step:
    tiles = []
    for qs in q_segs:
        for ks in k_by_doc.get(qs.doc, ()):
            lo, hi = band(qs.doc_offset, ks.doc_offset, causal, window)
            lo, hi = max(lo, 1 - qs.length), min(hi, ks.length - 1)
            pairs = band_pairs(qs.length, ks.length, lo, hi)
            if pairs:
                tiles.append(Tile(qs.local_start, qs.length, ks.local_start, ks.length, int(lo), int(hi), pairs))
    return Step(source=source, waves=_waves(tiles))


def _waves(tiles: list[Tile]) -> tuple[Wave, ...]:
    """Group tiles so that no two tiles of one wave share query rows (first fit, order kept)."""
    groups: list[list[Tile]] = []
    used: list[set[int]] = []
    for t in tiles:
        for g, u in zip(groups, used):
            if t.q_start not in u:
                g.append(t)
                u.add(t.q_start)
                break
        else:
            groups.append([t])
            used.append({t.q_start})
    return tuple(Wave(tuple(g), (min(t.q_start for t in g), max(t.q_start + t.q_len for t in g)),
                      (min(t.k_start for t in g), max(t.k_start + t.k_len for t in g))) for g in groups)


def _check_rank(rank: int, world_size: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")


def shard(x: torch.Tensor, plan: Plan, rank: int) -> torch.Tensor:
    """This rank's tokens of a global packed tensor ``[T, ...]``, in the plan's local order."""
    _check_rank(rank, plan.world_size)
    if x.dim() < 1 or x.shape[0] != plan.total_tokens:
        raise ValueError(f"shard: tensor has {x.shape[0] if x.dim() else 'no'} tokens along dim 0, "
                         f"the plan has {plan.total_tokens}")
    runs = plan.ranges[rank]
    if len(runs) == 1:
        return x[runs[0][0]:runs[0][0] + runs[0][1]]
    return torch.cat([x[a:a + n] for a, n in runs]) if runs else x[:0]


def unshard(parts: Sequence[torch.Tensor], plan: Plan) -> torch.Tensor:
    """Reassemble every rank's shard (``parts[r]`` from rank ``r``) into the global ``[T, ...]`` tensor."""
    if len(parts) != plan.world_size:
        raise ValueError(f"unshard: got {len(parts)} parts, the plan has world_size {plan.world_size}")
    pieces = []
    for r, part in enumerate(parts):
        if part.dim() < 1 or part.shape[0] != plan.num_tokens[r]:
            raise ValueError(f"unshard: part {r} has {part.shape[0] if part.dim() else 'no'} tokens, "
                             f"the plan gives rank {r} {plan.num_tokens[r]}")
        local = 0
        for a, n in plan.ranges[r]:
            pieces.append((a, part[local:local + n]))
            local += n
    pieces.sort(key=lambda p: p[0])
    if not pieces:
        return parts[0][:0] if parts else torch.zeros(0)
    return torch.cat([p for _, p in pieces])
