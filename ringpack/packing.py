"""Packing: conversions between ``cu_seqlens``, lengths and ``position_ids``; packing training data.

Packed Hugging Face batches carry ``position_ids`` that restart at 0 at every document; the first
helpers turn them into the boundaries ringpack plans with, and back. The rest packs a dataset of
variable-length samples into rows of at most ``max_tokens`` (multipack), collates a pack into
``input_ids`` / ``labels`` / ``position_ids`` / ``cu_seqlens``, and gives each rank its tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import torch

from ringpack.plan import MAX_TOKENS, Plan, validate_cu_seqlens
from ringpack.sharding import shard
from ringpack.validation import boolean, integer, integers


def lengths_to_cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """Document lengths -> int32 ``cu_seqlens`` ``[n_docs + 1]`` (zero lengths allowed).

    Lengths must be integers (a float or a bool is refused, not truncated) adding up to at most 2**31 - 1
    tokens: int32 boundaries past that would wrap around."""
    lengths = integers("document lengths", lengths, minimum=0)
    total = sum(lengths)
    if total > MAX_TOKENS:
        raise ValueError(f"document lengths add up to {total} tokens; cu_seqlens is int32, so at most {MAX_TOKENS}")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return cu


def cu_seqlens_to_lengths(cu_seqlens: Sequence[int] | torch.Tensor) -> list[int]:
    """``cu_seqlens`` -> document lengths."""
    cu = validate_cu_seqlens(cu_seqlens)
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def cu_seqlens_to_position_ids(cu_seqlens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` -> int64 ``[T]`` positions restarting at 0 at every document."""
    cu = validate_cu_seqlens(cu_seqlens)
    total = cu[-1]
    starts = torch.tensor(cu[:-1], dtype=torch.int64)
    lengths = torch.tensor(cu_seqlens_to_lengths(cu), dtype=torch.int64)
    return torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, lengths, output_size=total)


def position_ids_to_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document (``[T]`` or ``[1, T]``) -> int32 ``cu_seqlens``.

    A new document starts wherever the position is 0. Positions must count up by one inside a
    document; anything else (a batch of several rows, gaps) is rejected rather than guessed at.
    Zero-length documents cannot be expressed by positions and never appear in the result.
    """
    if not isinstance(position_ids, torch.Tensor):
        raise ValueError(f"position_ids must be an integer tensor [T] or [1, T], got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must be an integer tensor (int32 or int64), got dtype {position_ids.dtype}")
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must be [T] or [1, T] (one packed row), got shape {tuple(position_ids.shape)}")
    pos = position_ids.to(device="cpu", dtype=torch.int64)
    if pos.numel() == 0:
        return torch.zeros(1, dtype=torch.int32)
    if pos[0] != 0:
        raise ValueError(f"position_ids must start at 0 (a document start), got {int(pos[0])}")
    starts = torch.nonzero(pos == 0).flatten()
    steps_ok = (pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)
    if not bool(steps_ok.all()):
        bad = int(torch.nonzero(~steps_ok)[0]) + 1
        raise ValueError(f"position_ids must count up by 1 inside a document and restart at 0; "
                         f"index {bad} has {int(pos[bad])} after {int(pos[bad - 1])}")
    return torch.cat([starts, torch.tensor([pos.numel()])]).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------
# Packing training data: multipack bin packing, a collator, and per-rank sharding of a packed batch.
# A "batch" here is one packed row: input_ids / labels / position_ids ``[1, T]`` and cu_seqlens ``[n + 1]``.

IGNORE_INDEX = -100


def multipack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bin-pack samples of ``lengths`` into packs of at most ``max_tokens`` tokens (best-fit decreasing).

    Samples are placed longest first, each into the pack it fills most tightly (a new pack when none has
    room); ties go to the earlier pack, so the result is deterministic. Returns each pack's sample indices,
    packs ordered by creation, indices inside a pack in placement order. Best-fit decreasing never uses more
    packs than first-fit decreasing's bound (11/9 OPT + 6/9).
    """
    max_tokens = integer("max_tokens", max_tokens, minimum=1)
    lengths = integers("lengths", lengths)
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_tokens:
            raise ValueError(f"sample {i} has {n} tokens; every sample must have 1..max_tokens={max_tokens} "
                             "tokens (truncate or split long samples before packing)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, pack id), sorted: the tightest fit is found by bisection
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            packs.append([i])
            free, pid = max_tokens - n, len(packs) - 1
        else:
            free, pid = room.pop(at)
            packs[pid].append(i)
            free -= n
        if free:
            bisect.insort(room, (free, pid))
    return packs


def packing_efficiency(lengths: Sequence[int], packs: Sequence[Sequence[int]], max_tokens: int) -> float:
    """Fraction of the packs' capacity (``len(packs) * max_tokens``) filled with sample tokens."""
    if not packs:
        return 0.0
    return sum(int(lengths[i]) for p in packs for i in p) / (len(packs) * max_tokens)


class MultipackBatchSampler(torch.utils.data.Sampler[list[int]]):
    """A ``DataLoader`` batch sampler whose every batch is one pack of at most ``max_tokens`` tokens.

    ``lengths[i]`` is the token count of dataset sample ``i``. The packs are computed once
    (:func:`multipack`); with ``shuffle=True`` their order is permuted each epoch from ``seed + epoch``
    (call :meth:`set_epoch`). ``efficiency`` reports how full the packs are.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, shuffle: bool = False, seed: int = 0):
        self.lengths = integers("lengths", lengths)
        self.max_tokens = integer("max_tokens", max_tokens, minimum=1)
        self.packs = multipack(self.lengths, self.max_tokens)
        self.shuffle = boolean("shuffle", shuffle)
        self.seed = integer("seed", seed)
        self.epoch = 0

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.lengths, self.packs, self.max_tokens)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = integer("epoch", epoch, minimum=0)

    def __len__(self) -> int:
        return len(self.packs)

    def __iter__(self):
        order = range(len(self.packs))
        if self.shuffle:
            order = torch.randperm(len(self.packs), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for p in order:
            yield list(self.packs[int(p)])


def shift_labels(labels: torch.Tensor, cu_seqlens: Sequence[int] | torch.Tensor,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets per document: ``out[t] = labels[t + 1]`` inside a document, ``ignore_index`` at its end.

    Done on the global pack, before sharding, so no target crosses a document boundary and none is lost
    where a rank's shard ends.
    """
    cu = validate_cu_seqlens(cu_seqlens)
    if labels.dim() != 1 or labels.shape[0] != cu[-1]:
        raise ValueError(f"labels must be [T] with T = cu_seqlens[-1] = {cu[-1]}, got shape {tuple(labels.shape)}")
    out = torch.full_like(labels, ignore_index)
    out[:-1] = labels[1:]
    ends = torch.tensor([b - 1 for a, b in zip(cu[:-1], cu[1:]) if b > a], dtype=torch.long)
    out[ends] = ignore_index
    return out


class PackingCollator:
    """``collate_fn`` that concatenates a list of samples into one packed row with per-document labels.

    A sample is a sequence of token ids, a 1-D integer tensor, or a mapping with ``"input_ids"`` and
    optionally ``"labels"`` (same length; ``ignore_index`` marks tokens not to learn, e.g. a prompt).
    Labels default to the input ids. Returns ``input_ids``, ``labels`` (already shifted per document:
    pass them to a loss as next-token targets, with no further shift), ``position_ids`` (all ``[1, T]``,
    int64) and ``cu_seqlens`` (int32 ``[n + 1]``). ``max_tokens`` (optional) rejects packs that are too long.
    """

    def __init__(self, *, max_tokens: int | None = None, ignore_index: int = IGNORE_INDEX):
        self.max_tokens = None if max_tokens is None else integer("max_tokens (None for no limit)", max_tokens,
                                                                  minimum=1)
        self.ignore_index = integer("ignore_index", ignore_index)

    def __call__(self, samples: Sequence) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for i, sample in enumerate(samples):
            x, y = _sample_tensors(sample, i)
            ids.append(x)
            labels.append(y)
        cu = lengths_to_cu_seqlens([len(x) for x in ids])
        total = int(cu[-1])
        if self.max_tokens is not None and total > self.max_tokens:
            raise ValueError(f"the pack has {total} tokens, more than max_tokens={self.max_tokens}; "
                             "batch samples with MultipackBatchSampler(lengths, max_tokens)")
        input_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        raw = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        return {
            "input_ids": input_ids[None],
            "labels": shift_labels(raw, cu, self.ignore_index)[None],
            "position_ids": cu_seqlens_to_position_ids(cu)[None],
            "cu_seqlens": cu,
        }


def _sample_tensors(sample, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(sample, Mapping):
        if "input_ids" not in sample:
            raise ValueError(f"sample {index} is a mapping without 'input_ids' (keys: {sorted(sample)})")
        unknown = set(sample) - {"input_ids", "labels"}
        if unknown:
            raise ValueError(f"sample {index} has keys {sorted(unknown)}; the collator takes 'input_ids' and "
                             "optionally 'labels'")
        ids = _token_ids(sample["input_ids"], f"sample {index}")
        labels = _token_ids(sample["labels"], f"sample {index} labels") if "labels" in sample else ids
    else:
        ids = labels = _token_ids(sample, f"sample {index}")
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"sample {index} must be a non-empty 1-D list of token ids, got shape {tuple(ids.shape)}")
    if labels.shape != ids.shape:
        raise ValueError(f"sample {index}: labels have shape {tuple(labels.shape)}, input_ids {tuple(ids.shape)}")
    return ids, labels


def _token_ids(values, what: str) -> torch.Tensor:
    """Token ids as an int64 tensor; floats and bools are refused (``as_tensor(dtype=long)`` would truncate them)."""
    try:
        ids = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} must be a 1-D list or tensor of integer token ids, got {type(values).__name__}"
                         ) from None
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    return ids.long()


def shard_batch(batch: Mapping[str, torch.Tensor], plan: Plan, rank: int) -> dict[str, torch.Tensor]:
    """This rank's tokens of a packed batch (from :class:`PackingCollator`), in the plan's local order.

    Every tensor of shape ``[1, T]`` or ``[T]`` is sharded along its token dimension (``T`` = the plan's
    tokens); ``cu_seqlens`` stays global and must be the plan's. Shifted labels travel with their tokens,
    so a label next to a rank boundary is kept. Any other entry is rejected rather than passed on unsharded.
    """
    total = plan.total_tokens
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key == "cu_seqlens":
            if validate_cu_seqlens(value) != plan.cu_seqlens:
                raise ValueError("batch['cu_seqlens'] differs from the plan's cu_seqlens; make the plan from "
                                 "this batch's cu_seqlens")
            out[key] = value
        elif isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == total:
            out[key] = shard(value, plan, rank)
        elif isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, total):
            out[key] = shard(value[0], plan, rank)[None]
        else:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"shard_batch: batch[{key!r}] is {shape}; expected a tensor of shape [1, {total}] or "
                             f"[{total}] (one packed row of the plan's tokens) or 'cu_seqlens'")
    return out


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of tokens that carry a target (the loss denominator of the global pack)."""
    return int((labels != ignore_index).sum())
