"""What the ring runs, as plain host data (no torch): tiles, waves of tiles, and the steps of one rank.

Legend: a *tile* pairs query rows ``a`` (of the computing rank's shard) with key rows ``b`` (of the source
rank's shard, or of the buffer received from it) of one document; query ``a`` sees key ``b`` iff
``lo <= b - a <= hi``, a diagonal band. Every tile is trimmed to the rows and keys that see something, so the
band always holds ``k_len - q_len``, and the same mask is a bottom-right aligned window ``(left, right)``, the
form varlen flash kernels take (key ``b`` visible iff ``shift - left <= b - a <= shift + right``, ``shift =
k_len - q_len``, ``-1`` unbounded)::

    band lo=-1, hi=1 on a 4x4 tile        shift = 0: left = shift - lo = 1, right = hi - shift = 1
         b: 0 1 2 3
    a=0     x x . .
    a=1     x x x .
    a=2     . x x x
    a=3     . . x x

Both forms are computed once, here, when the plan is made; backends read them and never re-derive them.
"""

from __future__ import annotations

import array
import functools
import itertools
import operator
from dataclasses import dataclass
from typing import NamedTuple

from ringpack.mask import band_pairs

Runs = tuple[tuple[int, int], ...]  # (start, length) row runs, in order


class Tile(NamedTuple):
    """Local query rows x source key rows of one document, trimmed, with at least one visible pair."""

    q_start: int  # first query row in the computing rank's shard
    q_len: int
    k_start: int  # first key row in the source's shard (step 0) or in the received buffer
    k_len: int
    lo: int  # key b is visible to query a iff lo <= b - a <= hi; clipped to the tile
    hi: int
    pairs: int  # number of visible (query, key) pairs
    left: int  # the same band as a bottom-right window (-1 unbounded)
    right: int

    @property
    def full(self) -> bool:
        """Every query of the tile sees every key of the tile."""
        return self.left == -1 and self.right == -1

    @property
    def causal_square(self) -> bool:
        """A square tile whose mask is plain causal: top-left and bottom-right alignment agree."""
        return self.q_len == self.k_len and self.left == -1 and self.right == 0


def band_tile(q_start: int, q_len: int, k_start: int, k_len: int, lo: float, hi: float) -> Tile | None:
    """The tile of ``q_len`` rows at ``q_start`` x ``k_len`` keys at ``k_start`` under the band ``[lo, hi]`` (may
    be infinite), cut down to the rows and keys that see something; None when nothing is visible."""
    lo, hi = max(lo, 1 - q_len), min(hi, k_len - 1)
    if lo > hi:
        return None
    lo, hi = int(lo), int(hi)
    a0, a1 = max(0, -hi), min(q_len - 1, k_len - 1 - lo)  # query rows with a visible key
    b0, b1 = max(0, lo), min(k_len - 1, q_len - 1 + hi)  # keys visible to some query
    shift = b0 - a0
    q_len, k_len = a1 - a0 + 1, b1 - b0 + 1
    return tile(q_start + a0, q_len, k_start + b0, k_len, max(lo - shift, 1 - q_len), min(hi - shift, k_len - 1))


def tile(q_start: int, q_len: int, k_start: int, k_len: int, lo: int, hi: int, pairs: int | None = None) -> Tile:
    """A trimmed tile (every row and key sees something), its pairs counted and its window derived."""
    shift = k_len - q_len
    assert lo <= shift <= hi, (q_start, q_len, k_start, k_len, lo, hi)  # trimmed: the corner pairs are visible
    left = -1 if lo <= 1 - q_len else shift - lo
    right = -1 if hi >= k_len - 1 else hi - shift
    if pairs is None:
        pairs = band_pairs(q_len, k_len, lo, hi)
    return Tile(q_start, q_len, k_start, k_len, lo, hi, pairs, left, right)


@dataclass(frozen=True, repr=False)
class Wave:
    """Tiles of one step whose query rows are disjoint: one kernel call can run them together.

    The tiles are held as one table, ``table``: each tile's fields in ``Tile`` order as native int64 (``TILE``), row
    after row. A zigzag step's wave holds hundreds of thousands of tiles: a table is made in bulk, hashed and compared
    at C speed (Python caches a ``bytes`` object's hash, and a plan is reused by every layer), and ``column`` reads
    one field without making a ``Tile`` per row; ``tiles`` makes them, once, for the consumers that want objects."""

    table: bytes
    q_span: tuple[int, int]  # [start, stop) hull of the query rows
    k_span: tuple[int, int]  # [start, stop) hull of the key rows

    @classmethod
    def of(cls, tiles: tuple[Tile, ...]) -> Wave:
        """The wave of ``tiles``, its hulls computed."""
        q, q_len, k, k_len = (list(map(operator.itemgetter(i), tiles)) for i in range(4))
        return cls(array.array(TILE, itertools.chain.from_iterable(tiles)).tobytes(),
                   (min(q), max(map(operator.add, q, q_len))), (min(k), max(map(operator.add, k, k_len))))

    def __len__(self) -> int:
        """The number of tiles."""
        return len(self.table) // TILE_BYTES

    def column(self, field: str) -> memoryview:
        """One field of every tile, in order (a view of the table: ints, ``tolist()`` for a list)."""
        return memoryview(self.table).cast(TILE)[Tile._fields.index(field)::len(Tile._fields)]

    @functools.cached_property
    def tiles(self) -> tuple[Tile, ...]:
        flat = memoryview(self.table).cast(TILE).tolist()
        return tuple(map(Tile._make, zip(*[iter(flat)] * len(Tile._fields))))

    def __repr__(self) -> str:
        return f"Wave({len(self)} tiles, q_span={self.q_span}, k_span={self.k_span})"


TILE = "q"  # a tile's fields in a wave's table: native int64 (pair counts outgrow int32)
TILE_BYTES = len(Tile._fields) * array.array(TILE).itemsize


@dataclass(frozen=True)
class Step:
    """What one rank does at one ring step."""

    source: int  # rank whose KV is used
    waves: tuple[Wave, ...]  # at step 0 key rows index the local shard; later, the received buffer
    recv_runs: Runs = ()  # (row, length) runs of the source's shard received, in order

    @functools.cached_property
    def recv_tokens(self) -> int:
        return sum(n for _, n in self.recv_runs)

    @property
    def tiles(self) -> tuple[Tile, ...]:
        return tuple(t for w in self.waves for t in w.tiles)


def prefix_sums(lengths) -> list[int]:
    """``[0, l0, l0 + l1, ...]``: where each of consecutive runs of ``lengths`` starts, and the total."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out
