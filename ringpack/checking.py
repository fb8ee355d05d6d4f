"""Exactness checks: a float64 single-process reference, and ring-vs-reference cases run on every rank.

Used by ``python -m ringpack check`` and by the test-suite, so that what a cluster operator runs is
exactly what CI proves. The reference is written from the mask rule of DESIGN.md directly (dense,
per document, autograd for gradients) and shares no code with the plan, the backends or the merge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ringpack.backends import AttnSpec, select_backend
from ringpack.comm import Ring
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import make_plan, shard
from ringpack.ring import RingAttention, ring_attention


def reference_attention(q, k, v, cu_seqlens, *, causal: bool, window_size=(-1, -1), softmax_scale=None,
                        softcap: float = 0.0):
    """Per-document softmax attention over the global pack: ``(out [T, H, D], lse [H, T])``, differentiable."""
    cu = [int(x) for x in cu_seqlens]
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    left, right = window_size
    outs, lses = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        if b == a:
            continue
        qd = q[a:b].transpose(0, 1)  # [H, L, D]
        kd = k[a:b].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[a:b].repeat_interleave(group, dim=1).transpose(0, 1)
        s = qd @ kd.transpose(1, 2) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(b - a, device=q.device)[:, None]
        j = torch.arange(b - a, device=q.device)[None, :]
        visible = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device)
        if causal:
            visible &= j <= i
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        s = s.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [H, L]
        outs.append((torch.softmax(s, dim=-1) @ vd).transpose(0, 1))
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros(n_heads, 0)
    return torch.cat(outs), torch.cat(lses, dim=1)


@dataclass(frozen=True)
class Case:
    """One exactness check: a length mix and an attention configuration."""

    lengths: tuple[int, ...]
    strategy: str = "balanced"
    causal: bool = True
    window_size: tuple[int, int] = (-1, -1)
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    dtype: str = "float64"
    softcap: float = 0.0
    backend: str = "auto"
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        mask = "causal" if self.causal else "full"
        if self.window_size != (-1, -1):
            mask += f" w{self.window_size[0]},{self.window_size[1]}"
        return f"{self.strategy} {mask} h{self.heads}/{self.kv_heads} T={sum(self.lengths)}"


@dataclass
class Result:
    case: Case
    errors: dict[str, float] = field(default_factory=dict)  # max |ring - reference| per tensor
    kernel_errors: dict[str, float] = field(default_factory=dict)  # same backend on the whole batch, one device
    seconds: float = 0.0
    tolerance: float = 0.0
    ok: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["case"]["label"] = self.case.label
        return d


TOLERANCE = {"float64": 1e-10}
GRAD_NAMES = ("out", "lse", "dq", "dk", "dv")


def run_case(case: Case, *, group=None, device: torch.device | str = "cpu", seed: int = 0) -> Result:
    """Run ``case`` on every rank of ``group`` (all ranks call it) and compare with the float64 reference.

    Every rank draws the same global inputs from ``seed``, runs the ring on its shard, and compares
    with its shard of the reference; errors are reduced (max) over the group.
    """
    device = torch.device(device)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    dtype = getattr(torch, case.dtype)
    cu = lengths_to_cu_seqlens(case.lengths)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = draw(total, case.heads, case.head_dim)
    k = draw(total, case.kv_heads, case.head_dim)
    v = draw(total, case.kv_heads, case.head_dim)
    dout = draw(total, case.heads, case.head_dim)
    dlse = draw(case.heads, total)

    ref = _grads(lambda q_, k_, v_: reference_attention(q_, k_, v_, cu, causal=case.causal,
                                                        window_size=case.window_size, softcap=case.softcap),
                 q, k, v, dout, dlse)

    plan = make_plan(cu, world, strategy=case.strategy, causal=case.causal, window_size=case.window_size)
    local = [shard(t, plan, rank).to(device=device, dtype=dtype) for t in (q, k, v, dout)]
    dlse_local = shard(dlse.t(), plan, rank).t().to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    got = _grads(lambda q_, k_, v_: ring_attention(q_, k_, v_, plan, group=group, causal=case.causal,
                                                   window_size=case.window_size, softcap=case.softcap,
                                                   return_lse=True, backend=case.backend),
                 *local[:3], local[3], dlse_local)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    want = [shard(ref[0], plan, rank), shard(ref[1].t(), plan, rank).t(), *(shard(g, plan, rank) for g in ref[2:])]
    errors = _max_over_group([_max_abs(g, w) for g, w in zip(got, want)], group, device)
    result = Result(case, dict(zip(GRAD_NAMES, errors)), seconds=seconds)
    if dtype == torch.float64:
        result.tolerance = TOLERANCE["float64"]
    else:
        result.kernel_errors = _single_device_errors(case, q, k, v, dout, dlse, cu, ref, device, dtype)
        result.tolerance = 1.5  # ratio to the kernel's own error on one device
    result.ok = _judge(result)
    return result


def _judge(result: Result) -> bool:
    values = result.errors.values()
    if any(not math.isfinite(e) for e in values):
        return False
    if not result.kernel_errors:
        return all(e <= result.tolerance for e in values)
    # Low precision: within 1.5x of the same kernel on one device, with a floor at the dtype's rounding step.
    eps = {"bfloat16": 2 ** -8, "float16": 2 ** -11, "float32": 2 ** -24}[result.case.dtype]
    return all(result.errors[n] <= result.tolerance * max(result.kernel_errors[n], eps) for n in GRAD_NAMES)


def _single_device_errors(case, q, k, v, dout, dlse, cu, ref, device, dtype) -> dict[str, float]:
    """Errors of the same backend run on the whole batch on one device (a one-rank plan, no communication)."""
    plan = make_plan(cu, 1, strategy=case.strategy, causal=case.causal, window_size=case.window_size)
    spec = AttnSpec(device_type=device.type, dtype=dtype, head_dim=case.head_dim, num_heads=case.heads,
                    num_kv_heads=case.kv_heads, causal=case.causal, window=case.window_size != (-1, -1),
                    softcap=case.softcap > 0, lse_grad=True)
    impl = select_backend(case.backend, spec)
    scale = 1.0 / math.sqrt(case.head_dim)
    inputs = [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]
    got = _grads(lambda q_, k_, v_: RingAttention.apply(q_, k_, v_, plan, Ring.local(), impl, scale,
                                                        float(case.softcap), True),
                 *inputs[:3], inputs[3], dlse.to(device))
    return dict(zip(GRAD_NAMES, (_max_abs(g, w) for g, w in zip(got, ref))))


def _grads(fn, q, k, v, dout, dlse):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.to(torch.float64) * dout.to(torch.float64)).sum() + (lse.to(torch.float64) * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return [t.detach() for t in (out, lse, dq, dk, dv)]


def _max_abs(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    diff = (got.to(torch.float64).cpu() - want.to(torch.float64).cpu()).abs()
    both_neg_inf = (got.cpu() == float("-inf")) & (want.cpu() == float("-inf"))
    diff = torch.where(both_neg_inf, torch.zeros_like(diff), diff)
    return float(diff.max()) if not torch.isnan(diff).any() else float("nan")


def _max_over_group(values: Sequence[float], group, device) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(values)
    # NaN must win the max: encode it as +inf for the reduction.
    t = torch.tensor([v if math.isfinite(v) or v == float("inf") else float("inf") for v in values],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def default_cases(world: int) -> list[Case]:
    """The embedded suite of ``python -m ringpack check``: every strategy, mask kind and head layout."""
    mixes = [(0, 1, 7, 97, 31, 0, 13, 64), (211,), (5,) * 12 + (3, 1)]
    cases = []
    for strategy in ("balanced", "zigzag", "contiguous"):
        for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (9, -1)), (False, (6, 4))):
            for lengths, (h, hk) in zip(mixes, ((4, 4), (4, 2), (4, 1))):
                cases.append(Case(lengths=lengths, strategy=strategy, causal=causal, window_size=window,
                                  heads=h, kv_heads=hk))
    return cases
