"""Local attention kernels behind one interface, and the dispatch that picks one.

``backend="auto"`` tries the registered backends in order of preference and takes the first that
supports the request; naming a backend that cannot run it raises a ValueError with its reasons.
"""

from __future__ import annotations

from ringpack.backends.base import AttnSpec, Backend
from ringpack.backends.reference import ReferenceBackend

# Order of preference for "auto": fastest first, the reference last (it runs everything).
BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(),)}


def select_backend(name: str, spec: AttnSpec) -> Backend:
    """The backend called ``name`` (or the first that fits, for "auto"), or a ValueError with every reason."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; supported: auto, {', '.join(BACKENDS)}")
    candidates = list(BACKENDS.values()) if name == "auto" else [BACKENDS[name]]
    reasons = {}
    for backend in candidates:
        why = backend.not_supported_reasons(spec)
        if not why:
            return backend
        reasons[backend.name] = why
    detail = "; ".join(f"{n}: {', '.join(w)}" for n, w in reasons.items())
    raise ValueError(f"no backend supports this request ({spec}); {detail}")


__all__ = ["AttnSpec", "Backend", "BACKENDS", "select_backend"]
