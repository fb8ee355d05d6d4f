"""The per-batch context the framework adapters share: global document boundaries, the group, and plans.

A training step makes one :class:`RingpackContext` from its packed batch and hands it to the model with
the batch (a forward kwarg for transformers, a field of ``PackedSeqParams`` for Megatron-core). Every
attention layer asks it for the plan of its mask; the plan of each distinct mask (causal, window, chunk) is
made on the first request and reused by every later layer of the step. :meth:`RingpackContext.prepare` makes
them up front, outside any compiled region. The context belongs to the batch and is dropped with it, so
nothing outlives a step and no module-level state exists.

Making a context checks, by default, that every rank of the group holds the same pack (one all-gather of
four integers): ranks handed different packs would otherwise run and return wrong numbers, or abort deep in
the ring. ``verify=False`` turns the check off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ringpack.integrations.batch import batch_digest, check_same_pack, pack_fingerprint, packed_batch
from ringpack.packing import position_ids_to_cu_seqlens, shard_batch
from ringpack.plan import STRATEGIES, Plan, make_plan, validate_cu_seqlens, validate_window

MaskKey = tuple[bool, tuple[int, int], int | None]  # (causal, window_size, chunk_size)


@dataclass(frozen=True, eq=False)
class RingpackContext:
    """One packed batch over one context-parallel group.

    Legend: ``T`` tokens of the global pack, ``N`` tokens of this rank, ``H``/``Hk`` query/KV heads.
    """

    cu_seqlens: tuple[int, ...]  # global document boundaries of the pack
    group: dist.ProcessGroup | None = None  # the context-parallel group; None = the default group
    strategy: str = "balanced"  # a name in ringpack.STRATEGIES
    backend: str = "auto"  # local kernel, passed to ring_attention
    causal: bool = True  # the mask the token layout is made for (shard() uses its plan) ...
    window_size: tuple[int, int] = (-1, -1)  # ... e.g. (sliding_window - 1, -1) for a model windowed throughout
    verify: bool = True  # on creation, check that every rank of the group holds this pack (one small all-gather)
    content_digest: int = 0  # hash of the pack's tensors (from_batch sets it), compared by that check; 0: unknown
    layout: Plan | None = field(default=None, repr=False)  # a plan of this batch to adopt as the layout plan
    rank: int = field(init=False)  # this process's rank in ``group``
    world_size: int = field(init=False)  # size of ``group`` (1 when torch.distributed is not initialized)
    _plans: dict = field(init=False, repr=False, default_factory=dict)  # MaskKey -> Plan, this batch only
    marks: set = field(init=False, repr=False, default_factory=set)  # checks this batch passed (adapters' notes)

    def __post_init__(self):
        object.__setattr__(self, "cu_seqlens", validate_cu_seqlens(self.cu_seqlens))
        object.__setattr__(self, "window_size", validate_window(self.window_size))
        object.__setattr__(self, "causal", bool(self.causal))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; supported: {', '.join(STRATEGIES)}")
        initialized = dist.is_available() and dist.is_initialized()
        object.__setattr__(self, "rank", dist.get_rank(self.group) if initialized else 0)
        object.__setattr__(self, "world_size", dist.get_world_size(self.group) if initialized else 1)
        if self.layout is not None:
            self._adopt(self.layout)
        if self.verify and self.world_size > 1:
            fingerprint = pack_fingerprint(self.cu_seqlens, self.strategy, self.causal, self.window_size,
                                           self.world_size)
            check_same_pack(self.cu_seqlens, fingerprint, int(self.content_digest), self.group)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, **kwargs) -> RingpackContext:
        """A context from the global pack's ``position_ids`` (``[T]`` or ``[1, T]``, restarting at every document)."""
        return cls(tuple(position_ids_to_cu_seqlens(position_ids).tolist()), **kwargs)

    @classmethod
    def from_batch(cls, batch: Mapping, **kwargs) -> RingpackContext:
        """A context from a global packed batch (ringpack's ``PackingCollator``, transformers'
        ``DataCollatorWithFlattening`` or TRL's padding-free collator; fields read: see ``packed_batch``).

        The check across the group then covers the batch's tokens and labels too (``content_digest``).
        """
        cu = tuple(packed_batch(batch)["cu_seqlens"].tolist())
        return cls(cu, content_digest=batch_digest(batch), **kwargs)

    def _adopt(self, plan: Plan) -> None:
        key = (plan.causal, plan.window_size)
        if (plan.cu_seqlens, plan.world_size, plan.strategy, key) != \
                (self.cu_seqlens, self.world_size, self.strategy, (self.causal, self.window_size)):
            raise ValueError(f"layout plan was made for another batch or mask: {plan.strategy!r} over "
                             f"{plan.world_size} ranks, causal={plan.causal}, window_size={plan.window_size}; "
                             f"this context: {self.strategy!r} over {self.world_size} ranks, causal={self.causal}, "
                             f"window_size={self.window_size}, and its cu_seqlens must be the plan's")
        self._plans[(*key, None)] = plan

    def plan(self, causal: bool | None = None, window_size: tuple[int, int] | None = None,
             chunk_size: int | None = None) -> Plan:
        """The plan of this batch for one mask (default: the layout mask); made once per mask, then reused.

        Every plan keeps the token ownership of the layout mask's plan (``make_plan(..., layout=...)``),
        since all layers share one sharding of the hidden states; only tiles and schedule follow the mask.
        ``chunk_size=c`` is chunked attention: a query sees only keys of its own ``c``-token chunk, chunks
        counted from each document's start, i.e. the mask of the documents cut every ``c`` tokens.
        """
        key = self._key(causal, window_size, chunk_size)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._make(key)
            plan.num_tokens, plan.ranges  # noqa: B018 -- filled now (cached), so no compiled region fills them
            self._plans[key] = plan
        return plan

    def _key(self, causal, window_size, chunk_size) -> MaskKey:
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
        return (self.causal if causal is None else bool(causal),
                self.window_size if window_size is None else validate_window(window_size), chunk_size)

    def _make(self, key: MaskKey) -> Plan:
        causal, window, chunk = key
        if key == (self.causal, self.window_size, None):
            return make_plan(self.cu_seqlens, self.world_size, strategy=self.strategy, causal=causal,
                             window_size=window)
        layout = self.plan()
        if chunk is None:
            return make_plan(self.cu_seqlens, self.world_size, strategy=self.strategy, causal=causal,
                             window_size=window, layout=layout)
        # the same token ownership over the documents cut at chunk boundaries
        return make_plan(chunk_boundaries(self.cu_seqlens, chunk), self.world_size, strategy=self.strategy,
                         causal=causal, window_size=window, layout=layout)

    def prepare(self, masks: Iterable[MaskKey]) -> RingpackContext:
        """Make the plans of ``masks`` (``(causal, window_size, chunk_size)`` triples) now; returns ``self``.

        Call it before a compiled model runs: planning is host code, and every plan made here is a lookup
        inside the model (``ringpack.integrations.transformers.mask_keys(config)`` lists a model's masks).
        """
        for causal, window, chunk in masks:
            self.plan(causal, window, chunk)
        return self

    @property
    def plans(self) -> dict[MaskKey, Plan]:
        """The plans made so far for this batch, by ``(causal, window_size, chunk_size)`` (a copy)."""
        return dict(self._plans)

    def shard(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's tokens of a packed batch (:func:`ringpack.packing.shard_batch` with this batch's plan)."""
        return shard_batch(batch, self.plan(), self.rank)

    def attention(self, q_NHD: torch.Tensor, k_NKD: torch.Tensor, v_NKD: torch.Tensor, *, causal: bool,
                  window_size: tuple[int, int], softmax_scale: float | None, softcap: float,
                  chunk_size: int | None = None) -> torch.Tensor:
        """``ring_attention`` over this batch's group with the plan of the given mask; ``[N, H, D]`` out."""
        from ringpack import ring_attention

        return ring_attention(q_NHD, k_NKD, v_NKD, self.plan(causal, window_size, chunk_size), group=self.group,
                              causal=causal, window_size=window_size, softmax_scale=softmax_scale, softcap=softcap,
                              backend=self.backend)


def chunk_boundaries(cu_seqlens: tuple[int, ...], chunk_size: int) -> tuple[int, ...]:
    """``cu_seqlens`` with every document cut every ``chunk_size`` tokens from its start (same tokens)."""
    out = [0]
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        out.extend(range(a + chunk_size, b, chunk_size))
        out.append(b)
    return tuple(out)
