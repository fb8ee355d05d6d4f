"""``ring_attention``: the public entry point. Checks every argument, picks the backend, and runs the ring through
its ``autograd.Function`` (eagerly) or its registered ops (under ``torch.compile``).

Legend: ``N`` tokens of this rank, ``H``/``Hk`` query/KV heads, ``D`` head dim.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ringpack import ops
from ringpack.backends import AttnSpec, Backend, select_backend
from ringpack.comm import Ring
from ringpack.plan import Plan, validate_window
from ringpack.ring import RingAttention
from ringpack.validation import boolean, real


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, *,
                   group: dist.ProcessGroup | None = None, causal: bool = True,
                   window_size: tuple[int, int] = (-1, -1), softmax_scale: float | None = None,
                   softcap: float = 0.0, return_lse: bool = False, backend: str | Backend = "auto",
                   dropout_p: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a packed batch whose tokens are sharded across ``group`` by ``plan``.

    Args:
        q: ``[N, H, D]`` this rank's queries, ``N = plan.num_tokens[rank]``, in the plan's local order
            (``ringpack.shard``).
        k, v: ``[N, Hk, D]`` with ``H % Hk == 0`` (grouped-query / multi-query attention).
        plan: from ``make_plan`` with the same ``causal`` and ``window_size``; its ``world_size`` must be
            the size of ``group``, or 1: a one-rank plan runs the whole batch on this device, with no
            communication, inside any job.
        group: the context-parallel process group; ``None`` is the default group.
        causal, window_size: the mask, per document, in positions counted from each document's start
            (``window_size=(left, right)``, ``-1`` unbounded). Query ``i`` sees key ``j`` of its own
            document iff ``causal => j <= i`` and ``i - left <= j <= i + right``::

                causal, window (2, -1)     j: 0 1 2 3 4
                                        i=0   x . . . .
                                        i=1   x x . . .
                                        i=2   x x x . .
                                        i=3   . x x x .
                                        i=4   . . x x x

        softmax_scale: defaults to ``1 / sqrt(D)``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` before the softmax.
        return_lse: also return the log-sum-exp ``[H, N]`` (fp32; fp64 for fp64 inputs), differentiable.
        backend: ``"auto"``, a name in ``ringpack.backends.BACKENDS``, or a backend object.
        dropout_p: must be 0.0; ringpack computes exact attention and has no attention dropout.

    Returns:
        ``out`` ``[N, H, D]`` in the dtype of ``q``, or ``(out, lse)`` with ``return_lse``. Differentiable once
        (q, k, v); a second derivative (``create_graph=True`` through the backward) raises.
    """
    args = (q, k, v, plan, group, causal, window_size, softmax_scale, softcap, return_lse, dropout_p, backend)
    if torch.compiler.is_compiling():
        # Under torch.compile the ring runs as two registered ops (ringpack.ops) that dynamo traces as single nodes;
        # checking and picking the backend run on the host, outside the graph, with the call's token as the result.
        out, lse = torch.ops.ringpack.ring_fwd(q, k, v, _token(*args))
    else:
        out, lse = RingAttention.apply(q, k, v, *_prepare(*args))
    return (out, lse) if boolean("return_lse", return_lse) else out


def _prepare(q, k, v, plan, group, causal, window_size, softmax_scale, softcap, return_lse, dropout_p, backend):
    """``(plan, ring, backend, scale, softcap, lse_grad)`` of a call, every argument checked."""
    ring, scale, softcap, lse_grad = _validate(q, k, v, plan, group, causal, window_size, softmax_scale, softcap,
                                               return_lse, dropout_p)
    spec = AttnSpec(device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], num_heads=q.shape[1],
                    num_kv_heads=k.shape[1], causal=plan.causal, window=plan.window_size != (-1, -1),
                    softcap=softcap > 0, lse_grad=lse_grad)
    return plan, ring, select_backend(backend, spec), scale, softcap, lse_grad


@torch.compiler.disable
def _token(*args) -> torch.Tensor:
    return ops.intern(*_prepare(*args))


def _validate(q, k, v, plan, group, causal, window_size, softmax_scale, softcap, return_lse,
              dropout_p) -> tuple[Ring, float, float, bool]:
    """The ring to run on, the softmax scale, the softcap and return_lse, or a ValueError naming the argument."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a ringpack.Plan from make_plan, got {type(plan).__name__}")
    if real("dropout_p", dropout_p) != 0.0:
        raise ValueError(f"dropout_p={dropout_p} is not supported: ringpack computes exact attention; "
                         "use dropout_p=0.0")
    causal, window = boolean("causal", causal), validate_window(window_size)
    if (causal, window) != (plan.causal, plan.window_size):
        raise ValueError(f"causal={causal}, window_size={window} do not match the plan (causal={plan.causal}, "
                         f"window_size={plan.window_size}); make the plan with the same mask")
    softcap = real("softcap (0 disables it)", softcap, minimum=0.0)
    scale = None if softmax_scale is None else real("softmax_scale (None: 1 / sqrt(head_dim))", softmax_scale,
                                                    positive=True)
    _check_tensors(q, k, v)
    ring = Ring.local() if plan.world_size == 1 else Ring(group)
    if ring.size != plan.world_size:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"plan.world_size={plan.world_size} but torch.distributed is not initialized (this is "
                             "one process): initialise the process group first "
                             "(ringpack.distributed.init_distributed), or make the plan with world_size=1")
        raise ValueError(f"plan.world_size={plan.world_size} but the process group has {ring.size} ranks; make the "
                         "plan for the group's size")
    n_local = plan.num_tokens[ring.rank]
    if q.shape[0] != n_local or k.shape[0] != n_local:
        raise ValueError(f"rank {ring.rank} holds {n_local} tokens in the plan, but q has {q.shape[0]} and "
                         f"k has {k.shape[0]}; pass ringpack.shard(x, plan, rank)")
    head_dim = q.shape[-1]
    return ring, 1.0 / math.sqrt(head_dim) if scale is None else scale, softcap, boolean("return_lse", return_lse)


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [tokens, kv_heads, head_dim], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] < 1 or q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"head_dim, heads and kv_heads must be >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
