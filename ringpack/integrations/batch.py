"""Packed batches as the data pipelines of Hugging Face and ringpack produce them, and a check that every rank
of a context-parallel group holds the same one.

Two kinds of packed batch exist (one row of documents, all tensors ``[1, T]``):

- ringpack's ``PackingCollator``: ``cu_seqlens`` and ``labels`` **already shifted** per document;
- transformers' ``DataCollatorWithFlattening`` and TRL's padding-free collator: ``labels`` **not shifted**
  (the model shifts them; the first label of every document is ``-100``), ``position_ids`` restarting at 0,
  and with ``return_flash_attn_kwargs=True`` (TRL: always) ``cu_seq_lens_q/k`` and ``max_length_q/k``.

:func:`packed_batch` turns either into one form: ``cu_seqlens`` plus token tensors, the targets as
``shift_labels`` shifted inside each document of the global pack (never across a document, and before any
sharding, so no target is lost at a rank boundary). :func:`check_same_pack` is the per-batch guard against
ranks that were handed different packs (a per-rank data sampler does that by default).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ringpack.packing import IGNORE_INDEX, cu_seqlens_to_position_ids, position_ids_to_cu_seqlens, shift_labels
from ringpack.plan import validate_cu_seqlens

BOUNDARY_KEYS = ("cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k")  # global boundaries; read, never sharded
MAX_LENGTH_KEYS = ("max_length_q", "max_length_k")  # flash-attention kwargs (Python ints); read, checked, dropped


def packed_batch(batch: Mapping, *, labels_shifted: bool | None = None,
                 ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """One packed row in ringpack's form: ``cu_seqlens`` (int32) and ``[1, T]`` token tensors.

    Fields read: the boundaries from ``cu_seqlens``, else ``cu_seq_lens_q``/``cu_seq_lens_k``, else
    ``position_ids`` (every one given must agree); ``max_length_q``/``max_length_k`` (checked, dropped);
    ``position_ids`` (made from the boundaries when absent); targets from ``shift_labels`` (already shifted),
    else ``labels``: already shifted when ``labels_shifted`` is True, not shifted when False; when None, shifted
    in ringpack's ``PackingCollator`` batches (those with ``cu_seqlens``) and not shifted in transformers'
    flattened batches (checked: their every document starts with ``ignore_index``). Every other entry
    (``input_ids``, ``attention_mask``, ``seq_idx``, ...) must be a ``[1, T]`` or ``[T]`` tensor and is kept.
    The result has ``shift_labels`` (no ``labels``) when the batch had targets.
    """
    cu = _boundaries(batch)
    total = cu[-1]
    out: dict[str, torch.Tensor] = {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    positions = cu_seqlens_to_position_ids(cu)[None]
    for key, value in batch.items():
        if key in BOUNDARY_KEYS or key in MAX_LENGTH_KEYS or key in ("labels", "shift_labels"):
            continue
        out[key] = _token_row(key, value, total)
    if "position_ids" in out and not torch.equal(out["position_ids"].cpu().long(), positions):
        raise ValueError("position_ids do not restart at 0 at every document of the batch's boundaries; "
                         "ringpack needs positions counted from each document's start (with "
                         "DataCollatorWithFlattening: position_ids_start=0)")
    out.setdefault("position_ids", positions)
    targets = _targets(batch, cu, labels_shifted, ignore_index)
    if targets is not None:
        out["shift_labels"] = targets
    return out


def _boundaries(batch: Mapping) -> tuple[int, ...]:
    found = {key: validate_cu_seqlens(batch[key]) for key in BOUNDARY_KEYS if batch.get(key) is not None}
    if "position_ids" in batch and not found:
        found["position_ids"] = validate_cu_seqlens(position_ids_to_cu_seqlens(batch["position_ids"]))
    if not found:
        raise ValueError(f"a packed batch needs its document boundaries: one of {', '.join(BOUNDARY_KEYS)} or "
                         f"position_ids restarting at 0; got keys {sorted(batch)}")
    if len(set(found.values())) > 1:
        raise ValueError(f"the batch's boundaries disagree: {found}")
    cu = next(iter(found.values()))
    longest = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)
    for key in MAX_LENGTH_KEYS:
        if key in batch and int(batch[key]) != longest:
            raise ValueError(f"batch[{key!r}] = {int(batch[key])} but the longest document has {longest} tokens")
    return cu


def _token_row(key: str, value, total: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.shape in ((total,), (1, total)):
        return value.reshape(1, total)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise ValueError(f"batch[{key!r}] is {shape}; a packed batch holds one row: tensors of shape [1, {total}] or "
                     f"[{total}], and the boundary fields {', '.join(BOUNDARY_KEYS + MAX_LENGTH_KEYS)}")


def _targets(batch: Mapping, cu: tuple[int, ...], labels_shifted: bool | None,
             ignore_index: int) -> torch.Tensor | None:
    total = cu[-1]
    if batch.get("shift_labels") is not None:
        key, shifted = "shift_labels", True
    elif batch.get("labels") is not None:
        key, shifted = "labels", ("cu_seqlens" in batch) if labels_shifted is None else bool(labels_shifted)
    else:
        return None
    labels = _token_row(key, batch[key], total)[0].cpu()
    starts = torch.tensor([a for a, b in zip(cu[:-1], cu[1:]) if b > a], dtype=torch.long)
    if not shifted:
        if labels_shifted is None and bool((labels[starts] != ignore_index).any()):
            first = int(starts[labels[starts] != ignore_index][0])
            raise ValueError(f"cannot tell whether batch['labels'] is shifted: without cu_seqlens it is read as "
                             f"transformers' flattened labels, which are {ignore_index} at every document's first "
                             f"token, but token {first} starts a document with label {int(labels[first])}; pass "
                             "labels_shifted=True (already next-token targets) or False (the model shifts them)")
        return shift_labels(labels, cu, ignore_index)[None]
    ends = torch.tensor([b - 1 for a, b in zip(cu[:-1], cu[1:]) if b > a], dtype=torch.long)
    crossing = ends[labels[ends] != ignore_index]
    if crossing.numel():
        raise ValueError(f"batch[{key!r}] is read as already shifted, but the last token of a document has a target "
                         f"(token {int(crossing[0])}: it would predict the next document); pass labels_shifted=False "
                         "for labels the model should shift (transformers' convention)")
    return labels[None]


def batch_digest(batch: Mapping[str, torch.Tensor]) -> int:
    """A 63-bit hash of every tensor of a packed batch (names, shapes, dtypes, values); host copies are hashed."""
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(memoryview(t.numpy()).cast("B"))
    return int.from_bytes(h.digest(), "little") >> 1


def pack_fingerprint(cu_seqlens: tuple[int, ...], *args) -> int:
    """A 63-bit hash of a pack's boundaries and of whatever else ``args`` names (strategy, mask, world size)."""
    key = repr((cu_seqlens, *args)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def check_same_pack(cu_seqlens: tuple[int, ...], fingerprint: int, digest: int, group) -> None:
    """Raise a ValueError on every rank of ``group`` unless all of them hold the same pack.

    One all-gather of four integers per rank (``fingerprint`` covers the boundaries and the mask, ``digest`` the
    tokens, 0 when not known). Only when ranks differ, a second exchange finds the first differing boundary, so
    that the error names the ranks, their token totals, document counts and that boundary.
    """
    world = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    mine = torch.tensor([fingerprint, digest, cu_seqlens[-1], len(cu_seqlens) - 1], dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    rows = [tuple(r.tolist()) for r in rows]
    if len(set(rows)) == 1:
        return
    everyone: list = [None] * world
    dist.all_gather_object(everyone, cu_seqlens, group=group)
    raise ValueError(_difference(rows, everyone))


def _difference(rows: list[tuple[int, ...]], boundaries: list[tuple[int, ...]]) -> str:
    variants: dict[tuple, list[int]] = {}
    for rank, (row, cu) in enumerate(zip(rows, boundaries)):
        variants.setdefault((row, cu), []).append(rank)
    parts = [f"ranks {', '.join(map(str, ranks))}: {row[2]} tokens, {row[3]} documents"
             for (row, _), ranks in variants.items()]
    first = boundaries[0]
    other = next((cu for cu in boundaries if cu != first), None)
    if other is not None:
        i = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), min(len(first), len(other)))
        at: dict[str, list[int]] = {}
        for rank, cu in enumerate(boundaries):
            at.setdefault(str(cu[i]) if i < len(cu) else "absent", []).append(rank)
        what = f"first differing boundary: cu_seqlens[{i}] = " + "; ".join(
            f"{value} on ranks {', '.join(map(str, ranks))}" for value, ranks in at.items())
    elif len({row[1] for row in rows}) > 1:
        what = "same boundaries but different tokens or labels (batch digests differ)"
    else:
        what = "same boundaries but a different strategy, mask or group size"
    return (f"ranks of the context-parallel group hold different packs ({'; '.join(parts)}); {what}. Every rank of "
            "a group must get the same global pack (ringpack.integrations.data.ContextParallelBatchSampler gives "
            "one per group); RingpackContext(..., verify=False) turns this check off")
