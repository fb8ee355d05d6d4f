"""The ring scheduler: one loop for every strategy and backend, forward and backward.

Legend: ``N`` local tokens, ``H``/``Hk`` query/KV heads, ``D`` head dim; a KV message ``kv_2MKD`` holds the
``M`` rows a step reads of k, then the same rows of v, so that one message carries both (KV heads are never
repeated) and each half is a contiguous ``[M, Hk, D]`` tensor for the kernels; dK/dV travel back the same way.

Forward, rank ``r``, step ``s`` of ``P``::

    step 0: local tiles on the own kv
    step s: tiles on the rows of rank (r - s)'s kv that they read  -->  merge (out, lse) in fp32/fp64
            meanwhile step s + 1's rows are in flight: rank r sends plan.send_runs(r, s + 1) to r + s + 1
            and receives its next buffer from r - s - 1 (double buffer)

Each source sends its rows straight to the rank that reads them instead of relaying a whole shard
around the ring: every message carries only rows some tile reads, nothing is forwarded through a
rank that does not need it, and a step without tiles moves nothing. On one node (NVLink, a switch)
a shift by ``s`` costs what a shift by 1 costs.

Backward: the same rows travel again; the dK/dV of the rows received at step ``s`` go straight back
to their owner (a shift by ``-s``), overlapped with the next step. Each tile's gradient uses the final
``out`` and ``lse`` of the whole ring, so tiles are independent and exact, and the backward runs the
local step last, where it hides the last return.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ringpack.backends import Backend
from ringpack.comm import Pending, Ring
from ringpack.merge import accumulation_dtype
from ringpack.plan import Plan


def kv_message(k_NKD: torch.Tensor, v_NKD: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The ``[2, M, Hk, D]`` message of rows ``runs`` (``(start, length)``, in order) of k and of v: one copy."""
    if not runs:
        return k_NKD.new_empty((2, 0, *k_NKD.shape[1:]))
    return torch.cat([x[a:a + n] for x in (k_NKD, v_NKD) for a, n in runs]).unflatten(0, (2, -1))


def _prefetch(k_NKD: torch.Tensor, v_NKD: torch.Tensor, plan: Plan, ring: Ring, step: int) -> Pending | None:
    """Start the exchange of ``step``'s rows: ours to ``r + step``, ours-to-read from ``r - step``."""
    if step >= plan.world_size:
        return None
    runs = plan.send_runs(ring.rank, step)
    return ring.shift(kv_message(k_NKD, v_NKD, runs) if runs else None, step,
                      (2, plan.steps[ring.rank][step].recv_tokens, *k_NKD.shape[1:]), k_NKD.dtype, k_NKD.device)


# Fixed costs matter at a few thousand tokens per GPU: every pass over a [N, H, D] fp32 accumulator
# and every kernel launch shows. So the loops below allocate accumulators only where two results meet:
# a rank whose work is one wave returns the kernel's own results, a first wave that covers every row
# becomes the accumulator by one conversion (no zero fill), and k/v are stacked only when sent. A wave
# whose results come in pieces (``auto`` splitting it between kernels, cuDNN tiles off the diagonal)
# merges each piece straight into the accumulators instead of assembling it first.


# A row whose results come from at most this many kernels is accumulated in the input dtype: adding
# (or merging, computed in fp32) two 16-bit partials and rounding once gives exactly the bits of an
# fp32 accumulator rounded at the end, with no fp32 copy, pass or conversion. Deeper rows use fp32.
# Query rows count waves (``Plan.query_depth``), key rows the tiles of every rank reading them
# (``Plan.key_depth``); a dK/dV message travels in its owner's dtype, so 16-bit keys return half the bytes.
ROUND_ONCE_DEPTH = 2


def _whole(wave, n: int, only_wave: bool, backend: Backend) -> bool:
    """Whether a first ``wave`` becomes the accumulators as it is: it covers all ``n`` rows, and it is the
    rank's only wave or its results come in one piece."""
    return wave.q_span == (0, n) and (only_wave or not backend.assembles(wave))


def _forward(q_NHD, k_NKD, v_NKD, plan: Plan, ring: Ring, backend: Backend, scale: float, softcap: float):
    rank, n = ring.rank, q_NHD.shape[0]
    acc = accumulation_dtype(q_NHD.dtype)
    out_dtype = q_NHD.dtype if plan.query_depth[rank] <= ROUND_ONCE_DEPTH else acc
    steps = plan.steps[rank]
    only_wave = sum(len(step.waves) for step in steps) == 1
    out_acc = lse_acc = None
    pending = _prefetch(k_NKD, v_NKD, plan, ring, 1)
    for s, step in enumerate(steps):
        if s == 0:
            k_MKD, v_MKD = k_NKD, v_NKD
        else:
            kv_2MKD = pending.wait()
            pending = _prefetch(k_NKD, v_NKD, plan, ring, s + 1)
            k_MKD, v_MKD = kv_2MKD[0], kv_2MKD[1]
        for wave in step.waves:
            if out_acc is None and _whole(wave, n, only_wave, backend):
                out, lse = backend.fwd(q_NHD, k_MKD, v_MKD, wave, scale=scale, softcap=softcap)
                out_acc, lse_acc = (out, lse) if only_wave else (out.to(out_dtype), lse.to(acc))
                continue
            if out_acc is None:
                out_acc = torch.zeros(q_NHD.shape, dtype=out_dtype, device=q_NHD.device)
                lse_acc = torch.full((q_NHD.shape[1], n), float("-inf"), dtype=acc, device=q_NHD.device)
            backend.fwd_merge_(out_acc, lse_acc, q_NHD, k_MKD, v_MKD, wave, scale=scale, softcap=softcap)
    if out_acc is None:  # nothing visible on this rank
        return torch.zeros_like(q_NHD), torch.full((q_NHD.shape[1], n), float("-inf"), dtype=acc,
                                                    device=q_NHD.device)
    return out_acc.to(q_NHD.dtype).contiguous(), lse_acc.to(acc).contiguous()


def _grad_dtype(depth: int, q_NHD: torch.Tensor, backend: Backend) -> torch.dtype:
    """Where gradients of rows reached by ``depth`` partial results accumulate: the input dtype when the kernels
    return exact 16-bit gradients and one rounding covers every addition (``ROUND_ONCE_DEPTH``), else fp32/fp64."""
    if depth <= ROUND_ONCE_DEPTH and backend.grads_in_input_dtype:
        return q_NHD.dtype
    return accumulation_dtype(q_NHD.dtype)


def _backward(dout_NHD, dlse_HN, q_NHD, k_NKD, v_NKD, out_NHD, lse_HN, plan: Plan, ring: Ring,
              backend: Backend, scale: float, softcap: float):
    rank, world, n = ring.rank, plan.world_size, q_NHD.shape[0]
    dq_dtype = _grad_dtype(plan.query_depth[rank], q_NHD, backend)
    own_dtype = _grad_dtype(plan.key_depth[rank], q_NHD, backend)  # our dK/dV, and what comes back to us
    steps = plan.steps[rank]
    only_wave = sum(len(step.waves) for step in steps) == 1
    dq_acc = None
    # step -> (dK, dV, message): the own keys' at step 0 (no message), each received step's as the two halves of
    # the message that takes them back to their owner, in the owner's dtype
    dkv = {0: None}
    returning: list[tuple[Pending, int]] = []  # dK/dV of our rows coming back, with the step that sent them

    def key_grads(s: int, m: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``s``'s dK/dV accumulators over ``m`` keys, zero on first use: the own keys' (``s = 0``) apart,
        the received keys' as the two halves of one message back to their owner (``[2, m, Hk, D]``: every add
        and copy runs over contiguous rows)."""
        if dkv[s] is None:
            if s == 0:
                dkv[0] = (*(torch.zeros(k_NKD.shape, dtype=dtype, device=q_NHD.device) for _ in "kv"), None)
            else:
                buf = torch.zeros((2, m, *k_NKD.shape[1:]), dtype=dtype, device=q_NHD.device)
                dkv[s] = (buf[0], buf[1], buf)
        return dkv[s][0], dkv[s][1]

    def take_back(pending: Pending, step: int) -> None:
        grad_2MKD, at = pending.wait(), 0
        for a, m in plan.send_runs(rank, step):
            dk, dv = key_grads(0, n, own_dtype)
            dk[a:a + m] += grad_2MKD[0, at:at + m]
            dv[a:a + m] += grad_2MKD[1, at:at + m]
            at += m

    # Steps 1 .. P-1, then the local step 0: tiles are independent, and computing the local tiles last
    # hides the return of the last remote step's dK/dV behind them. The first fetch is exposed instead.
    pending = _prefetch(k_NKD, v_NKD, plan, ring, 1)
    for s in (*range(1, world), 0):
        step = steps[s]
        if s == 0:
            k_MKD, v_MKD, m = k_NKD, v_NKD, n
        else:
            kv_2MKD = pending.wait()
            pending = _prefetch(k_NKD, v_NKD, plan, ring, s + 1)
            k_MKD, v_MKD, m = kv_2MKD[0], kv_2MKD[1], step.recv_tokens
            dkv[s] = None
        kv_dtype = _grad_dtype(plan.key_depth[step.source], q_NHD, backend)
        for wave in step.waves:
            # A wave's results become the accumulators as they are when it is the first to reach all of its rows
            # (queries) or keys, in one piece; else it adds into them (``bwd_add_``: no hull-sized assembly).
            dq_whole = dq_acc is None and _whole(wave, n, only_wave, backend)
            kv_whole = dkv[s] is None and wave.k_span == (0, m) and (only_wave or not backend.assembles(wave))
            if not (dq_whole or kv_whole):
                if dq_acc is None:
                    dq_acc = torch.zeros(q_NHD.shape, dtype=dq_dtype, device=q_NHD.device)
                backend.bwd_add_(dq_acc, *key_grads(s, m, kv_dtype), dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD,
                                 lse_HN, dlse_HN, wave, scale=scale, softcap=softcap)
                continue
            dq, dk, dv = backend.bwd(dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave, scale=scale,
                                     softcap=softcap)
            (q0, q1), (k0, k1) = wave.q_span, wave.k_span
            if dq_whole:
                dq_acc = dq if only_wave else dq.to(dq_dtype)
            else:
                if dq_acc is None:
                    dq_acc = torch.zeros(q_NHD.shape, dtype=dq_dtype, device=q_NHD.device)
                dq_acc[q0:q1] += dq
            if kv_whole and s == 0:
                dkv[0] = (dk.to(kv_dtype), dv.to(kv_dtype), None)
            elif kv_whole:
                buf = torch.empty((2, m, *k_NKD.shape[1:]), dtype=kv_dtype, device=q_NHD.device)
                buf[0], buf[1] = dk, dv
                dkv[s] = (buf[0], buf[1], buf)
            else:
                dk_acc, dv_acc = key_grads(s, m, kv_dtype)
                dk_acc[k0:k1] += dk
                dv_acc[k0:k1] += dv
        if s > 0:
            grad_2MKD = None if dkv[s] is None else dkv.pop(s)[2]
            returning.append((ring.shift(grad_2MKD, -s, (2, plan.send_tokens[rank][s], *k_NKD.shape[1:]), own_dtype,
                                         q_NHD.device), s))
        if len(returning) > 1:
            take_back(*returning.pop(0))
    for item in returning:
        take_back(*item)
    dq = torch.zeros_like(q_NHD) if dq_acc is None else dq_acc.to(q_NHD.dtype).contiguous()
    if dkv[0] is None:  # no rank reads our keys
        return dq, torch.zeros_like(k_NKD), torch.zeros_like(v_NKD)
    return dq, dkv[0][0].to(k_NKD.dtype).contiguous(), dkv[0][1].to(v_NKD.dtype).contiguous()


class RingAttention(torch.autograd.Function):
    """Differentiable ring attention over the ranks of ``ring``; returns ``(out, lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, plan, ring, backend, scale, softcap, lse_grad):
        out, lse = _forward(q, k, v, plan, ring, backend, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, ring, backend, scale, softcap, lse_grad)
        return out, lse

    @staticmethod
    @once_differentiable  # a second derivative through the ring raises instead of coming out wrong
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, ring, backend, scale, softcap, lse_grad = ctx.args
        dq, dk, dv = _backward(dout, dlse if lse_grad else None, q, k, v, out, lse, plan, ring, backend,
                               scale, softcap)
        return dq, dk, dv, None, None, None, None, None, None
