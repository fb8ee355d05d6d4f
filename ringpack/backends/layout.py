"""Pure host-side geometry: a wave's band tiles -> the arguments of varlen and dense kernel calls.

Legend: a tile pairs query rows ``a`` with key rows ``b``; query ``a`` sees key ``b`` iff
``lo <= b - a <= hi``. Kernels with bottom-right aligned masks (the varlen flash kernels) see key
``b`` iff ``(k_len - q_len) - left <= b - a <= (k_len - q_len) + right`` (``-1`` = unbounded)::

    band lo=-1, hi=1 on a 4x4 tile        trimmed: every kept row and key has a visible pair,
         b: 0 1 2 3                        so k_len - q_len always lies in [lo, hi] and
    a=0     x x . .                        left = (k_len - q_len) - lo, right = hi - (k_len - q_len)
    a=1     x x x .
    a=2     . x x x
    a=3     . . x x

Trimming drops the query rows and keys a tile never pairs; then every band is one (left, right) pair.
A varlen call takes one (left, right) for all its sequences, so a wave is cut into *groups* of tiles
that share it. Everything here is a pure function of the plan's tiles: no device, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from ringpack.plan import Tile, Wave


@dataclass(frozen=True)
class KernelTile:
    """A tile trimmed to the rows and keys that see something, with its bottom-right window."""

    q_start: int  # rows in the local shard (queries) / the source shard (keys)
    q_len: int
    k_start: int
    k_len: int
    lo: int  # band after trimming, clipped to the tile: lo >= 1 - q_len, hi <= k_len - 1
    hi: int
    left: int  # bottom-right window: -1 unbounded
    right: int

    @property
    def full(self) -> bool:
        return self.left == -1 and self.right == -1

    @property
    def causal_square(self) -> bool:
        """A square tile whose mask is plain causal: top-left and bottom-right alignment agree."""
        return self.q_len == self.k_len and self.left == -1 and self.right == 0


@functools.lru_cache(maxsize=1 << 16)
def trim(tile: Tile) -> KernelTile:
    """Cut ``tile`` to its visible rows and keys and express its band as a bottom-right window.

    Cached: every layer asks again for the same tiles of the same plan."""
    lo, hi = max(tile.lo, 1 - tile.q_len), min(tile.hi, tile.k_len - 1)
    if lo > hi:
        raise ValueError(f"tile {tile} sees no key; the plan should not have made it")
    a0, a1 = max(0, -hi), min(tile.q_len - 1, tile.k_len - 1 - lo)  # rows with a visible key (inclusive)
    b0, b1 = max(0, lo), min(tile.k_len - 1, tile.q_len - 1 + hi)  # keys with a visible row (inclusive)
    q_len, k_len = a1 - a0 + 1, b1 - b0 + 1
    lo, hi = max(lo - b0 + a0, 1 - q_len), min(hi - b0 + a0, k_len - 1)
    shift = k_len - q_len
    assert lo <= shift <= hi, (tile, lo, hi, shift)  # every kept row and key sees something
    left = -1 if lo <= 1 - q_len else shift - lo
    right = -1 if hi >= k_len - 1 else hi - shift
    return KernelTile(tile.q_start + a0, q_len, tile.k_start + b0, k_len, lo, hi, left, right)


@dataclass(frozen=True)
class VarlenGroup:
    """One varlen kernel call over the wave's query hull.

    ``q_lens``/``k_lens`` are the sequences of the call, in order; a sequence with ``k_len == 0``
    covers query rows that this group does not compute (the kernel gives them out 0, lse +inf), one
    with ``q_len == 0`` skips keys. With ``k_runs`` set, keys are gathered: the call's key buffer is
    the concatenation of the source rows ``[start, start + len)`` of each run, in order; otherwise
    it is the contiguous slice of the wave's key hull starting at ``k_offset``.
    """

    left: int
    right: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    k_offset: int  # first key row (relative to the wave's key hull) of a contiguous key buffer
    k_runs: tuple[tuple[int, int], ...] | None  # gathered key runs (relative to the key hull), or None
    max_q: int
    max_k: int

    @property
    def causal(self) -> bool:
        return self.left == -1 and self.right == 0

    @property
    def total_k(self) -> int:
        return sum(self.k_lens)


def _group(tiles: list[KernelTile], q_span: tuple[int, int], k_span: tuple[int, int]) -> VarlenGroup:
    tiles = sorted(tiles, key=lambda t: t.q_start)
    contiguous = all(a.k_start + a.k_len <= b.k_start for a, b in zip(tiles, tiles[1:]))
    q_lens: list[int] = []
    k_lens: list[int] = []
    q_pos, k_pos = q_span[0], tiles[0].k_start
    runs: list[tuple[int, int]] = []
    for t in tiles:
        if t.q_start > q_pos:  # rows this group leaves alone: no keys
            q_lens.append(t.q_start - q_pos)
            k_lens.append(0)
        if contiguous and t.k_start > k_pos:  # keys no tile of this group uses: no rows
            q_lens.append(0)
            k_lens.append(t.k_start - k_pos)
        q_lens.append(t.q_len)
        k_lens.append(t.k_len)
        runs.append((t.k_start - k_span[0], t.k_len))
        q_pos, k_pos = t.q_start + t.q_len, t.k_start + t.k_len
    if q_span[1] > q_pos:
        q_lens.append(q_span[1] - q_pos)
        k_lens.append(0)
    left, right = tiles[0].left, tiles[0].right
    if left >= 0 and right == -1:
        # FA2 turns an unbounded right side next to a bounded left one into right = max_k, and with
        # bottom-right alignment that hides keys from the first rows of a sequence with more queries than
        # max_k + 1. Bound it explicitly instead: right = max_q - 1 covers every key of every row.
        right = max(q_lens) - 1
    # The kernel treats a window >= max_k as unbounded: keep max_k above every bound we set.
    max_k = max(max(k_lens), left + 1, right + 1)
    return VarlenGroup(left, right, tuple(q_lens), tuple(k_lens), tiles[0].k_start - k_span[0],
                       None if contiguous else tuple(runs), max(q_lens), max_k)


@functools.lru_cache(maxsize=4096)
def varlen_groups(wave: Wave) -> tuple[VarlenGroup, ...]:
    """The varlen calls that compute ``wave``: one per distinct (left, right) window of its trimmed tiles.

    Cached: a plan is reused by every layer, so each wave is laid out once (host tuples only).
    """
    by_window: dict[tuple[int, int], list[KernelTile]] = {}
    for tile in wave.tiles:
        kt = trim(tile)
        by_window.setdefault((kt.left, kt.right), []).append(kt)
    return tuple(_group(tiles, wave.q_span, wave.k_span) for tiles in by_window.values())


def sub_wave(wave: Wave, tiles: tuple[Tile, ...]) -> Wave:
    """The wave made of ``tiles`` (a subset of ``wave.tiles``), with its own hulls."""
    return dataclasses.replace(wave, tiles=tiles,
                               q_span=(min(t.q_start for t in tiles), max(t.q_start + t.q_len for t in tiles)),
                               k_span=(min(t.k_start for t in tiles), max(t.k_start + t.k_len for t in tiles)))
