"""``torch.library`` ops around the ring, so that ``torch.compile`` can trace a model that calls it.

Legend: ``q_NHD`` local queries, ``k_NKD``/``v_NKD`` local keys/values, ``lse_HN`` fp32/fp64.
The ring (NCCL exchanges, host-side plan walking) runs as two opaque ops, ``ringpack::ring_fwd`` and
``ringpack::ring_bwd``, with fake implementations that give every output's shape and dtype. The
non-tensor state of a call (plan, process-group ring, backend, scale, softcap) cannot be an op
argument, so it is interned here and the ops take its integer handle::

    handle = intern(plan, ring, backend, scale, softcap, lse_grad)   # host, never traced
    out, lse = torch.ops.ringpack.ring_fwd(q, k, v, handle)           # traced as one node

Handles are kept for the last ``MAX_CONTEXTS`` distinct calls (a plan is made per batch and reused by
every layer, so a training step uses one or two); a handle that was dropped raises a clear error.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from ringpack import ring as ring_mod
from ringpack.backends.base import Backend
from ringpack.comm import Ring
from ringpack.merge import accumulation_dtype
from ringpack.plan import Plan

MAX_CONTEXTS = 256


@dataclass(frozen=True, eq=False)
class Context:
    """Everything a ring call needs besides its tensors."""

    plan: Plan
    ring: Ring
    backend: Backend
    scale: float
    softcap: float
    lse_grad: bool  # the caller differentiates through the returned lse


_contexts: collections.OrderedDict[int, Context] = collections.OrderedDict()
_keys: dict[tuple, int] = {}


@torch.compiler.disable
def intern(plan: Plan, ring: Ring, backend: Backend, scale: float, softcap: float, lse_grad: bool) -> int:
    """The handle of this call's context; the same objects give the same handle.

    Never traced: a plan is host data that changes every batch, and a graph that baked one plan's
    handle in would run the next batch with it. Under ``torch.compile`` this is one graph break per
    call (the ops themselves trace); a model that interns its plans outside can trace ``fullgraph``.
    """
    key = (id(plan), id(ring), id(backend), float(scale), float(softcap), bool(lse_grad))
    handle = _keys.get(key)
    if handle is not None and handle in _contexts and _contexts[handle].plan is plan:
        _contexts.move_to_end(handle)
        return handle
    handle = (max(_contexts) + 1) if _contexts else 0
    _contexts[handle] = Context(plan, ring, backend, float(scale), float(softcap), bool(lse_grad))
    _keys[key] = handle
    while len(_contexts) > MAX_CONTEXTS:
        old, ctx = _contexts.popitem(last=False)
        _keys.pop((id(ctx.plan), id(ctx.ring), id(ctx.backend), ctx.scale, ctx.softcap, ctx.lse_grad), None)
    return handle


def context(handle: int) -> Context:
    try:
        return _contexts[handle]
    except KeyError:
        raise ValueError(f"ringpack: ring context {handle} is gone (only the last {MAX_CONTEXTS} are kept); "
                         "call ring_attention again with its plan") from None


@torch.library.custom_op("ringpack::ring_fwd", mutates_args=())
def ring_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = context(handle)
    return ring_mod._forward(q, k, v, c.plan, c.ring, c.backend, c.scale, c.softcap)


@ring_fwd.register_fake
def _(q, k, v, handle):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("ringpack::ring_bwd", mutates_args=())
def ring_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, handle: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = context(handle)
    dq, dk, dv = ring_mod._backward(dout.contiguous(), dlse if c.lse_grad else None, q, k, v, out, lse, c.plan,
                                    c.ring, c.backend, c.scale, c.softcap)
    return dq, dk.contiguous(), dv.contiguous()  # laid out as the fake says (a kernel's own dk may be a view)


@ring_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, handle):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, handle = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.handle = handle


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ring_bwd(dout, dlse, q, k, v, out, lse, ctx.handle)
    return dq, dk, dv, None


ring_fwd.register_autograd(_backward, setup_context=_setup)


def apply(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, ring: Ring, backend: Backend, scale: float,
          softcap: float, lse_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``ring.RingAttention.apply`` with the same arguments, traceable by ``torch.compile``."""
    return ring_fwd(q, k, v, intern(plan, ring, backend, scale, softcap, lse_grad))
