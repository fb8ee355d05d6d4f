"""The masks transformers builds for a layer, read so that ringpack computes exactly that mask or refuses it.

transformers makes one mask per layer type through the implementation's ``AttentionMaskInterface`` function
and hands the result to every attention layer of that type. For ringpack that function
(``transformers.ringpack_mask``) returns a :class:`LayerMask` read from what it is given:

- ``local_size``: the sliding window (``config.sliding_window``) or the chunk size of chunked attention
  (``config.attention_chunk_size``); one that is neither, or both, is refused;
- ``use_vmap=True``: transformers sets it exactly when a model adds an ``or_mask_function`` or
  ``and_mask_function`` overlay (bidirectional image blocks, prefix-LM masks): refused, naming it;
- ``mask_function``: transformers' own mask predicate, kept so that the attention layer can *probe* it in eager
  mode against the per-document mask ringpack is about to compute (:func:`probe`). That catches overlays that
  arrive without ``use_vmap`` (``block_sequence_ids`` image blocks) wherever they touch this rank's tokens.

Positions: transformers evaluates its predicate on positions when it sees several documents in the row
(``position_ids`` restart), else on row indices; the probe reads it the same way. ringpack always counts
positions from each document's start, which is what every document run alone gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ringpack.plan import Plan

PROBE_REACH = 4  # the probe compares every query with the keys up to this distance (and the window's edges)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


@dataclass(frozen=True, eq=False)
class LayerMask:
    """The mask transformers built for one layer type, as ringpack reads it (``attention_mask`` of the layers)."""

    sliding_window: int | None  # causal: a query sees its w most recent keys; bidirectional: keys within w
    chunk_size: int | None  # chunked attention: keys of the query's own chunk, chunks counted from document start
    mask_function: Callable | None = field(default=None, repr=False)  # transformers' predicate, for the probe
    _probed: set = field(default_factory=set, init=False, repr=False)  # masks already probed in this forward


def read_mask(mask_function: Callable | None, local_size: int | None, use_vmap: bool, config) -> LayerMask:
    """The :class:`LayerMask` of what transformers hands a mask function; a ValueError for what ringpack lacks."""
    if use_vmap:
        raise ValueError("this model adds an or_mask_function / and_mask_function overlay to its attention mask "
                         "(e.g. bidirectional attention inside image-token blocks, or a prefix-LM mask); ringpack "
                         "computes per-document causal or bidirectional masks with a sliding window or chunks "
                         "only. Run text-only batches without the overlay, or use another attn_implementation")
    if local_size is None:
        return LayerMask(None, None, mask_function)
    sliding = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if local_size == sliding and local_size == chunk:
        raise ValueError(f"the mask has local size {local_size}, which is both the config's sliding_window and its "
                         "attention_chunk_size: ringpack cannot tell a sliding window from chunked attention here")
    if local_size == sliding:
        return LayerMask(local_size, None, mask_function)
    if local_size == chunk:
        return LayerMask(None, local_size, mask_function)
    raise ValueError(f"the mask has local size {local_size}, which is neither the config's sliding_window "
                     f"({sliding}) nor its attention_chunk_size ({chunk}); ringpack computes sliding windows and "
                     "chunked attention of those sizes only")


def layer_window(mask: LayerMask | None, sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """ringpack's ``window_size`` for a layer: from its mask when transformers built one, else its kwarg.

    transformers' masks mean ``kv > q - w`` when causal and ``|q - kv| <= w`` when not, so ``(w - 1, -1)`` and
    ``(w, w)``. A bidirectional window with no mask is refused: transformers' kernels disagree on its width.
    """
    from_mask = mask.sliding_window if mask is not None else None
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
    if from_mask is not None and sliding_window is not None and from_mask != sliding_window:
        raise ValueError(f"the layer's sliding_window={sliding_window} differs from the window of the mask "
                         f"transformers built for it ({from_mask}); ringpack will not guess which one holds")
    w = from_mask if from_mask is not None else sliding_window
    if w is None:
        return (-1, -1)
    if causal:
        return (w - 1, -1)
    if mask is None:
        raise ValueError(f"a bidirectional sliding window ({w}) reached ringpack without the mask transformers "
                         "builds for it; transformers' kernels disagree on its width, so ringpack refuses it")
    return (w, w)


def probe(mask: LayerMask, plan: Plan, rank: int, seen_positions: torch.Tensor, *, causal: bool,
          window: tuple[int, int], chunk: int | None) -> None:
    """Raise a ValueError where transformers' mask predicate disagrees with the mask ringpack computes.

    Every local query is compared with the keys of its own segment (one document, consecutive positions) up
    to ``PROBE_REACH`` away and at the window's edges: O(local tokens) predicate calls, once per mask and
    forward. Skipped while compiling (the predicate's verdict would have to leave the graph).
    """
    key = (causal, window, chunk)
    if mask.mask_function is None or key in mask._probed or torch.compiler.is_compiling():
        return
    pos = seen_positions.reshape(-1).to(torch.long)
    q, k = _probe_pairs(plan, rank, window, pos.device)
    if q.numel():
        packed = bool((pos[1:] - pos[:-1] != 1).any()) if pos.numel() > 1 else False
        frame = pos if packed else torch.arange(pos.numel(), device=pos.device)
        zeros = torch.zeros_like(q)
        got = mask.mask_function(zeros, zeros, q, k).to(torch.bool).expand(q.shape)
        want = _visible(frame[q], frame[k], causal, window, chunk)
        bad = torch.nonzero(got != want).flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"the mask transformers built for this layer differs from the per-document mask ringpack computes "
                f"(causal={causal}, window_size={window}, chunk_size={chunk}): for local query {int(q[i])} and key "
                f"{int(k[i])} (positions {int(pos[q[i]])} and {int(pos[k[i]])} of one document) transformers' mask "
                f"says {'visible' if bool(got[i]) else 'hidden'}. The model adds a mask overlay ringpack does not "
                "compute (e.g. bidirectional blocks of image tokens); use another attn_implementation for it")
    mask._probed.add(key)


def _probe_pairs(plan: Plan, rank: int, window: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    segs = plan.segments[rank]
    lengths = torch.tensor([s.length for s in segs], dtype=torch.long)
    starts = torch.tensor([s.local_start for s in segs], dtype=torch.long)
    rows = torch.arange(int(lengths.sum()), dtype=torch.long)
    lo = torch.repeat_interleave(starts, lengths)
    hi = lo + torch.repeat_interleave(lengths, lengths)
    reach = set(range(-PROBE_REACH, PROBE_REACH + 1))
    for edge in window:
        if edge >= 0:
            reach |= {-edge - 1, -edge, edge, edge + 1}
    qs, ks = [], []
    for d in sorted(reach):
        cols = rows + d
        keep = (cols >= lo) & (cols < hi)
        qs.append(rows[keep])
        ks.append(cols[keep])
    return torch.cat(qs).to(device), torch.cat(ks).to(device)


def _visible(pq: torch.Tensor, pk: torch.Tensor, causal: bool, window: tuple[int, int],
             chunk: int | None) -> torch.Tensor:
    ok = torch.ones_like(pq, dtype=torch.bool)
    if causal:
        ok &= pk <= pq
    left, right = window
    if left >= 0:
        ok &= pk >= pq - left
    if right >= 0:
        ok &= pk <= pq + right
    if chunk is not None:
        ok &= torch.div(pk, chunk, rounding_mode="floor") == torch.div(pq, chunk, rounding_mode="floor")
    return ok


def mask_keys(config) -> set[tuple[bool, tuple[int, int], int | None]]:
    """The ``(causal, window_size, chunk_size)`` masks a transformers config's layers ask for, read from
    ``layer_types``, ``sliding_window``, ``attention_chunk_size`` and ``is_causal`` (for
    ``RingpackContext.prepare``; a mask missed here is planned when its layer first runs)."""
    causal = bool(getattr(config, "is_causal", True))
    sliding = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if not types:
        types = ["sliding_attention" if sliding else "chunked_attention" if chunk else "full_attention"]
    keys = set()
    for kind in types:
        if kind == "sliding_attention" and sliding:
            keys.add((causal, (sliding - 1, -1) if causal else (sliding, sliding), None))
        elif kind == "chunked_attention" and chunk:
            keys.add((causal, (-1, -1), chunk))
        else:
            keys.add((causal, (-1, -1), None))
    return keys
