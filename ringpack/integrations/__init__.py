"""Adapters that plug ringpack into training frameworks through their public extension points.

``transformers``, ``trainer`` (transformers' ``Trainer``), ``trl``, ``deepspeed`` and ``megatron`` each import
their framework on import; ``batch``, ``data``, ``hf_masks`` and ``hf_moe`` and this package itself import none.
:class:`RingpackContext` is the per-batch object they share.
"""

from ringpack.integrations.context import RingpackContext

__all__ = ["RingpackContext"]
