"""Local attention kernels behind one contract (``base``), and the dispatch that picks one.

``backend="auto"`` gathers every backend that supports the request and gives each tile to the one measured fastest
for its class (``auto``); naming a backend that cannot run the request raises a ValueError with its reasons, and so
does ``auto`` when none can, listing every backend's reasons. Backends are stateless: one is made per request, and a
caller may pass its own backend object (a test, a kernel emulation) wherever a name is taken.
"""

from __future__ import annotations

import functools

from ringpack.backends.auto import AutoBackend
from ringpack.backends.base import AttnSpec, Backend
from ringpack.backends.cudnn import CudnnBackend
from ringpack.backends.flash_attn import FlashAttnBackend
from ringpack.backends.flash_attn_4 import FlashAttn4Backend
from ringpack.backends.flex import FlexBackend
from ringpack.backends.reference import ReferenceBackend
from ringpack.backends.torch_flash import TorchFlashBackend, replaced_flash_kernels

# In order of preference for "auto" (the reference last: it runs everything). FlashAttention-4 runs every tile
# faster than FlashAttention-2 where it runs at all (Hopper, Blackwell); flash_attn runs the kernels of torch_flash
# and adds softcap, so auto gives it the requests torch_flash declines.
BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (CudnnBackend, FlashAttn4Backend, TorchFlashBackend,
                                                          FlashAttnBackend, FlexBackend, ReferenceBackend)}


def select_backend(name: str | Backend, spec: AttnSpec) -> Backend:
    """The backend called ``name`` (or ``name`` itself, a backend object), or for "auto" a per-tile dispatcher over
    those that fit; else a ValueError with every reason."""
    if isinstance(name, Backend):
        why = name.not_supported_reasons(spec)
        if why:
            raise ValueError(f"backend {name.name} does not support this request ({spec}): {', '.join(why)}")
        return name
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; supported: auto, {', '.join(BACKENDS)}")
    return _select(name, spec, replaced_flash_kernels() if spec.device_type == "cuda" else None)


@functools.lru_cache(maxsize=256)
def _select(name: str, spec: AttnSpec, flash_impl: str | None) -> Backend:
    """Cached per request kind (``flash_impl``: what torch's flash kernels are now, as a key only)."""
    candidates = [b() for b in BACKENDS.values()] if name == "auto" else [BACKENDS[name]()]
    reasons, fits = {}, []
    for backend in candidates:
        why = backend.not_supported_reasons(spec)
        if why:
            reasons[backend.name] = why
        else:
            fits.append(backend)
    if name != "auto" and fits:
        return fits[0]
    if len(fits) == 1:
        return fits[0]
    if fits:
        return AutoBackend(fits)
    detail = "; ".join(f"{n}: {', '.join(w)}" for n, w in reasons.items())
    raise ValueError(f"no backend supports this request ({spec}); {detail}")


__all__ = ["AttnSpec", "Backend", "BACKENDS", "select_backend"]
