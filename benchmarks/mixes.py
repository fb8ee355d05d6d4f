"""Document-length mixes for checks, tests and benchmarks (deterministic for a seed)."""

from __future__ import annotations

import random


def uniform(total: int, doc_len: int) -> list[int]:
    """Documents of ``doc_len`` tokens (the last one shorter) adding up to ``total``."""
    lengths = [doc_len] * (total // doc_len)
    return lengths + ([total % doc_len] if total % doc_len else [])


def long_tail(total: int, *, seed: int = 0, median: int = 1024, sigma: float = 1.6,
              max_len: int | None = None) -> list[int]:
    """Log-normal lengths (many short documents, a few long ones) adding up to ``total``."""
    rng = random.Random(seed)
    cap = max_len or total
    lengths: list[int] = []
    left = total
    while left > 0:
        n = min(left, cap, max(1, int(rng.lognormvariate(0.0, sigma) * median)))
        lengths.append(n)
        left -= n
    return lengths


def giant_plus_crumbs(total: int, *, giant_fraction: float = 0.6, crumb: int = 300, seed: int = 0) -> list[int]:
    """One document of ``giant_fraction * total`` tokens and short documents of up to ``crumb`` tokens."""
    rng = random.Random(seed)
    giant = int(total * giant_fraction)
    lengths = [giant]
    left = total - giant
    while left > 0:
        n = min(left, rng.randint(1, crumb))
        lengths.append(n)
        left -= n
    rng.shuffle(lengths)
    return lengths


MIXES = {
    "long-tail": lambda total, seed=0: long_tail(total, seed=seed),
    "uniform-2k": lambda total, seed=0: uniform(total, 2048),
    "giant-plus-crumbs": lambda total, seed=0: giant_plus_crumbs(total, seed=seed),
}


def n_docs(total: int, docs: int, *, seed: int = 0, sigma: float = 1.6) -> list[int]:
    """Exactly ``docs`` documents of at least one token each, log-normal lengths, adding up to ``total``."""
    rng = random.Random(seed)
    weights = [rng.lognormvariate(0.0, sigma) for _ in range(docs)]
    scale = (total - docs) / sum(weights)
    lengths = [1 + int(w * scale) for w in weights]
    for i in range(total - sum(lengths)):  # the rounding remainder, one token each
        lengths[i] += 1
    return lengths
