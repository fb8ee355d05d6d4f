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

Everything is computed on the host from the global ``cu_seqlens``; no device is touched. ``make_plan`` only
partitions; each rank's steps are built from its own documents when first read (``tiling``), so a rank of a
64-way ring of 10k documents, or of a 4096-way ring, pays for its own tiles, not for every rank's.
"""

from __future__ import annotations

import functools
import gc
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ringpack import ownership, partition, tiling
from ringpack.schedule import prefix_sums
from ringpack.validation import boolean, integer

STRATEGIES = tuple(partition.STRATEGIES)


class Segment(NamedTuple):
    """A contiguous run of one document owned by one rank."""

    doc: int  # document index in the global pack
    doc_offset: int  # position of the first token inside its document
    start: int  # global token index of the first token
    length: int
    local_start: int  # row of the first token in the owner's local shard


class PerRank(Sequence):
    """One value per rank (``[rank]``, ``len() == world_size``), each computed when first read and then kept.

    A rank pays only for what it reads of a plan: its own schedule, not every rank's. Ranks running as threads
    of one process may read one plan at once: a value is stored only when complete, and one computed twice is
    the same value (plans are deterministic), whichever store wins. The values live in the plan (``store``);
    this view is made on each access, so nothing the plan holds refers back to it and a plan dropped is freed
    at once, not at the next garbage collection.

    The cyclic garbage collector is paused while a value is computed: a schedule at scale is hundreds of
    thousands of tiles, NamedTuples, which the collector keeps tracking (it untracks plain tuples only), so
    building one would trigger several full collections of the whole heap on the way (half the time of a
    64-way zigzag row). Tiles form no cycles. Of threads computing at once, the one that paused it resumes it."""

    __slots__ = ("_world", "_compute", "_values")

    def __init__(self, world: int, compute, store: dict):
        self._world, self._compute, self._values = world, compute, store

    def __len__(self) -> int:
        return self._world

    def __getitem__(self, rank):
        if isinstance(rank, slice):
            return tuple(self[r] for r in range(self._world)[rank])
        r = range(self._world)[rank]  # negative indices and IndexError as a tuple has them
        found = self._values.get(r, self)
        if found is not self:
            return found
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._values.setdefault(r, self._compute(r))
        finally:
            if paused:
                gc.enable()

    def __iter__(self):
        return (self[r] for r in range(self._world))

    def __eq__(self, other) -> bool:
        return isinstance(other, (PerRank, tuple)) and tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return f"PerRank({self._world} ranks, {len(self._values)} computed)"


@dataclass(frozen=True, eq=False)
class Plan:
    """Who owns which token and what every rank computes at every step. Frozen and deterministic.

    Everything per rank (segments, steps, sends, depths) is computed on first access and kept, each from the
    ownership alone, so ``make_plan`` costs the partition and a rank's schedule costs that rank's tiles. Two
    plans are equal when they are made for the same pack, ranks and mask and own the same tokens: then every
    schedule is the same."""

    cu_seqlens: tuple[int, ...]  # global document boundaries
    world_size: int
    strategy: str
    causal: bool
    window_size: tuple[int, int]
    owners: ownership.Owners = field(repr=False)  # who owns which token; a plan made with ``layout=`` shares it

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _key(self) -> tuple:
        return (self.cu_seqlens, self.world_size, self.strategy, self.causal, self.window_size, self.owners.key)

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self._key)

    @functools.cached_property
    def _store(self) -> dict[str, dict]:
        """Everything computed so far: per-rank values by name, and the cells (``tiling.cell``) every rank shares."""
        return {}

    def _per_rank(self, name: str, compute) -> PerRank:
        return PerRank(self.world_size, compute, self._store.setdefault(name, {}))

    @property
    def total_tokens(self) -> int:
        return self.cu_seqlens[-1]

    @functools.cached_property
    def num_tokens(self) -> tuple[int, ...]:
        """Tokens held by each rank."""
        return self.owners.num_tokens()

    @property
    def segments(self) -> PerRank:
        """``[rank]`` -> the rank's segments in local order."""
        return self._per_rank("segments", self._segments_of)

    def _segments_of(self, rank: int) -> tuple[Segment, ...]:
        out, local = [], 0
        for doc, offset, length in self.owners.segments(rank):
            out.append(Segment(doc, offset, self.cu_seqlens[doc] + offset, length, local))
            local += length
        return tuple(out)

    def local_cu_seqlens(self, rank: int) -> tuple[int, ...]:
        """Boundaries of ``rank``'s segments in its shard (one sequence per segment)."""
        check_rank(rank, self.world_size)
        return tuple(prefix_sums(seg.length for seg in self.segments[rank]))

    def position_ids(self, rank: int) -> torch.Tensor:
        """Position of each local token inside its document (int64 ``[N]``)."""
        check_rank(rank, self.world_size)
        parts = [torch.arange(s.doc_offset, s.doc_offset + s.length) for s in self.segments[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def ranges(self) -> PerRank:
        """Per rank, maximal (global start, length) runs in local order; shard/unshard copy these."""
        return self._per_rank("ranges", self._ranges_of)

    def _ranges_of(self, rank: int) -> tuple[tuple[int, int], ...]:
        runs: list[list[int]] = []
        for s in self.segments[rank]:
            if runs and runs[-1][0] + runs[-1][1] == s.start:
                runs[-1][1] += s.length
            else:
                runs.append([s.start, s.length])
        return tuple((a, n) for a, n in runs)

    @property
    def _documents(self) -> PerRank:
        """``[rank]`` -> the rank's documents in local order, in groups cut alike (``ownership.Documents``)."""
        return self._per_rank("documents", self.owners.documents)

    @property
    def _rows(self) -> PerRank:
        return self._per_rank("rows", lambda rank: tiling.row(self.owners, rank, self._documents[rank], self.causal,
                                                              self.window_size, self._store.setdefault("cells", {})))

    @property
    def _sends(self) -> PerRank:
        return self._per_rank("sends", lambda rank: tiling.sends(self.owners, rank, self._documents[rank], self.causal,
                                                                 self.window_size, self._store.setdefault("cells", {})))

    @property
    def steps(self) -> PerRank:
        """``[rank][step]`` -> a :class:`~ringpack.schedule.Step`; ``len(steps[rank]) == world_size``."""
        return self._per_rank("steps", lambda rank: self._rows[rank].steps)

    def send_runs(self, rank: int, step: int) -> tuple[tuple[int, int], ...]:
        """Rows of ``rank``'s shard it sends at ``step`` (to rank ``rank + step``); empty at step 0."""
        step = range(self.world_size)[step]
        return self._sends[rank].get(step, ()) if step else ()

    def busy_steps(self, rank: int) -> tuple[int, ...]:
        """The steps at which ``rank`` computes, sends or receives, ascending; step 0 always.

        Every rank walks its own busy steps in this order, so the exchanges of two ranks are posted in the
        same relative order on both ends (what point-to-point matching needs) and an idle step costs nothing."""
        return self._per_rank("busy", lambda r: tuple(sorted({0, *self._rows[r].steps.computing(),
                                                              *self._sends[r]})))[rank]

    @property
    def send_tokens(self) -> PerRank:
        """KV tokens each rank sends at each forward step (``[rank][step]``; step 0 is local and sends none).

        Bytes on the wire are ``tokens * 2 * Hk * D * itemsize``; the backward sends the same KV and
        returns the dK/dV of the same rows to their owner (16-bit where ``key_depth`` allows, else fp32).
        """
        return self._per_rank("send_tokens", self._send_tokens_of)

    def _send_tokens_of(self, rank: int) -> tuple[int, ...]:
        counts = [0] * self.world_size
        for s, runs in self._sends[rank].items():
            counts[s] = sum(n for _, n in runs)
        return tuple(counts)

    @property
    def query_depth(self) -> PerRank:
        """Per rank, the most partial results one query row receives: the waves (of all steps) covering it.

        A wave's tiles have disjoint rows, so each wave gives a row at most one partial ``out``/``dq``."""
        return self._per_rank("query_depth", lambda rank: self._rows[rank].query_depth)

    @property
    def key_depth(self) -> PerRank:
        """Per rank, the most partial dK/dV one of its key rows receives: the tiles of every rank and step reading it.

        Tiles of one wave may read the same keys (their query rows are disjoint, not their keys), so tiles are
        counted here, not waves. Exact; it costs the rank's whole column (the tiles of every rank reading it),
        where :meth:`key_depth_capped` stops at the first document deep enough. A rank's documents that no other
        rank holds are one tile per key row: depth 1."""
        return self._per_rank("key_depth", lambda rank: self._key_depth(rank, None))

    def key_depth_capped(self, rank: int, cap: int) -> int:
        """``min(key_depth[rank], cap)``, exact, reading the rank's documents only until one of them reaches ``cap``.

        Whether a key's partial gradients stay below a depth costs a few documents of each source where the
        depth is high (zigzag cuts: the first one cut over the ranks), instead of the tiles of every rank."""
        return self._per_rank(f"key_depth_capped {cap}", lambda r: min(cap, self._key_depth(r, cap)))[rank]

    def _key_depth(self, rank: int, cap: int | None) -> int:
        shared = tiling.key_depth(self.owners, rank, self.causal, self.window_size, self._store.setdefault("cells", {}),
                                  cap)
        return max(shared, int(self.num_tokens[rank] > 0))  # a document no other rank holds: one tile per key row

    def tiles_per_step(self, rank: int) -> tuple[int, ...]:
        return tuple(sum(map(len, step.waves)) for step in self.steps[rank])

    def cost(self, rank: int, cost_model: partition.CostModel = partition.COST) -> int:
        """Estimated work of ``rank``: visible pairs plus a fixed overhead per tile."""
        return self.work(rank) + cost_model.tile_overhead * sum(self.tiles_per_step(rank))

    def work(self, rank: int) -> int:
        """Visible (query, key) pairs this rank computes over all steps."""
        return self._rows[rank].work

    def summary(self) -> str:
        """A short human-readable table: tokens, tiles and pairs per rank."""
        lines = [f"plan: strategy={self.strategy} world_size={self.world_size} tokens={self.total_tokens} "
                 f"docs={len(self.cu_seqlens) - 1} causal={self.causal} window={self.window_size}"]
        for r in range(self.world_size):
            tiles = sum(self.tiles_per_step(r))
            lines.append(f"  rank {r}: tokens={self.num_tokens[r]} segments={len(self.segments[r])} "
                         f"tiles={tiles} pairs={self.work(r)}")
        return "\n".join(lines)


def make_plan(cu_seqlens: Sequence[int] | torch.Tensor, world_size: int, *, strategy: str = "balanced",
              causal: bool = True, window_size: tuple[int, int] = (-1, -1), layout: Plan | None = None) -> Plan:
    """Partition a packed batch over ``world_size`` ranks; every rank's steps follow from it when first read.

    ``cu_seqlens`` holds the global document boundaries (int, 1-D, starts at 0, non-decreasing;
    zero-length documents are allowed). Pass a host copy: a CUDA tensor costs one device sync.
    Every rank calls this with the same arguments and gets the same plan, with no communication.

    ``layout``: a plan of the same batch, strategy and world size whose token ownership to keep, so that
    layers with different masks (a model alternating sliding-window and global layers) share one
    sharding of the hidden states; only the tiles and the schedule follow this call's mask. Its documents may be
    cut further here (``cu_seqlens`` holds every boundary of ``layout.cu_seqlens`` and more: chunked attention's
    documents cut at chunk boundaries), and the same tokens stay on the same ranks in the same order.
    """
    cu = validate_cu_seqlens(cu_seqlens)
    world_size = integer("world_size", world_size, minimum=1)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; supported: {', '.join(STRATEGIES)}")
    window = validate_window(window_size)
    causal = boolean("causal", causal)
    if layout is None:
        owners = partition.STRATEGIES[strategy](cu, world_size, causal, window)
    else:
        _check_layout(layout, cu, world_size, strategy)
        owners = layout.owners if layout.cu_seqlens == cu else ownership.Refined(_base(layout.owners), cu)
    return Plan(cu_seqlens=cu, world_size=world_size, strategy=strategy, causal=causal, window_size=window,
                owners=owners)


def _check_layout(layout: Plan, cu: tuple[int, ...], world_size: int, strategy: str) -> None:
    """A ValueError naming what differs when ``layout`` is not a plan of this batch, strategy and world size."""
    if not isinstance(layout, Plan):
        raise ValueError(f"layout must be a ringpack.Plan from make_plan or None, got {type(layout).__name__}")
    if layout.strategy != strategy or layout.world_size != world_size:
        raise ValueError(f"layout was made with strategy {layout.strategy!r} over {layout.world_size} ranks, this plan "
                         f"asks {strategy!r} over {world_size}; make both with the same strategy and world size")
    if layout.cu_seqlens != cu and not (layout.cu_seqlens[-1] == cu[-1] and set(layout.cu_seqlens) <= set(cu)):
        raise ValueError(f"layout was made for another batch: {_first_difference(layout.cu_seqlens, cu)}; pass the "
                         "plan of this batch (or of it with documents cut further)")


def _base(owners: ownership.Owners) -> ownership.Chunked | ownership.Contiguous:
    return owners.base if isinstance(owners, ownership.Refined) else owners


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
        values = list(cu_seqlens)
        if not all(type(x) is int for x in values):  # plain ints need no conversion (the common case)
            values = [_boundary(x) for x in values]
    if not values:
        raise ValueError("cu_seqlens must have at least one entry ([0] for an empty pack)")
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}" + _LENGTHS_HINT)
    if not all(map(operator.le, values, itertools.islice(values, 1, None))):
        i = next(i for i in range(1, len(values)) if values[i] < values[i - 1])
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


def check_rank(rank: int, world_size: int) -> int:
    """``rank`` if it is an integer in ``[0, world_size)``, else a ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    return rank
