"""float64 emulations of the kernels that ``torch_flash``, ``flash_attn`` and ``cudnn`` call, and one-process rings.

They follow each kernel's contract as measured on the GPU (bottom-right windows, FA2's host-side window
normalisation and lse +inf for empty rows for the varlen flash ops; top-left causal and ``[1, H, S, 1]``
lse for cuDNN; backward reading ``out`` only through ``rowsum(dout * out)``), so the backends' layout,
gather, combine and lse-gradient logic can be checked exactly on the CPU. The GPU tests check the real
kernels against the same judgement.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading

import torch

from ringpack.checking import reference_attention
from ringpack.merge import accumulation_dtype, merge_
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import Plan, make_plan
from ringpack.sharding import shard, unshard


def _scores(q_SHD, k_SKD, scale):
    group = q_SHD.shape[1] // k_SKD.shape[1]
    return torch.einsum("ahd,bhd->hab", q_SHD, k_SKD.repeat_interleave(group, 1)) * scale


def _capped(s, softcap):
    return s if softcap == 0 else softcap * torch.tanh(s / softcap)


def _fwd_core(q, k, v, visible_ab, scale, softcap=0.0, empty_lse=float("inf")):
    s = _capped(_scores(q, k, scale), softcap).masked_fill(~visible_ab, float("-inf"))
    lse = torch.logsumexp(s, -1)
    empty = torch.isinf(lse)
    p = torch.exp(s - torch.where(empty, 0, lse)[..., None])
    out = torch.einsum("hab,bhd->ahd", p, v.repeat_interleave(q.shape[1] // k.shape[1], 1))
    return out, torch.where(empty, empty_lse, lse)


def _bwd_core(dout, q, k, v, out, lse, visible_ab, scale, softcap=0.0, dlse=None):
    group = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    raw = _scores(q, k, scale)
    s = _capped(raw, softcap).masked_fill(~visible_ab, float("-inf"))
    p = torch.exp(s - lse[..., None])
    delta = (dout * out).sum(-1).t()  # [H, a]: the kernel's only use of out
    if dlse is not None:
        delta = delta - dlse
    ds = p * (torch.einsum("ahd,bhd->hab", dout, vx) - delta[..., None]) * scale
    if softcap:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = torch.einsum("hab,bhd->ahd", ds, kx)
    dk = torch.einsum("hab,ahd->bhd", ds, q).unflatten(1, (k.shape[1], group)).sum(2)
    dv = torch.einsum("hab,ahd->bhd", p, dout).unflatten(1, (k.shape[1], group)).sum(2)
    return dq, dk, dv


def _window_mask(a, b, left, right):
    d = torch.arange(b)[None, :] - torch.arange(a)[:, None]
    shift = b - a
    mask = torch.ones(a, b, dtype=torch.bool)
    if left >= 0:
        mask &= d >= shift - left
    if right >= 0:
        mask &= d <= shift + right
    return mask


def _entries(cu_q, cu_k, max_q, max_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert cq[0] == 0 and ck[0] == 0 and len(cq) == len(ck)
    for i in range(len(cq) - 1):
        a, b = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        assert a >= 0 and b >= 0 and a <= max_q and b <= max_k, (a, b, max_q, max_k)
        yield cq[i], a, ck[i], b


def _fa2_window(left: int, right: int, max_k: int, is_causal: bool) -> tuple[int, int]:
    """The window the FA2 kernel really applies: ``mha_varlen_fwd``/``_bwd`` normalise it on the host.

    A side ``>= max_k`` becomes unbounded, then an unbounded side next to a bounded one becomes
    ``max_k``, which with bottom-right alignment is *not* unbounded for a sequence with more queries
    than ``max_k + 1``."""
    if is_causal:
        right = 0
    left = -1 if left >= max_k else left
    right = -1 if right >= max_k else right
    if left < 0 and right >= 0:
        left = max_k
    if left >= 0 and right < 0:
        right = max_k
    return left, right


def flash_fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale,
              window_size_left, window_size_right, softcap=0.0):
    assert dropout_p == 0.0 and q.dtype == k.dtype == v.dtype
    assert not is_causal or window_size_right in (0, -1)
    window_size_left, right = _fa2_window(window_size_left, window_size_right, max_k, is_causal)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float64)
    for q0, a, k0, b in _entries(cu_q, cu_k, max_q, max_k):
        if a and b:
            o, l_ = _fwd_core(q[q0:q0 + a], k[k0:k0 + b], v[k0:k0 + b], _window_mask(a, b, window_size_left, right),
                              scale, softcap)
            out[q0:q0 + a], lse[:, q0:q0 + a] = o, l_
    return out, lse, torch.empty(2), torch.empty(()), torch.empty(0)


def flash_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng, unused, *, scale,
              window_size_left, window_size_right, softcap=0.0):
    window_size_left, right = _fa2_window(window_size_left, window_size_right, max_k, is_causal)
    assert lse.is_contiguous() and lse.shape == (q.shape[1], q.shape[0])
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, a, k0, b in _entries(cu_q, cu_k, max_q, max_k):
        if a and b:
            dq[q0:q0 + a], dk[k0:k0 + b], dv[k0:k0 + b] = _bwd_core(
                dout[q0:q0 + a], q[q0:q0 + a], k[k0:k0 + b], v[k0:k0 + b], out[q0:q0 + a], lse[:, q0:q0 + a],
                _window_mask(a, b, window_size_left, right), scale, softcap)
    return dq, dk, dv


def flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size_left,
                          window_size_right, softcap, alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k):
    """``flashattn::_flash_attn_varlen_forward`` (flash-attn 2.7/2.8): the aten kernel's contract plus softcap."""
    assert alibi_slopes is None and not return_softmax and block_table is None and leftpad_k is None
    assert seqused_k is None
    out, lse = flash_fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, False, scale=softmax_scale,
                         window_size_left=window_size_left, window_size_right=window_size_right, softcap=softcap)[:2]
    return out, lse, torch.empty(0), torch.empty(2, dtype=torch.int64)


def flash_attn_varlen_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p,
                          softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                          deterministic, rng_state):
    """``flashattn::_flash_attn_varlen_backward``: writes dq, dk, dv in place, returns softmax_d."""
    assert alibi_slopes is None and dropout_p == 0.0 and all(t is not None for t in (dq, dk, dv))
    grads = flash_bwd(dout, q, k, v, out, softmax_lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, rng_state, None,
                      scale=softmax_scale, window_size_left=window_size_left, window_size_right=window_size_right,
                      softcap=softcap)
    for dst, src in zip((dq, dk, dv), grads):
        dst.copy_(src)
    return (dout * out).sum(-1).t()


def _fa4_mask(a: int, b: int, left, right):
    """FlashAttention-4's mask of one sequence: bottom-right aligned, ``None`` for an unbounded side."""
    d = torch.arange(b)[None, :] - torch.arange(a)[:, None]
    mask = torch.ones(a, b, dtype=torch.bool)
    if left is not None:
        mask &= d >= (b - a) - left
    if right is not None:
        mask &= d <= (b - a) + right
    return mask


def _fa4_checks(q, cu_q, cu_k, max_q, max_k, causal, left, right):
    assert cu_q.dtype == cu_k.dtype == torch.int32 and q.is_contiguous()
    assert left is None or left >= 0, f"window_size_left {left}: FA4 reads any int as a bound (None is unbounded)"
    assert right is None or right >= 0, f"window_size_right {right}: FA4 reads any int as a bound"
    return (left, 0) if causal else (left, right)


def fa4_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
            max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
            causal=False, softcap=None, window_size_left=None, window_size_right=None, learnable_sink=None,
            return_lse=False, **rest):
    """``flash_attn.cute.interface._flash_attn_fwd`` (flash-attn-4 4.0.0b36), varlen: five results, lse -inf for
    rows that see no key."""
    assert qv is None and seqused_q is None and seqused_k is None and page_table is None and learnable_sink is None
    left, right = _fa4_checks(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size_left,
                              window_size_right)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    for q0, a, k0, b in _entries(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        if a and b:
            out[q0:q0 + a], lse[:, q0:q0 + a] = _fwd_core(q[q0:q0 + a], k[k0:k0 + b], v[k0:k0 + b],
                                                          _fa4_mask(a, b, left, right), softmax_scale, softcap or 0.0,
                                                          empty_lse=float("-inf"))
    return out, lse if return_lse else None, None, None, None


def fa4_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
            window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
            dq=None, dk=None, dv=None, dlse=None, **rest):
    """``flash_attn.cute.interface._flash_attn_bwd``, varlen, with the lse gradient: dq of key-less rows is 0, but
    dk/dv the kernel allocates itself hold garbage (NaN here) where no query reads the keys."""
    left, right = _fa4_checks(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size_left,
                              window_size_right)
    assert lse.is_contiguous() and lse.shape == (q.shape[1], q.shape[0])
    dq = torch.zeros_like(q) if dq is None else dq.zero_()
    dk = torch.full_like(k, float("nan")) if dk is None else dk
    dv = torch.full_like(v, float("nan")) if dv is None else dv
    for q0, a, k0, b in _entries(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        if a and b:
            dq[q0:q0 + a], dk[k0:k0 + b], dv[k0:k0 + b] = _bwd_core(
                dout[q0:q0 + a], q[q0:q0 + a], k[k0:k0 + b], v[k0:k0 + b], out[q0:q0 + a], lse[:, q0:q0 + a],
                _fa4_mask(a, b, left, right), softmax_scale, softcap, None if dlse is None else dlse[:, q0:q0 + a])
    return dq, dk, dv


def _shd(x_1HSD):
    return x_1HSD[0].transpose(0, 1)


def _top_left(a, b, causal):
    if not causal:
        return torch.ones(a, b, dtype=torch.bool)
    return torch.arange(b)[None, :] <= torch.arange(a)[:, None]


def cudnn_fwd(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale):
    """``[B, H, S, D]`` inputs of any strides; out laid out like q (as cuDNN does), lse ``[B, H, S, 1]``."""
    assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0
    a, b = q.shape[2], k.shape[2]
    out = torch.empty(q.shape[0], a, q.shape[1], v.shape[3], dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(q.shape[0], q.shape[1], a, 1, dtype=accumulation_dtype(q.dtype))
    for i in range(q.shape[0]):
        o, l_ = _fwd_core(_shd(q[i:i + 1]), _shd(k[i:i + 1]), _shd(v[i:i + 1]), _top_left(a, b, is_causal), scale)
        out[i], lse[i, :, :, 0] = o.transpose(0, 1), l_
    seed = torch.zeros((), dtype=torch.int64)
    return out, lse, None, None, a, b, seed, seed, None


def cudnn_bwd(dout, q, k, v, out, lse, seed, offset, attn_bias, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, *,
              scale):
    assert attn_bias is None and cum_q is None and cum_k is None and lse.shape == (*q.shape[:3], 1)
    assert lse.is_contiguous()
    a, b = q.shape[2], k.shape[2]
    assert (max_q, max_k) == (a, b)
    # dq laid out like q; dk, dv in [B, Hk, S, D] storage, the layout cuDNN gives when its inputs are not dense rows
    grads = [torch.empty_like(q), torch.empty(k.shape, dtype=k.dtype, device=k.device),
             torch.empty(v.shape, dtype=v.dtype, device=v.device)]
    for i in range(q.shape[0]):
        g = _bwd_core(*(_shd(x[i:i + 1]) for x in (dout, q, k, v, out)), lse[i, ..., 0], _top_left(a, b, is_causal),
                      scale)
        for dst, src in zip(grads, g):
            dst[i] = src.transpose(0, 1)
    return tuple(grads)


def _step_rows(x_local, step_index: int, step):
    """The source's KV rows a step reads: the whole shard at step 0, else the received runs in order."""
    runs = getattr(step, "recv_runs", ())
    if step_index == 0 or not runs:
        return x_local, None
    return torch.cat([x_local[a:a + n] for a, n in runs]), runs


def _scatter_rows_(dst, src, runs) -> None:
    """``dst += src`` where ``runs`` (or a slice, or None: all rows) place ``src``'s rows, laid end to end."""
    if runs is None:
        dst += src
        return
    if isinstance(runs, slice):
        dst[runs] += src
        return
    pos = 0
    for a, n in runs:
        dst[a:a + n] += src[pos:pos + n]
        pos += n


def ring_one_process(backend, plan: Plan, q, k, v, dout, dlse, *, scale: float, softcap: float = 0.0,
                     backward: bool = True):
    """Run every rank of ``plan`` in this process through ``backend``: global ``(out, lse, dq, dk, dv)``
    (``(out, lse)`` without ``backward``)."""
    world = plan.world_size
    acc = accumulation_dtype(q.dtype)
    qs, ks, vs, dos = ([shard(x, plan, r) for r in range(world)] for x in (q, k, v, dout))
    dlses = [shard(dlse.t(), plan, r).t() if dlse is not None else None for r in range(world)]
    outs, lses = [], []
    for r in range(world):
        out_acc = torch.zeros(qs[r].shape, dtype=acc)
        lse_acc = torch.full((q.shape[1], qs[r].shape[0]), float("-inf"), dtype=acc)
        for s, step in enumerate(plan.steps[r]):
            k_step, _ = _step_rows(ks[step.source], s, step)
            v_step, _ = _step_rows(vs[step.source], s, step)
            for wave in step.waves:
                for rows, o, l_ in backend.forward(qs[r], k_step, v_step, wave, scale=scale, softcap=softcap):
                    assert o.shape[0] == rows.stop - rows.start and l_.shape == (q.shape[1], o.shape[0])
                    merge_(out_acc[rows], lse_acc[:, rows], o, l_)
        outs.append(out_acc.to(q.dtype))
        lses.append(lse_acc)
    lse = unshard([x.t() for x in lses], plan).t()
    if not backward:
        return unshard(outs, plan), lse
    dqs = [torch.zeros(x.shape, dtype=acc) for x in qs]
    dks = [torch.zeros(x.shape, dtype=acc) for x in ks]
    dvs = [torch.zeros(x.shape, dtype=acc) for x in vs]
    for r in range(world):
        for s, step in enumerate(plan.steps[r]):
            src = step.source
            k_step, runs = _step_rows(ks[src], s, step)
            v_step, _ = _step_rows(vs[src], s, step)
            dk_step, dv_step = torch.zeros(k_step.shape, dtype=acc), torch.zeros(v_step.shape, dtype=acc)
            for wave in step.waves:
                for rows, keys, dq, dk, dv in backend.backward(dos[r], qs[r], k_step, v_step, outs[r], lses[r],
                                                               dlses[r], wave, scale=scale, softcap=softcap):
                    dqs[r][rows] += dq
                    _scatter_rows_(dk_step, dk, keys)
                    _scatter_rows_(dv_step, dv, keys)
            _scatter_rows_(dks[src], dk_step, runs)
            _scatter_rows_(dvs[src], dv_step, runs)
    return unshard(outs, plan), lse, unshard(dqs, plan), unshard(dks, plan), unshard(dvs, plan)


class ThreadRing:
    """The ``comm.Ring`` interface for ``world`` ranks run as threads of one process (one GPU, or the CPU).

    ``shift`` posts a copy of the buffer into a FIFO per (source, destination) pair and ``wait`` takes
    the next one of its pair, so messages match in posting order exactly as NCCL point-to-point does:
    a rank that posts a different sequence than its peers gets a wrong-shaped buffer or times out,
    here as a test failure instead of a hang.
    """

    def __init__(self, rank: int, mailbox: dict, timeout_s: float):
        self.group, self.rank, self.size = None, rank, int(round(len(mailbox) ** 0.5))
        self.mailbox, self.timeout_s = mailbox, timeout_s

    @classmethod
    def ranks(cls, world: int, timeout_s: float = 60.0) -> list[ThreadRing]:
        mailbox = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
        return [cls(r, mailbox, timeout_s) for r in range(world)]

    def shift(self, send, shift: int, recv_shape, dtype, device):
        if send is not None and send.numel():
            self.mailbox[self.rank, (self.rank + shift) % self.size].put(send.clone())
        return _ThreadPending(self, (self.rank - shift) % self.size, tuple(recv_shape), dtype, device)


@dataclasses.dataclass
class _ThreadPending:
    ring: ThreadRing
    source: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def wait(self) -> torch.Tensor:
        if not math.prod(self.shape):
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        me = self.ring.rank
        try:
            got = self.ring.mailbox[self.source, me].get(timeout=self.ring.timeout_s)
        except queue.Empty:
            raise RuntimeError(f"rank {me}: nothing from rank {self.source} within {self.ring.timeout_s} s") from None
        if tuple(got.shape) != self.shape or got.dtype != self.dtype:
            raise RuntimeError(f"rank {me}: from rank {self.source} got {tuple(got.shape)} {got.dtype}, expected "
                               f"{self.shape} {self.dtype}: the ranks posted different sequences")
        return got


def ring_in_threads(plan: Plan, backend, q, k, v, dout, dlse, *, scale: float, softcap: float = 0.0):
    """Every rank of ``plan`` as a thread running ``ringpack.ring``'s own forward and backward loops over a
    :class:`ThreadRing`; global ``(out, lse, dq, dk, dv)``. Inputs are global, on the device to run on."""
    from ringpack import ring as ring_loop

    world = plan.world_size
    rings = ThreadRing.ranks(world)
    results, errors = [None] * world, [None] * world

    def rank_main(r: int) -> None:
        try:
            q_, k_, v_, dout_ = (shard(x, plan, r) for x in (q, k, v, dout))
            dlse_ = shard(dlse.t(), plan, r).t() if dlse is not None else None
            out, lse = ring_loop.forward(q_, k_, v_, plan, rings[r], backend, scale, softcap)
            grads = ring_loop.backward(dout_.contiguous(), dlse_, q_, k_, v_, out, lse, plan, rings[r], backend,
                                       scale, softcap)
            results[r] = (out, lse, *grads)
        except Exception as e:  # reported by the caller, with the rank
            errors[r] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, e in enumerate(errors):
        if e is not None:
            raise RuntimeError(f"rank {r} of {world} raised {type(e).__name__}: {e}") from e
    out, lse, dq, dk, dv = ([results[r][i] for r in range(world)] for i in range(5))
    return (unshard(out, plan), unshard([x.t() for x in lse], plan).t(), unshard(dq, plan), unshard(dk, plan),
            unshard(dv, plan))


MIXES = [(0, 1, 7, 97, 31, 0, 13, 64), (5,) * 12 + (3, 1)]
MASKS = [(True, (-1, -1)), (False, (-1, -1)), (True, (9, -1)), (False, (6, 4)), (True, (0, -1))]


def check_ring(backend, lengths, world, strategy, causal, window, heads=4, kv_heads=2, lse_grad=True,
               backward=True, tol=1e-10, softcap=0.0):
    """Every rank of a ``world``-rank plan through ``backend`` against the float64 reference: out, lse, dq, dk, dv
    must agree to ``tol`` (a layout slip is an O(1) error; the merge is exact)."""
    cu = lengths_to_cu_seqlens(lengths)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(world * 7 + len(lengths))
    q, k, v, dout = (torch.randn(total, h, 16, generator=g, dtype=torch.float64)
                     for h in (heads, kv_heads, kv_heads, heads))
    dlse = torch.randn(heads, total, generator=g, dtype=torch.float64) if lse_grad else None
    plan = make_plan(cu, world, strategy=strategy, causal=causal, window_size=window)
    if backward:  # ringpack.ring's own loops, ranks as threads
        got = ring_in_threads(plan, backend, q, k, v, dout, dlse, scale=1 / math.sqrt(16), softcap=softcap)
    else:
        got = ring_one_process(backend, plan, q, k, v, dout, dlse, scale=1 / math.sqrt(16), softcap=softcap,
                               backward=False)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = reference_attention(qr, kr, vr, cu, causal=causal, window_size=window, softcap=softcap)
    loss = (out * dout).sum() + ((lse.masked_fill(torch.isinf(lse), 0) * dlse).sum() if lse_grad else 0)
    want = (out.detach(), lse.detach(), *torch.autograd.grad(loss, (qr, kr, vr)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
        err = torch.where(both_inf, 0, (a - b).abs()).max().item() if a.numel() else 0.0
        assert err <= tol, f"{name}: max error {err}"


def check_release_refusals(monkeypatch, find, package: str, extra: str, supported: str, versions) -> None:
    """``find()`` (a backend's package lookup) says the package is missing, or names a release outside
    ``supported``, for each of ``versions``: never a call into a release whose API it has not checked."""
    import importlib.metadata

    def installed(version):
        def fake(name):
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return fake

    monkeypatch.setattr(importlib.metadata, "version", installed(None))
    assert find()[2] == f"{package} is not installed (pip install 'ringpack[{extra}]')"
    for version in versions:
        monkeypatch.setattr(importlib.metadata, "version", installed(version))
        why = find()[2]
        assert f"{package} {version} is installed" in why and supported in why
