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


@functools.lru_cache(maxsize=4096)
def varlen_groups(wave: Wave) -> tuple[VarlenGroup, ...]:
    """The varlen calls that compute ``wave``: one per distinct (left, right) window of its tiles, in the order the
    windows first appear; each group's tiles in query order.

    Read from the wave's table in bulk (a zigzag wave holds hundreds of thousands of tiles, and no ``Tile`` object
    is made here). Per tile, in query order: the rows since the group's previous tile (a sequence with no keys),
    the keys skipped since its previous tile's keys when the group's keys come in order (a sequence with no rows),
    then the tile itself; after the last tile, the rows left to the end of the wave's query hull.

    Cached: a plan is reused by every layer, so each wave is laid out once (host tuples only)."""
    n = len(wave)
    if n == 0:
        return ()
    t = torch.frombuffer(bytearray(wave.table), dtype=torch.int64).view(n, len(Tile._fields))
    q0, q_len, k0, k_len, left, right = (t[:, Tile._fields.index(f)] for f in _GROUP_FIELDS)
    # groups: the distinct windows, numbered in order of first appearance; tiles sorted by (group, query row)
    span = int(right.max()) + 2  # one key per window (sides >= -1); a 1-d unique is far faster than unique(dim=0)
    keys, inverse = torch.unique((left + 1) * span + right + 1, return_inverse=True)
    windows = torch.stack([keys // span - 1, keys % span - 1], 1)
    first = torch.full((len(windows),), n, dtype=torch.int64).scatter_reduce(0, inverse, torch.arange(n), "amin")
    by_first = torch.argsort(first)
    number = torch.empty_like(first)
    number[by_first] = torch.arange(len(windows))
    group = number[inverse]
    order = torch.argsort(q0, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    group, q0, q_len, k0, k_len = (x[order] for x in (group, q0, q_len, k0, k_len))
    q_end, k_end = q0 + q_len, k0 + k_len
    opens = torch.ones(n, dtype=torch.bool)  # the first tile of its group
    opens[1:] = group[1:] != group[:-1]
    closes = torch.ones(n, dtype=torch.bool)  # the last one
    closes[:-1] = opens[1:]
    prev_q_end = torch.where(opens, wave.q_span[0], torch.roll(q_end, 1))
    prev_k_end = torch.where(opens, k0, torch.roll(k_end, 1))
    in_order = torch.ones(len(windows), dtype=torch.bool).scatter_reduce(0, group, prev_k_end <= k0, "amin")
    zero = torch.zeros_like(q0)
    q_gap, k_gap = q0 - prev_q_end, torch.where(in_order[group], k0 - prev_k_end, zero)
    tail = torch.where(closes, wave.q_span[1] - q_end, zero)
    # four sequences per tile, kept where not empty: rows skipped, keys skipped, the tile, rows left at the end
    keep = torch.stack([q_gap > 0, k_gap > 0, torch.ones_like(opens), tail > 0], 1)
    q_seq, k_seq = torch.stack([q_gap, zero, q_len, tail], 1)[keep], torch.stack([zero, k_gap, k_len, zero], 1)[keep]
    counts = torch.zeros(len(windows), dtype=torch.int64).scatter_add(0, group, keep.sum(1)).tolist()
    per_group = torch.bincount(group, minlength=len(windows)).tolist()
    runs = zip(torch.split(k0 - wave.k_span[0], per_group), torch.split(k_len, per_group))
    first_k = (k0[opens] - wave.k_span[0]).tolist()
    ordered = in_order.tolist()
    return tuple(VarlenGroup(left_, right_, tuple(ql.tolist()), tuple(kl.tolist()), first_k[g],
                             None if ordered[g] else tuple(zip(rs.tolist(), rl.tolist())))
                 for g, ((left_, right_), ql, kl, (rs, rl)) in enumerate(zip(windows[by_first].tolist(),
                                                                    torch.split(q_seq, counts),
                                                                    torch.split(k_seq, counts), runs)))


_GROUP_FIELDS = ("q_start", "q_len", "k_start", "k_len", "left", "right")


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
