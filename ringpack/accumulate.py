"""The one place where the pieces of a ring call meet: forward ``(out, lse)`` pieces are merged, gradient pieces
added, in fp32 (fp64 for fp64 inputs) or, where one rounding covers every addition, in the input dtype.

Legend: ``N`` rows of an accumulator (query rows, or key rows of one source); a piece covers ``rows`` (a slice)
or, for keys, ``Runs`` (``(start, length)`` runs laid end to end in the piece, possibly overlapping: each adds).

Fixed costs matter at a few thousand tokens per GPU, where every pass over an ``[N, H, D]`` buffer and every
kernel launch shows. So nothing is allocated until two pieces meet: the first piece that covers every row is
held as it is (a rank whose work is one kernel call returns that call's own tensors), and rows no piece has
reached yet are *written*, not merged or added, so pieces that tile the rows (documents on the diagonal) cost
one copy each and no zero fill. Writing a piece into an untouched row is exactly merging it with
``(0, -inf)`` or adding it to 0, so the results do not depend on the order pieces come in.

Round-once policy: a row reached by at most ``ROUND_ONCE_DEPTH`` pieces (``Plan.query_depth`` counts waves per
query row, ``Plan.key_depth`` tiles per key row) accumulates in the 16-bit input dtype when the pieces are exact
16-bit values: ``bf16(a + b)`` computed in fp32 and rounded once is bitwise what an fp32 accumulator rounded at the
end gives, with no fp32 buffer, pass or conversion. A forward merge computes in fp32 and rounds once too. Deeper
rows, or fp32 pieces (the reference kernel), accumulate in fp32.
"""

from __future__ import annotations

import bisect

import torch

from ringpack.merge import accumulation_dtype, merge_
from ringpack.schedule import Runs

ROUND_ONCE_DEPTH = 2


def storage_dtype(dtype: torch.dtype, depth: int, exact: bool = True) -> torch.dtype:
    """Where rows reached by ``depth`` pieces of ``dtype`` accumulate: ``dtype`` when the pieces are ``exact``
    ``dtype`` values and one rounding covers every addition, else fp32 (fp64 for fp64)."""
    return dtype if exact and depth <= ROUND_ONCE_DEPTH else accumulation_dtype(dtype)


class Coverage:
    """The rows of ``[0, n)`` that some piece has reached, as disjoint sorted ``[start, stop)`` intervals."""

    def __init__(self, n: int):
        self.n = n
        self.starts: list[int] = []
        self.stops: list[int] = []

    def complete(self) -> bool:
        return self.starts == [0] and self.stops == [self.n] or self.n == 0

    def mark(self, a: int, b: int) -> list[tuple[int, int]]:
        """Mark ``[a, b)`` reached; return its sub-ranges that were not reached before, in order."""
        if a >= b:
            return []
        i = bisect.bisect_right(self.stops, a - 1)  # first interval that ends at or after a (touching counts)
        j = bisect.bisect_left(self.starts, b + 1)  # intervals [i, j) touch or overlap [a, b]
        gaps, at = [], a
        for s, e in zip(self.starts[i:j], self.stops[i:j]):
            if s > at:
                gaps.append((at, min(s, b)))
            at = max(at, e)
        if at < b:
            gaps.append((at, b))
        lo = min([a, *self.starts[i:j]])
        hi = max([b, *self.stops[i:j]])
        self.starts[i:j], self.stops[i:j] = [lo], [hi]
        return gaps

    def unreached(self) -> list[tuple[int, int]]:
        """The rows no piece has reached."""
        out, at = [], 0
        for s, e in zip(self.starts, self.stops):
            if s > at:
                out.append((at, s))
            at = e
        return out + ([(at, self.n)] if at < self.n else [])


class Softmax:
    """Forward accumulator of one rank: ``out`` ``[N, H, D]`` and ``lse`` ``[H, N]``, merged exactly.

    ``store``: the dtype of the ``out`` buffer (the input's where ``Plan.query_depth`` allows, see
    ``storage_dtype``); the lse accumulates in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, q_NHD: torch.Tensor, store: torch.dtype):
        self.n, self.heads, self.dim = q_NHD.shape
        self.dtype, self.device, self.store = q_NHD.dtype, q_NHD.device, store
        self.lse_dtype = accumulation_dtype(q_NHD.dtype)
        self.seen = Coverage(self.n)
        self.held: tuple[torch.Tensor, torch.Tensor] | None = None  # a first piece covering every row, as it came
        self.out = self.lse = None

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge a piece: ``out`` ``[rows, H, D]``, ``lse`` ``[H, rows]`` (rows it does not compute: 0 and -inf)."""
        if self.out is None and self.held is None and (rows.start, rows.stop) == (0, self.n):
            self.held = (out, lse)
            self.seen.mark(0, self.n)
            return
        self._buffers()
        gaps = self.seen.mark(rows.start, rows.stop)
        if gaps == [(rows.start, rows.stop)]:
            self.out[rows] = out
            self.lse[:, rows] = lse
            return
        for a, b in gaps:
            self.out[a:b] = 0
            self.lse[:, a:b] = float("-inf")
        merge_(self.out[rows], self.lse[:, rows], out, lse)

    def _buffers(self) -> None:
        if self.out is not None:
            return
        if self.held is not None:
            out, lse = self.held
            self.out, self.lse, self.held = out.to(self.store), lse.to(self.lse_dtype), None
            return
        self.out = torch.empty((self.n, self.heads, self.dim), dtype=self.store, device=self.device)
        self.lse = torch.empty((self.heads, self.n), dtype=self.lse_dtype, device=self.device)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [N, H, D]`` in the input dtype, ``lse [H, N]`` fp32/fp64``)``, both contiguous; rows no piece
        reached see no key: out 0, lse -inf."""
        if self.held is not None:
            out, lse = self.held
        else:
            self._buffers()
            for a, b in self.seen.unreached():
                self.out[a:b] = 0
                self.lse[:, a:b] = float("-inf")
            out, lse = self.out, self.lse
        return out.to(self.dtype).contiguous(), lse.to(self.lse_dtype).contiguous()


class Sums:
    """Row-indexed sums of one or more tensors that share their rows (``dq``; or ``dk`` and ``dv``).

    ``like``: one tensor per sum, whose trailing shape and dtype the results take; ``store``: the dtype sums are
    kept in. ``message=True`` keeps the sums as the halves of one ``[len(like), N, ...]`` buffer, which is what
    the ring sends back to the rows' owner."""

    def __init__(self, n: int, like: tuple[torch.Tensor, ...], store: torch.dtype, *, message: bool = False):
        self.n, self.like, self.store, self.as_message = n, like, store, message
        self.seen = Coverage(n)
        self.held: tuple[torch.Tensor, ...] | None = None
        self.sums: tuple[torch.Tensor, ...] | None = None
        self.buffer: torch.Tensor | None = None  # the message buffer, with message=True

    def add(self, index: slice | Runs, *parts: torch.Tensor) -> None:
        """Add ``parts`` (one per sum) at ``index``: a slice of rows, or runs laid end to end in each part."""
        if isinstance(index, slice):
            self._add(index.start, index.stop, parts, 0)
            return
        at = 0
        for start, length in index:
            self._add(start, start + length, parts, at)
            at += length

    def _add(self, a: int, b: int, parts: tuple[torch.Tensor, ...], at: int) -> None:
        whole = at == 0 and b - a == parts[0].shape[0]
        if self.sums is None and self.held is None and (a, b) == (0, self.n) and whole and not self.as_message:
            self.held = parts
            self.seen.mark(0, self.n)
            return
        self._buffers()
        gaps = self.seen.mark(a, b)
        for dst, src in zip(self.sums, parts):
            piece = src[at:at + b - a]
            if gaps == [(a, b)]:
                dst[a:b] = piece
                continue
            for g0, g1 in gaps:
                dst[g0:g1] = 0
            dst[a:b] += piece

    def _buffers(self) -> None:
        if self.sums is not None:
            return
        if self.held is not None:
            self.sums, self.held = tuple(x.to(self.store) for x in self.held), None
            return
        like = self.like[0]
        if self.as_message:
            self.buffer = torch.empty((len(self.like), self.n, *like.shape[1:]), dtype=self.store, device=like.device)
            self.sums = tuple(self.buffer.unbind(0))
        else:
            self.sums = tuple(torch.empty((self.n, *x.shape[1:]), dtype=self.store, device=x.device)
                              for x in self.like)

    def _filled(self) -> tuple[torch.Tensor, ...]:
        if self.held is not None:
            return self.held
        self._buffers()
        for a, b in self.seen.unreached():
            for dst in self.sums:
                dst[a:b] = 0
        return self.sums

    def result(self) -> tuple[torch.Tensor, ...]:
        """The sums in the dtypes of ``like``, contiguous; zero where nothing was added."""
        return tuple(s.to(x.dtype).contiguous() for s, x in zip(self._filled(), self.like))

    def message(self) -> torch.Tensor:
        """The ``[len(like), N, ...]`` buffer of the sums in the ``store`` dtype (``message=True``)."""
        assert self.as_message, "Sums.message needs message=True"
        self._filled()
        return self.buffer
