"""The mask rule of a document, as a diagonal band, and its pair count. Every other module asks here.

Key position ``j`` is visible to query position ``i`` of the same document iff ``causal => j <= i``
and ``i - left <= j <= i + right`` (``window_size=(left, right)``, ``-1`` unbounded).
"""

from __future__ import annotations


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


def clipped_band(q_offset: int, q_len: int, k_offset: int, k_len: int, causal: bool,
                 window: tuple[int, int]) -> tuple[int, int] | None:
    """``band`` clipped to ``q_len`` query rows x ``k_len`` keys (``1 - q_len <= lo <= hi <= k_len - 1``), in ints;
    None when no pair of the rectangle is visible. The same rule as ``band``, without its infinities: a plan asks
    this for every segment pair it schedules."""
    delta = q_offset - k_offset
    left, right = window
    lo, hi = 1 - q_len, k_len - 1
    if causal and delta < hi:
        hi = delta
    if right >= 0 and delta + right < hi:
        hi = delta + right
    if left >= 0 and delta - left > lo:
        lo = delta - left
    return (lo, hi) if lo <= hi else None


def band_pairs(q_len: int, k_len: int, lo: float, hi: float) -> int:
    """Number of (a, b) in ``[0, q_len) x [0, k_len)`` with ``lo <= b - a <= hi``, in O(1)."""
    if q_len <= 0 or k_len <= 0 or lo > hi:
        return 0
    upto_hi = q_len * k_len if hi == float("inf") else _pairs_below(q_len, k_len, int(hi) + 1)
    return upto_hi - (0 if lo == float("-inf") else _pairs_below(q_len, k_len, int(lo)))


def _pairs_below(q_len: int, k_len: int, c: int) -> int:
    """Pairs with ``b - a < c``: the sum over ``a`` of ``clamp(a + c, 0, k_len)``."""
    first = min(max(1 - c, 0), q_len)  # from here on a + c >= 1
    last = min(max(k_len - c, 0), q_len)  # from here on a + c >= k_len (last >= first as k_len >= 1)
    return (last - first) * c + (first + last - 1) * (last - first) // 2 + (q_len - last) * k_len
