"""ringpack: exact context-parallel (ring) attention over packed variable-length sequences."""

from ringpack.attention import ring_attention
from ringpack.packing import (
    MultipackBatchSampler,
    PackingCollator,
    cu_seqlens_to_lengths,
    cu_seqlens_to_position_ids,
    lengths_to_cu_seqlens,
    multipack,
    position_ids_to_cu_seqlens,
    shard_batch,
)
from ringpack.plan import STRATEGIES, Plan, make_plan
from ringpack.sharding import gather, shard, unshard
from ringpack.warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "MultipackBatchSampler",
    "PackingCollator",
    "Plan",
    "STRATEGIES",
    "cu_seqlens_to_lengths",
    "cu_seqlens_to_position_ids",
    "gather",
    "lengths_to_cu_seqlens",
    "make_plan",
    "multipack",
    "position_ids_to_cu_seqlens",
    "ring_attention",
    "shard",
    "shard_batch",
    "unshard",
    "warmup",
]
