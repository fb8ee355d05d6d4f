"""``torch.library`` ops around the ring, so that ``torch.compile`` can trace a model that calls it.

Legend: ``q_NHD`` local queries, ``k_NKD``/``v_NKD`` local keys/values, ``lse_HN`` fp32/fp64.
The ring (NCCL exchanges, host-side plan walking) runs as two opaque ops, ``ringpack::ring_fwd`` and
``ringpack::ring_bwd``, with fake implementations that give every output's shape and dtype. The non-tensor
state of a call (plan, process-group ring, backend, scale, softcap) cannot be an op argument, so each call's
state is registered here and the ops take a *token*: a one-element int64 CPU tensor naming it::

    token = intern(plan, ring, backend, scale, softcap, lse_grad)   # host, never traced
    out, lse = torch.ops.ringpack.ring_fwd(q, k, v, token)         # traced as one node

The state lives exactly as long as its token: the token's memory is a small host buffer that owns the state's
registry entry and drops it when torch frees the buffer. The forward saves the token for the backward (eagerly
and in compiled graphs alike), so the state stays while any autograd graph may still need it, with no cap on the
calls in flight, and is gone when the graph is. Handles are never reused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ringpack import ring as ring_loop
from ringpack.backends.base import Backend
from ringpack.comm import Ring
from ringpack.merge import accumulation_dtype
from ringpack.plan import Plan


@dataclass(frozen=True, eq=False)
class Context:
    """Everything a ring call needs besides its tensors."""

    plan: Plan
    ring: Ring
    backend: Backend
    scale: float
    softcap: float
    lse_grad: bool  # the caller differentiates through the returned lse


_contexts: dict[int, Context] = {}
_handles = itertools.count(1)


class _Anchor(bytearray):
    """The 8 bytes behind a token (its handle): torch keeps them alive as long as the token's storage lives, and
    when it frees them the call's state goes with them."""

    def __del__(self) -> None:
        _contexts.pop(int.from_bytes(self, "little"), None)


@torch.compiler.disable
def intern(plan: Plan, ring: Ring, backend: Backend, scale: float, softcap: float, lse_grad: bool) -> torch.Tensor:
    """A token for this call's state, to pass to the ops.

    Never traced: a plan is host data that changes every batch, and a graph that baked one plan in would run the
    next batch with it. Under ``torch.compile`` this is one graph break per call (the ops themselves trace); a model
    that interns its calls outside the compiled region traces ``fullgraph``."""
    handle = next(_handles)
    _contexts[handle] = Context(plan, ring, backend, float(scale), float(softcap), bool(lse_grad))
    return torch.frombuffer(_Anchor(handle.to_bytes(8, "little")), dtype=torch.int64)


def context(token: torch.Tensor) -> Context:
    handle = int(token.item())
    try:
        return _contexts[handle]
    except KeyError:
        raise ValueError(f"ringpack: ring call {handle} has no state: its token was freed or is not from "
                         "ringpack.ops.intern; call ring_attention again") from None


@torch.library.custom_op("ringpack::ring_fwd", mutates_args=())
def ring_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    c = context(token)
    ring_loop.agree(c.plan, c.ring, q, k)
    return ring_loop.forward(q, k, v, c.plan, c.ring, c.backend, c.scale, c.softcap)


@ring_fwd.register_fake
def _(q, k, v, token):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("ringpack::ring_bwd", mutates_args=())
def ring_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    c = context(token)
    return ring_loop.backward(dout.contiguous(), dlse if c.lse_grad else None, q, k, v, out, lse, c.plan, c.ring,
                              c.backend, c.scale, c.softcap)


@ring_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, token):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, token = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, token)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, token = ctx.saved_tensors
    dq, dk, dv = ring_bwd(dout, dlse, q, k, v, out, lse, token)
    return dq, dk, dv, None


ring_fwd.register_autograd(_backward, setup_context=_setup)

