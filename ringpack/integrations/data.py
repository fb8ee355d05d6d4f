"""The data side of context-parallel training over ``world = dp x cp`` ranks (no framework import).

Every rank of a context-parallel (CP) group must run the same packed batch, each on its own shard of the
tokens; the data-parallel (DP) dimension runs different packs::

    world 4, cp 2:   CP groups {0, 1} {2, 3}     DP rank = rank // cp     CP rank = rank % cp
    sampler:  packs p0 p1 p2 p3 ... (multipack; order shuffled per epoch, the same on every rank)
              DP rank 0 -> p0 p2 p4 ...      DP rank 1 -> p1 p3 p5 ...     (both CP ranks of a group alike)
    collator: a pack's samples -> the global packed row (an inner collate_fn) -> this CP rank's shard

:class:`ContextParallelBatchSampler` is the sampler and :class:`RingpackCollator` the collator; the collator
also leaves a :class:`PackShard` under ``batch["ringpack"]``, from which the training step makes the batch's
``RingpackContext`` without planning again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ringpack.integrations.batch import batch_digest, packed_batch
from ringpack.packing import multipack, packing_efficiency, shard_batch
from ringpack.plan import Plan, make_plan

SHARD_KEY = "ringpack"  # the batch entry holding the PackShard


@dataclass(frozen=True, eq=False)
class PackShard:
    """What a rank needs besides its tokens to run a pack."""

    plan: Plan = field(repr=False)  # the layout plan the tokens were sharded with (global cu_seqlens, CP size)
    rank: int  # the CP rank this shard belongs to
    digest: int  # batch_digest of the global pack as the inner collator made it (0: not computed)


class ContextParallelBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler for ``world = dp x cp``: each batch is one pack of at most ``max_tokens`` tokens, the same
    on every CP rank of a DP rank, a different one on every DP rank.

    ``lengths[i]`` is the token count of sample ``i``. The packs are made once (:func:`ringpack.multipack`);
    each epoch orders them (a permutation from ``seed + epoch`` with ``shuffle``), and DP rank ``d`` takes
    every ``dp_size``-th pack from the ``d``-th. So that every DP rank takes as many steps, the last packs are
    dropped (``drop_last``) or the order is wrapped around to fill the last round.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be an integer in [0, {dp_size}), got {dp_rank!r}")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens = max_tokens
        self.packs = multipack(self.lengths, max_tokens)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        if len(self.packs) < dp_size and (drop_last or not self.packs):
            raise ValueError(f"{len(self.packs)} packs of <= {max_tokens} tokens cannot give each of {dp_size} "
                             "data-parallel ranks one; use more samples or a smaller max_tokens")

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.lengths, self.packs, self.max_tokens)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.packs)
        return n // self.dp_size if self.drop_last else -(-n // self.dp_size)

    def __iter__(self):
        n = len(self.packs)
        order = list(range(n))
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        rounds = len(self)
        order = (order * -(-rounds * self.dp_size // n))[:rounds * self.dp_size]
        for p in order[self.dp_rank::self.dp_size]:
            yield list(self.packs[p])


class RingpackCollator:
    """``collate_fn``: a pack's samples -> the global packed row (``collate_fn``) -> this CP rank's shard.

    ``collate_fn`` makes one packed row: ringpack's ``PackingCollator``, transformers'
    ``DataCollatorWithFlattening`` or TRL's padding-free collator (what it returns is read by
    :func:`ringpack.integrations.batch.packed_batch`, with ``labels_shifted``). The result holds this rank's
    ``[1, N]`` token tensors, ``shift_labels`` and ``labels`` (both the shifted targets, sharded), and the
    :class:`PackShard` under ``"ringpack"``. The plan is the layout plan for ``causal`` and ``window_size``.
    """

    def __init__(self, collate_fn: Callable, *, cp_rank: int = 0, cp_size: int = 1, strategy: str = "balanced",
                 causal: bool = True, window_size: tuple[int, int] = (-1, -1), labels_shifted: bool | None = None):
        self.collate_fn = collate_fn
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.strategy, self.causal, self.window_size = strategy, causal, window_size
        self.labels_shifted = labels_shifted

    def __call__(self, samples: Sequence) -> dict:
        batch = self.collate_fn(samples)
        pack = packed_batch(batch, labels_shifted=self.labels_shifted)
        plan = make_plan(pack["cu_seqlens"], self.cp_size, strategy=self.strategy, causal=self.causal,
                         window_size=self.window_size)
        local = shard_batch(pack, plan, self.cp_rank)
        out = {key: value for key, value in local.items() if key != "cu_seqlens"}
        if "shift_labels" in out:
            out["labels"] = out["shift_labels"]
        out[SHARD_KEY] = PackShard(plan, self.cp_rank, batch_digest(batch))
        return out
