"""Local attention kernels behind one interface, and the dispatch that picks one.

``backend="auto"`` gathers every registered backend that supports the request, in order of
preference, and gives each tile to the first that accepts it (``auto.AutoBackend``); naming a
backend that cannot run the request raises a ValueError with its reasons, and so does ``auto``
when none can, listing every backend's reasons.
"""

from __future__ import annotations

from ringpack.backends.auto import AutoBackend
from ringpack.backends.base import AttnSpec, Backend
from ringpack.backends.cudnn import CudnnBackend
from ringpack.backends.flash_attn import FlashAttnBackend
from ringpack.backends.flex import FlexBackend
from ringpack.backends.reference import ReferenceBackend
from ringpack.backends.torch_flash import TorchFlashBackend

# Order of preference for "auto": fastest first, the reference last (it runs everything). flash_attn runs the
# kernels of torch_flash and adds softcap, so auto gives it the requests torch_flash declines.
BACKENDS: dict[str, Backend] = {b.name: b for b in (CudnnBackend(), TorchFlashBackend(), FlashAttnBackend(),
                                                    FlexBackend(), ReferenceBackend())}


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
    candidates = list(BACKENDS.values()) if name == "auto" else [BACKENDS[name]]
    reasons = {}
    fits = []
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
