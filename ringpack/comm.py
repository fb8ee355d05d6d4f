"""Ring neighbours and point-to-point exchange over a process group. Knows nothing of attention.

Every exchange sends one buffer to the next rank and receives one from the previous rank. Both
ends know every size from the plan, so receive buffers are allocated without a size handshake, and
empty buffers are skipped on both ends. Exchanges are posted in the same order on every rank, which
is all that point-to-point matching (NCCL and gloo alike) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Pending:
    """An exchange in flight: ``wait()`` returns the received buffer (None when nothing was received)."""

    works: list
    recv: torch.Tensor | None
    send: torch.Tensor | None  # kept alive until the exchange completes

    def wait(self) -> torch.Tensor | None:
        for w in self.works:
            w.wait()
        self.works, self.send = [], None
        return self.recv


class Ring:
    """The ring of a process group: rank ``r`` sends to ``r + 1`` and receives from ``r - 1``."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
        else:
            self.rank, self.size = 0, 1
        self.next = self._global((self.rank + 1) % self.size)
        self.prev = self._global((self.rank - 1) % self.size)

    @classmethod
    def local(cls) -> Ring:
        """A one-rank ring that never communicates: runs a ``world_size=1`` plan inside any job."""
        ring = cls.__new__(cls)
        ring.group, ring.rank, ring.size, ring.next, ring.prev = None, 0, 1, 0, 0
        return ring

    def _global(self, group_rank: int) -> int:
        if self.size == 1 or self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def exchange(self, send: torch.Tensor | None, recv_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> Pending:
        """Start sending ``send`` to the next rank and receiving a ``recv_shape`` buffer from the previous one."""
        ops = []
        recv = None
        if send is not None and send.numel():
            ops.append(dist.P2POp(dist.isend, send.contiguous(), self.next, self.group))
        if recv_shape and torch.Size(recv_shape).numel():
            recv = torch.empty(recv_shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
        elif recv_shape:
            recv = torch.empty(recv_shape, dtype=dtype, device=device)
        works = dist.batch_isend_irecv(ops) if ops else []
        return Pending(works, recv, send)
