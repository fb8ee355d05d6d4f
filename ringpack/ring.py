"""The ring scheduler: one loop for every strategy and backend, forward and backward, and its autograd.Function.

Legend: ``N`` local tokens, ``H``/``Hk`` query/KV heads, ``D`` head dim; a KV message ``kv_2MKD`` holds the
``M`` rows a step reads of k, then the same rows of v, so that one message carries both (KV heads are never
repeated) and each half is a contiguous ``[M, Hk, D]`` tensor for the kernels; dK/dV travel back the same way.

Forward, rank ``r``, over its busy steps ``0 = s_0 < s_1 < ...`` (``Plan.busy_steps``)::

    step 0: local tiles on the own kv
    step s: tiles on the rows of rank (r - s)'s kv that they read  -->  pieces merged by the accumulator
            meanwhile the next busy step's rows are in flight: rank r sends plan.send_runs(r, s') to r + s' and
            receives its next buffer from r - s' (double buffer)

Each source sends its rows straight to the rank that reads them instead of relaying a whole shard around the
ring: every message carries only rows some tile reads, nothing is forwarded through a rank that does not need
it, and a step without tiles moves nothing. On one node (NVLink, a switch) a shift by ``s`` costs what a shift
by 1 costs.

Backward: the same rows travel again; the dK/dV of the rows received at step ``s`` go straight back to their
owner (a shift by ``-s``), overlapped with the next step. Each tile's gradient uses the final ``out`` and ``lse``
of the whole ring, so tiles are independent and exact, and the backward runs the local step last, where it
hides the last return. Every rank posts its exchanges in one global order (KV of step ``s + 1`` before the
return of step ``s``, before KV of step ``s + 2``), skipping those it has no part in: point-to-point messages
match in posting order, and NCCL runs a rank's exchanges one after another.
"""

from __future__ import annotations

import collections
import weakref

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ringpack import accumulate
from ringpack.backends import Backend
from ringpack.comm import Pending, Ring, exchange_failed
from ringpack.plan import Plan


def kv_message(k_NKD: torch.Tensor, v_NKD: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The ``[2, M, Hk, D]`` message of rows ``runs`` (``(start, length)``, in order) of k and of v: one copy."""
    if not runs:
        return k_NKD.new_empty((2, 0, *k_NKD.shape[1:]))
    return torch.cat([x[a:a + n] for x in (k_NKD, v_NKD) for a, n in runs]).unflatten(0, (2, -1))


def _post_kv(k_NKD, v_NKD, plan: Plan, ring: Ring, step: int) -> Pending:
    """Start the exchange of ``step``'s rows: ours to ``r + step``, ours-to-read from ``r - step``."""
    runs = plan.send_runs(ring.rank, step)
    return ring.shift(kv_message(k_NKD, v_NKD, runs) if runs else None, step,
                      (2, plan.steps[ring.rank][step].recv_tokens, *k_NKD.shape[1:]), k_NKD.dtype, k_NKD.device)


def _kv_steps(k_NKD, v_NKD, plan: Plan, ring: Ring, order: list[int], returns: collections.deque | None = None):
    """``(s, step, k_MKD, v_MKD)`` for the busy steps ``order`` (step 0 at most once, anywhere), with the next
    remote step's rows in flight while the caller computes. With ``returns``, the caller posts the return of
    each remote step before the generator resumes, and the next KV exchange is posted after it unless that step
    comes right after this one: the global order every rank follows (see the module docstring)."""
    remote = [s for s in order if s]
    pending = _post_kv(k_NKD, v_NKD, plan, ring, remote[0]) if remote else None
    for i, s in enumerate(order):
        step = plan.steps[ring.rank][s]
        if s == 0:
            yield 0, step, k_NKD, v_NKD
            continue
        kv_2MKD = pending.wait()
        nxt = next((t for t in order[i + 1:] if t), None)
        early = nxt is not None and (returns is None or nxt == s + 1)
        if early:
            pending = _post_kv(k_NKD, v_NKD, plan, ring, nxt)
        yield s, step, kv_2MKD[0], kv_2MKD[1]
        if nxt is not None and not early:
            pending = _post_kv(k_NKD, v_NKD, plan, ring, nxt)


def forward(q_NHD, k_NKD, v_NKD, plan: Plan, ring: Ring, backend: Backend, scale: float, softcap: float):
    """This rank's ``(out [N, H, D], lse [H, N])`` over the whole ring (all ranks call it)."""
    acc = accumulate.Softmax(q_NHD, accumulate.storage_dtype(q_NHD.dtype, plan.query_depth[ring.rank]))
    for _, step, k_MKD, v_MKD in _kv_steps(k_NKD, v_NKD, plan, ring, list(plan.busy_steps(ring.rank))):
        for wave in step.waves:
            for piece in backend.forward(q_NHD, k_MKD, v_MKD, wave, scale=scale, softcap=softcap):
                acc.add(*piece)
    return acc.result()


def backward(dout_NHD, dlse_HN, q_NHD, k_NKD, v_NKD, out_NHD, lse_HN, plan: Plan, ring: Ring, backend: Backend,
             scale: float, softcap: float):
    """This rank's ``(dq, dk, dv)`` against the ring's final ``out``/``lse`` (all ranks call it)."""
    rank, exact = ring.rank, backend.EXACT_16BIT_GRADS

    def key_dtype(owner: int) -> torch.dtype:
        # whether a key row's partial gradients stay within ROUND_ONCE_DEPTH: the depth capped just above it is
        # exact for that and stops early (the exact depth costs the tiles of every rank reading the owner's keys)
        depth = plan.key_depth_capped(owner, accumulate.ROUND_ONCE_DEPTH + 1)
        return accumulate.storage_dtype(q_NHD.dtype, depth, exact)

    dq = accumulate.Sums(q_NHD.shape[0], (q_NHD,),
                         accumulate.storage_dtype(q_NHD.dtype, plan.query_depth[rank], exact))
    own_dtype = key_dtype(rank)  # our dK/dV, and what returns
    own = accumulate.Sums(k_NKD.shape[0], (k_NKD, v_NKD), own_dtype)
    returning: collections.deque[tuple[int, Pending]] = collections.deque()

    def take_back(step: int, pending: Pending) -> None:
        own.add(plan.send_runs(rank, step), *pending.wait().unbind(0))

    # Remote steps first, then the local step 0: tiles are independent, and computing the local tiles last hides
    # the return of the last remote step's dK/dV behind them. The first fetch is exposed instead.
    busy = plan.busy_steps(rank)
    for s, step, k_MKD, v_MKD in _kv_steps(k_NKD, v_NKD, plan, ring, [*busy[1:], 0], returning):
        keys = own if s == 0 else accumulate.Sums(step.recv_tokens, (k_MKD, v_MKD), key_dtype(step.source),
                                                  message=True) if step.waves else None
        for wave in step.waves:
            for rows, kidx, dq_p, dk_p, dv_p in backend.backward(dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN,
                                                                 dlse_HN, wave, scale=scale, softcap=softcap):
                dq.add(rows, dq_p)
                keys.add(kidx, dk_p, dv_p)
        if s:  # our dK/dV of the rows we received go back to their owner; ours come back from r + s
            back = keys.message() if step.recv_tokens else None
            returning.append((s, ring.shift(back, -s, (2, plan.send_tokens[rank][s], *k_NKD.shape[1:]), own_dtype,
                                            q_NHD.device)))
        if len(returning) > 1:
            take_back(*returning.popleft())
    for item in returning:
        take_back(*item)
    return (*dq.result(), *own.result())


_agreed: dict[int, set] = {}  # id(plan) -> head layouts and dtypes every rank of the group was seen to use


def agree(plan: Plan, ring: Ring, q_NHD: torch.Tensor, k_NKD: torch.Tensor) -> None:
    """Raise the same ValueError on every rank unless all ranks run ``plan`` with one head layout and dtype.

    Message sizes follow from them, and a rank expecting other sizes than its peer sends is killed by gloo
    (``EnforceNotMet``) or hangs NCCL. One all-gather of five integers per plan and layout: a plan is made per
    batch and every layer shares it."""
    if ring.size == 1 or ring.group is None and not dist.is_initialized():
        return
    mine = (q_NHD.shape[1], k_NKD.shape[1], q_NHD.shape[2], _DTYPE_CODES.get(q_NHD.dtype, -1), plan.total_tokens)
    seen = _agreed.get(id(plan))
    if seen is not None and mine in seen:
        return
    device = q_NHD.device if dist.get_backend(ring.group) == "nccl" else torch.device("cpu")
    gathered = [torch.empty(5, dtype=torch.int64, device=device) for _ in range(ring.size)]
    try:
        dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64, device=device), group=ring.group)
    except RuntimeError as e:
        raise exchange_failed(e) from e
    rows = [tuple(t.tolist()) for t in gathered]
    if len(set(rows)) > 1:
        names = {v: k for k, v in _DTYPE_CODES.items()}
        detail = "; ".join(f"rank {r}: {h} heads, {hk} kv heads, head_dim {d}, {names.get(c, 'dtype ?')}, plan of "
                           f"{t} tokens" for r, (h, hk, d, c, t) in enumerate(rows))
        raise ValueError(f"ranks of the group call ring_attention with different shapes, dtypes or plans: {detail}")
    if seen is None:
        seen = _agreed[id(plan)] = set()
        weakref.finalize(plan, _agreed.pop, id(plan), None)
    seen.add(mine)


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


class RingAttention(torch.autograd.Function):
    """Differentiable ring attention over the ranks of ``ring``; returns ``(out, lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, plan, ring, backend, scale, softcap, lse_grad):
        agree(plan, ring, q, k)
        out, lse = forward(q, k, v, plan, ring, backend, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, ring, backend, scale, softcap, lse_grad)
        return out, lse

    @staticmethod
    @once_differentiable  # a second derivative through the ring raises instead of coming out wrong
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, ring, backend, scale, softcap, lse_grad = ctx.args
        dq, dk, dv = backward(dout.contiguous(), dlse if lse_grad else None, q, k, v, out, lse, plan, ring, backend,
                              scale, softcap)
        return dq, dk, dv, None, None, None, None, None, None
