"""DeepSpeed: ring attention under Ulysses (``DistributedAttention``), and in ``deepspeed.initialize`` jobs.

(a) Ulysses x ring. The ranks form a grid: a *ring group* (context parallel, ringpack) and a *Ulysses
group* (head all-to-all, DeepSpeed). Ring rank ``r`` owns the tokens ``ringpack.shard(x, plan, r)``; the
Ulysses ranks that share ``r`` split that shard into equal contiguous pieces (the last padded), which is
what each of them feeds to the model. DeepSpeed's all-to-all then gives every Ulysses rank the whole
shard for ``H / U`` heads, and :class:`RingLocalAttention` runs the ring over the ring group on it::

    ring rank r's shard (plan order):  [ t0 t1 t2 t3 t4 | pad ]     U = 2 Ulysses ranks, piece = 3 tokens
    Ulysses rank 0 holds t0 t1 t2,  Ulysses rank 1 holds t3 t4 pad  (all heads)
    after the all-to-all: both hold t0..t4 pad, rank 0 heads [0, H/2), rank 1 heads [H/2, H)
    RingLocalAttention drops the pad, runs the ring on t0..t4, returns zeros for the pad rows

(b) ``deepspeed.initialize(..., config={"sequence_parallel_size": P, ...}, mpu=sequence_parallel_mpu(P))``:
DeepSpeed's sequence-parallel groups (its ``parallel_state_sp`` module) give ring attention its group
(``engine.get_sequence_parallel_group()``), e.g. through the transformers integration. DeepSpeed
all-reduces gradients over the sequence x data ranks and divides by the data-parallel size only, so a
per-rank loss equal to this rank's share of the global mean (``num_items_in_batch``) gives exactly the
single-process gradient. (A config with ``"data_parallel_size"`` builds a device mesh instead, whose
gradient reduction spans only the data-parallel ranks: sequence-parallel shares would not be summed.)

Legend: ``S`` tokens after the all-to-all, ``B`` batch (1), ``h`` local heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from deepspeed.runtime.sequence_parallel import parallel_state_sp
from deepspeed.sequence.layer import DistributedAttention

from ringpack.integrations.context import RingpackContext
from ringpack.packing import IGNORE_INDEX, count_targets
from ringpack.sharding import shard

# Fill values for the pad tokens of a Ulysses piece: they carry no target and sit at position 0.
PAD_VALUES = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0}


@dataclass(frozen=True, eq=False)
class UlyssesRing:
    """One packed batch on a Ulysses x ring grid: the ring's per-batch context and the Ulysses group."""

    context: RingpackContext  # the batch over the ring (context-parallel) group
    ulysses_group: dist.ProcessGroup | None  # the head all-to-all group of DistributedAttention
    ulysses_rank: int = field(init=False)
    ulysses_size: int = field(init=False)

    def __post_init__(self):
        initialized = dist.is_available() and dist.is_initialized()
        object.__setattr__(self, "ulysses_rank", dist.get_rank(self.ulysses_group) if initialized else 0)
        object.__setattr__(self, "ulysses_size", dist.get_world_size(self.ulysses_group) if initialized else 1)

    @property
    def ring_tokens(self) -> int:
        """Tokens of this ring rank's shard (before padding)."""
        return self.context.plan().num_tokens[self.context.rank]

    @property
    def piece(self) -> int:
        """Tokens each Ulysses rank holds: the ring shard split into ``ulysses_size`` equal pieces, rounded up."""
        return -(-self.ring_tokens // self.ulysses_size)

    def shard(self, x: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
        """This rank's piece ``[piece, ...]`` of a global packed tensor ``[T, ...]``; pad rows hold ``pad_value``."""
        local = shard(x, self.context.plan(), self.context.rank)
        padded = torch.full((self.piece * self.ulysses_size, *local.shape[1:]), pad_value, dtype=local.dtype,
                            device=local.device)
        padded[:local.shape[0]] = local
        return padded[self.ulysses_rank * self.piece:(self.ulysses_rank + 1) * self.piece]

    def shard_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's piece of a packed batch (``PackingCollator`` output): ``[1, piece]`` tensors, plus
        ``num_items_in_batch``, the global target count (the loss denominator)."""
        out = {}
        for key, value in batch.items():
            if key == "cu_seqlens":
                continue
            if key not in PAD_VALUES:
                raise ValueError(f"UlyssesRing.shard_batch: unknown batch entry {key!r}; supported: "
                                 f"{', '.join(PAD_VALUES)}, cu_seqlens")
            if value.dim() != 2 or value.shape[0] != 1:
                raise ValueError(f"batch[{key!r}] must be one packed row [1, T], got shape {tuple(value.shape)}")
            out[key] = self.shard(value[0], PAD_VALUES[key])[None]
        if "labels" in batch:
            out["num_items_in_batch"] = count_targets(batch["labels"])
        return out


class RingLocalAttention(torch.nn.Module):
    """The ``local_attention`` of ``DistributedAttention``: ring attention over the ring group.

    ``forward(q, k, v, *, grid, causal=True, window_size=(-1, -1), softmax_scale=None, softcap=0.0)`` takes
    the tensors DeepSpeed's all-to-all produced, ``[S, B, h, D]`` (``seq_dim=0``, DistributedAttention's
    default ``gather_idx=0``) or ``[B, S, h, D]`` (``seq_dim=1``), with ``B == 1`` and ``S`` the padded
    ring shard. Returns the same layout (heads not merged) so that DistributedAttention can scatter the
    heads back; pad rows of the output are zero.
    """

    def __init__(self, *, seq_dim: int = 0):
        super().__init__()
        if seq_dim not in (0, 1):
            raise ValueError(f"seq_dim must be 0 ([S, B, h, D]) or 1 ([B, S, h, D]), got {seq_dim!r}")
        self.seq_dim = seq_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: UlyssesRing, causal: bool = True,
                window_size: tuple[int, int] = (-1, -1), softmax_scale: float | None = None,
                softcap: float = 0.0) -> torch.Tensor:
        batch_dim = 1 - self.seq_dim
        if q.dim() != 4 or q.shape[batch_dim] != 1:
            raise ValueError(f"RingLocalAttention takes one packed row: 4-D tensors with batch size 1 at dim "
                             f"{batch_dim}, got query shape {tuple(q.shape)}")
        padded = grid.piece * grid.ulysses_size
        if q.shape[self.seq_dim] != padded:
            raise ValueError(f"RingLocalAttention got {q.shape[self.seq_dim]} tokens after the all-to-all, the grid "
                             f"expects {padded} (ring shard {grid.ring_tokens} padded for {grid.ulysses_size} "
                             "Ulysses ranks); shard the inputs with UlyssesRing.shard")
        n = grid.ring_tokens
        q_NHD, k_NKD, v_NKD = (t.select(batch_dim, 0)[:n] for t in (q, k, v))
        out = grid.context.attention(q_NHD, k_NKD, v_NKD, causal=causal, window_size=window_size,
                                     softmax_scale=softmax_scale, softcap=softcap)
        out = torch.cat([out, out.new_zeros(padded - n, *out.shape[1:])])
        return out.unsqueeze(batch_dim)


def ulysses_ring_attention(ulysses_group: dist.ProcessGroup, *, seq_dim: int = 0) -> DistributedAttention:
    """``DistributedAttention`` (Ulysses over ``ulysses_group``) whose local attention is :class:`RingLocalAttention`.

    Call it as ``attn(q, k, v, batch_dim_idx, grid=grid, causal=..., ...)`` with ``q [piece, 1, H, D]``
    (``seq_dim=0``) from :meth:`UlyssesRing.shard`; ``H`` and ``Hk`` must be divisible by the Ulysses size.
    """
    scatter, gather = (2, 0) if seq_dim == 0 else (2, 1)
    return DistributedAttention(RingLocalAttention(seq_dim=seq_dim), ulysses_group, scatter_idx=scatter,
                                gather_idx=gather)


def sequence_parallel_mpu(sequence_parallel_size: int):
    """Build DeepSpeed's sequence-parallel groups (consecutive ranks) and return the ``mpu`` for ``initialize``.

    Pass the result as ``deepspeed.initialize(..., mpu=...)``; ``engine.get_sequence_parallel_group()`` is
    then the group for :class:`RingpackContext`.
    """
    if isinstance(sequence_parallel_size, bool) or not isinstance(sequence_parallel_size, int) \
            or sequence_parallel_size < 2:
        raise ValueError(f"sequence_parallel_size must be an integer >= 2, got {sequence_parallel_size!r}")
    parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size)
    return parallel_state_sp
