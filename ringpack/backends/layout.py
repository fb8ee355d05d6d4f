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

import functools
from dataclasses import dataclass

from ringpack.schedule import Tile, Wave


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


def _group(tiles: list[Tile], q_span: tuple[int, int], k_span: tuple[int, int]) -> VarlenGroup:
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
    by_window: dict[tuple[int, int], list[Tile]] = {}
    for tile in wave.tiles:
        by_window.setdefault((tile.left, tile.right), []).append(tile)
    return tuple(_group(tiles, wave.q_span, wave.k_span) for tiles in by_window.values())
