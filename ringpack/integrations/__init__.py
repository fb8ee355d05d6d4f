"""Adapters that plug ringpack into training frameworks through their public extension points.

``transformers``, ``deepspeed`` and ``megatron`` each import their framework on import; this package
itself imports none of them. :class:`RingpackContext` is the per-batch object they share.
"""

from ringpack.integrations.context import RingpackContext

__all__ = ["RingpackContext"]
