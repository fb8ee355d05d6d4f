"""The per-batch context the framework adapters share: global document boundaries, the group, and plans.

A training step makes one :class:`RingpackContext` from its packed batch and hands it to the model with
the batch (a forward kwarg for transformers, a field of ``PackedSeqParams`` for Megatron-core). Every
attention layer asks it for the plan of its mask; the plan of each distinct mask (causal, window) is made
on the first request and reused by every later layer of the step. The context belongs to the batch and
is dropped with it, so nothing outlives a step and no module-level state exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ringpack.attention import ring_attention
from ringpack.packing import position_ids_to_cu_seqlens, shard_batch
from ringpack.plan import STRATEGIES, Plan, make_plan, validate_cu_seqlens, validate_window


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
    rank: int = field(init=False)  # this process's rank in ``group``
    world_size: int = field(init=False)  # size of ``group`` (1 when torch.distributed is not initialized)
    _plans: dict = field(init=False, repr=False, default_factory=dict)  # (causal, window) -> Plan, this batch only

    def __post_init__(self):
        object.__setattr__(self, "cu_seqlens", validate_cu_seqlens(self.cu_seqlens))
        object.__setattr__(self, "window_size", validate_window(self.window_size))
        object.__setattr__(self, "causal", bool(self.causal))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; supported: {', '.join(STRATEGIES)}")
        initialized = dist.is_available() and dist.is_initialized()
        object.__setattr__(self, "rank", dist.get_rank(self.group) if initialized else 0)
        object.__setattr__(self, "world_size", dist.get_world_size(self.group) if initialized else 1)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, **kwargs) -> RingpackContext:
        """A context from the global pack's ``position_ids`` (``[T]`` or ``[1, T]``, restarting at every document)."""
        return cls(tuple(position_ids_to_cu_seqlens(position_ids).tolist()), **kwargs)

    def plan(self, causal: bool | None = None, window_size: tuple[int, int] | None = None) -> Plan:
        """The plan of this batch for one mask (default: the layout mask); made once per mask, then reused.

        Every plan keeps the token ownership of the layout mask's plan (``make_plan(..., layout=...)``),
        since all layers share one sharding of the hidden states; only tiles and schedule follow the mask.
        """
        key = (self.causal if causal is None else bool(causal),
               self.window_size if window_size is None else validate_window(window_size))
        plan = self._plans.get(key)
        if plan is None:
            layout = None if key == (self.causal, self.window_size) else self.plan()
            plan = make_plan(self.cu_seqlens, self.world_size, strategy=self.strategy, causal=key[0],
                             window_size=key[1], layout=layout)
            self._plans[key] = plan
        return plan

    @property
    def plans(self) -> dict[tuple[bool, tuple[int, int]], Plan]:
        """The plans made so far for this batch, by ``(causal, window_size)`` (a copy)."""
        return dict(self._plans)

    def shard(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's tokens of a packed batch (:func:`ringpack.packing.shard_batch` with this batch's plan)."""
        return shard_batch(batch, self.plan(), self.rank)

    def attention(self, q_NHD: torch.Tensor, k_NKD: torch.Tensor, v_NKD: torch.Tensor, *, causal: bool,
                  window_size: tuple[int, int], softmax_scale: float | None, softcap: float) -> torch.Tensor:
        """``ring_attention`` over this batch's group with the plan of the given mask; ``[N, H, D]`` out."""
        return ring_attention(q_NHD, k_NKD, v_NKD, self.plan(causal, window_size), group=self.group, causal=causal,
                              window_size=window_size, softmax_scale=softmax_scale, softcap=softcap,
                              backend=self.backend)

