"""A wave's tiles as varlen kernel calls: host-side geometry, and the calls' device tables staged once.

Legend: a tile pairs query rows ``a`` with key rows ``b`` under its bottom-right window ``(left, right)``
(``schedule.Tile``: computed when the plan was made). A varlen call takes one window for all its sequences, so a
wave is cut into *groups* of tiles that share it, each one call over the wave's whole query hull::

    wave hull rows 0..9, tiles t1 (rows 0-3) and t2 (rows 6-9) of one window:
      q_lens  4 2 4      the 2 rows between the tiles are a sequence with no keys: the kernel leaves them
      k_lens  k1 0 k2    out 0 (and an empty lse), so the call's result covers the hull and pieces add up

Keys of a group are a contiguous slice of the key hull when the tiles' keys come in order, else the
concatenation of each tile's key run (``k_runs``), gathered for the call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ringpack.backends.common import staged
from ringpack.schedule import Runs, Tile, Wave, prefix_sums


@dataclass(frozen=True)
class VarlenGroup:
    """One varlen kernel call over the wave's query hull.

    ``q_lens``/``k_lens`` are the sequences of the call, in order; a sequence with ``k_len == 0`` covers query rows
    that this group does not compute, one with ``q_len == 0`` skips keys. With ``k_runs`` set, keys are gathered: the
    call's key buffer is the concatenation of the source rows ``[start, start + len)`` of each run, in order;
    otherwise it is the contiguous slice of the wave's key hull starting at ``k_offset``.
    """

    left: int  # the tiles' bottom-right window, -1 unbounded
    right: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    k_offset: int  # first key row (relative to the wave's key hull) of a contiguous key buffer
    k_runs: Runs | None  # gathered key runs (relative to the key hull), or None

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_k(self) -> int:
        return max(self.k_lens)

    @property
    def total_k(self) -> int:
        return sum(self.k_lens)

    def keys(self, k0: int) -> slice | Runs:
        """Where the call's key rows lie in the source's buffer, for a wave whose key hull starts at ``k0``."""
        if self.k_runs is None:
            return slice(k0 + self.k_offset, k0 + self.k_offset + self.total_k)
        return tuple((k0 + s, n) for s, n in self.k_runs)

    def fa2_window(self) -> tuple[int, int, int]:
        """``(left, right, max_k)`` for FlashAttention-2's varlen kernels, whose host code rewrites windows.

        FA2 turns an unbounded right side next to a bounded left one into ``right = max_k``, and with bottom-right
        alignment that hides keys from the first rows of a sequence with more queries than ``max_k + 1``: bound it
        explicitly instead (``right = max_q - 1`` covers every key of every row). And it reads a side ``>= max_k``
        as unbounded: keep ``max_k`` above every bound set here."""
        left, right = self.left, self.right
        if left >= 0 and right == -1:
            right = self.max_q - 1
        return left, right, max(self.max_k, left + 1, right + 1)


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
    return VarlenGroup(tiles[0].left, tiles[0].right, tuple(q_lens), tuple(k_lens), tiles[0].k_start - k_span[0],
                       None if contiguous else tuple(runs))


@functools.lru_cache(maxsize=4096)
def varlen_groups(wave: Wave) -> tuple[VarlenGroup, ...]:
    """The varlen calls that compute ``wave``: one per distinct (left, right) window of its tiles.

    Cached: a plan is reused by every layer, so each wave is laid out once (host tuples only)."""
    by_window: dict[tuple[int, int], list[Tile]] = {}
    for tile in wave.tiles:
        by_window.setdefault((tile.left, tile.right), []).append(tile)
    return tuple(_group(tiles, wave.q_span, wave.k_span) for tiles in by_window.values())


@functools.lru_cache(maxsize=4096)
def cu_seqlens_on(group: VarlenGroup, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 ``cu_seqlens_q`` and ``cu_seqlens_k`` of a varlen call on ``device``, staged once.

    A plan is reused by every layer of a step, so each group's tables are copied to the device once instead of
    twice per call (a pinned staging copy each, host time that a small ring step feels)."""
    return tuple(staged(torch.tensor(prefix_sums(lens), dtype=torch.int32), device)
                 for lens in (group.q_lens, group.k_lens))


def call_keys(k_hull: torch.Tensor, group: VarlenGroup) -> torch.Tensor:
    """The key (or value) buffer of one call: a view when contiguous, else the gathered runs."""
    if group.k_runs is None:
        return k_hull[group.k_offset:group.k_offset + group.total_k]
    return torch.cat([k_hull[s:s + n] for s, n in group.k_runs])
