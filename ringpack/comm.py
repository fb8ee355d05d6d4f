"""Point-to-point exchange over a process group, in ring shifts. Knows nothing of attention.

A shift by ``s`` sends one buffer to rank ``r + s`` and receives one from rank ``r - s``. Both ends
know every size from the plan, so receive buffers are allocated without a size handshake, and empty
buffers are skipped on both ends. Every rank posts its shifts in the same order, which is all that
point-to-point matching (NCCL and gloo alike) needs.

With NCCL, the first point-to-point call on a group must include every rank unless the group's
communicator already exists (any earlier collective, or ``init_process_group(device_id=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Pending:
    """An exchange in flight: ``wait()`` returns the received buffer (empty when nothing was due)."""

    works: list
    recv: torch.Tensor
    send: torch.Tensor | None  # kept alive until the exchange completes

    def wait(self) -> torch.Tensor:
        try:
            for w in self.works:
                w.wait()  # bounded by the process group's timeout
        except RuntimeError as e:
            raise exchange_failed(e) from e
        self.works, self.send = [], None
        return self.recv


def exchange_failed(e: Exception) -> RuntimeError:
    """The error every rank raises when an exchange fails: a peer died (gloo: "Connection closed by peer"),
    stalled past the timeout, or posted a different sequence of messages."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return RuntimeError(f"ringpack: ring exchange failed on rank {rank}: a neighbouring rank died, stalled past the "
                        f"process-group timeout, or runs a different plan ({type(e).__name__}: {e})")


class Ring:
    """The ranks of a process group in ring order; ``shift`` exchanges with the ranks ``s`` ahead and behind."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
        else:
            self.rank, self.size = 0, 1

    @classmethod
    def local(cls) -> Ring:
        """A one-rank ring that never communicates: runs a ``world_size=1`` plan inside any job."""
        ring = cls.__new__(cls)
        ring.group, ring.rank, ring.size = None, 0, 1
        return ring

    def _global(self, group_rank: int) -> int:
        if self.size == 1 or self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def shift(self, send: torch.Tensor | None, shift: int, recv_shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> Pending:
        """Start sending ``send`` to rank ``r + shift`` and receiving a ``recv_shape`` buffer from ``r - shift``."""
        ops = []
        recv = torch.empty(recv_shape, dtype=dtype, device=device)
        send = send.contiguous() if send is not None and send.numel() else None
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self._global((self.rank + shift) % self.size),
                                  self.group))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, self._global((self.rank - shift) % self.size), self.group))
        try:
            works = dist.batch_isend_irecv(ops) if ops else []
        except RuntimeError as e:  # a peer already gone fails the post itself
            raise exchange_failed(e) from e
        return Pending(works, recv, send)
