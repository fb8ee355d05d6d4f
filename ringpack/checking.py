"""Exactness checks: ring-vs-reference cases run on every rank, judged against the float64 reference of
``ringpack.yardstick``.

Used by ``python -m ringpack check`` and by the test-suite, so that what a cluster operator runs is
exactly what CI proves.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ringpack.attention import ring_attention
from ringpack.distributed import verify_plan
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import STRATEGIES, make_plan
from ringpack.sharding import shard
from ringpack.validation import integer, real
from ringpack.yardstick import reference_attention, reference_grads

__all__ = ["Case", "Result", "default_cases", "reference_attention", "reference_grads", "run_case", "token_mix"]

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
    inject: str = ""  # "nan" or "inf": put one into a key of the longest document; "" for none
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        mask = "causal" if self.causal else "full"
        if self.window_size != (-1, -1):
            mask += f" w{self.window_size[0]},{self.window_size[1]}"
        extra = "" if self.dtype == "float64" else f" {SHORT_DTYPES.get(self.dtype, self.dtype)}"
        extra += f" cap{self.softcap:g}" if self.softcap else ""
        extra += f" +{self.inject}" if self.inject else ""
        return f"{self.strategy} {mask} h{self.heads}/{self.kv_heads} T={sum(self.lengths)}{extra}"

    @property
    def compared(self) -> tuple[str, ...]:
        """Tensors compared value by value with the reference; with an injected NaN/Inf, out and lse only."""
        return GRAD_NAMES[:2] if self.inject else GRAD_NAMES

    def validate(self, world: int) -> None:
        """Raise a ValueError naming the field that cannot run on ``world`` ranks."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; supported: {', '.join(DTYPES)}")
        if self.inject not in INJECT:
            raise ValueError(f"inject {self.inject!r} is not supported; supported: {', '.join(map(repr, INJECT))}")
        cu = lengths_to_cu_seqlens(self.lengths)
        if self.inject and not cu[-1]:
            raise ValueError("inject needs at least one token to put the value into")
        for name in ("heads", "kv_heads", "head_dim"):
            integer(name, getattr(self, name), minimum=1)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        real("softcap (0 disables it)", self.softcap, minimum=0)
        make_plan(cu, world, strategy=self.strategy, causal=self.causal, window_size=self.window_size)


DTYPES = ("float64", "float32", "bfloat16", "float16")
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # in case labels
INJECT = ("", "nan", "inf")
GRAD_NAMES = ("out", "lse", "dq", "dk", "dv")
FLOAT64_TOLERANCE = 1e-10  # the merge is exact: float64 rounding only
LOW_PRECISION_RATIO = 1.5  # ring error / error of the same kernel on one device
ROUNDING = {"bfloat16": 2 ** -9, "float16": 2 ** -12, "float32": 2 ** -25}  # unit roundoff: floor of the yardstick


@dataclass
class Result:
    """What ``run_case`` found, the same on every rank (reduced over the group)."""

    case: Case
    errors: dict[str, float] = field(default_factory=dict)  # max |ring - reference| over entries finite in both
    kernel_errors: dict[str, float] = field(default_factory=dict)  # same backend, whole batch, one device
    rel_errors: dict[str, float] = field(default_factory=dict)  # ||ring - reference||_2 / ||reference||_2
    kernel_rel_errors: dict[str, float] = field(default_factory=dict)  # the same, one device
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/+Inf entries in the ring's result
    hidden: dict[str, int] = field(default_factory=dict)  # NaN/+Inf in the reference, finite in the ring's result
    leaked: dict[str, int] = field(default_factory=dict)  # NaN/+Inf in the ring's result, finite in the reference
    seconds: float = 0.0  # ring forward + backward on this rank
    ok: bool = False
    reason: str = ""  # why it failed; "" when ok

    @property
    def max_error(self) -> float:
        return max((self.errors[n] for n in self.case.compared if n in self.errors), default=0.0)

    @property
    def max_kernel_error(self) -> float:
        return max((self.kernel_errors[n] for n in self.case.compared if n in self.kernel_errors), default=0.0)

    @property
    def error_ratio(self) -> float:
        """Worst ring / one-device ratio of norm-wise relative errors (what 16-bit cases are judged by)."""
        return max((self.rel_errors[n] / max(self.kernel_rel_errors[n], ROUNDING[self.case.dtype])
                    for n in self.case.compared if n in self.kernel_rel_errors), default=0.0)

    def reference_nonfinite(self, name: str) -> int:
        """NaN/+Inf entries of the reference's ``name`` (those the ring has too, and those it hid)."""
        return self.nonfinite[name] - self.leaked[name] + self.hidden[name]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["case"]["label"] = self.case.label
        return d


def token_mix(total: int, *, seed: int = 0) -> tuple[int, ...]:
    """A document-length mix adding up to ``total`` tokens: a long document (a third), an empty one, a
    one-token one, and log-uniform lengths for the rest, shuffled (deterministic for ``seed``)."""
    total = integer("tokens", total, minimum=1)
    rng = random.Random(seed)
    lengths = [total // 3, 0, 1] if total >= 3 else [total, 0]
    left = total - sum(lengths)
    longest = max(2, total // 4)
    while left > 0:
        n = min(left, int(math.exp(rng.uniform(0.0, math.log(longest)))))
        lengths.append(n)
        left -= n
    rng.shuffle(lengths)
    return tuple(lengths)


def _inputs(case: Case, cu: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Global float64 ``q, k, v, dout, dlse``, the same on every rank for a seed."""
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = draw(total, case.heads, case.head_dim)
    k = draw(total, case.kv_heads, case.head_dim)
    v = draw(total, case.kv_heads, case.head_dim)
    if case.inject:
        # A key in the middle of the longest document: every rank holding part of it must see the value.
        lengths = list(case.lengths)
        doc = lengths.index(max(lengths))
        k[int(cu[doc]) + lengths[doc] // 2, 0, 0] = float(case.inject)
    return [q, k, v, draw(total, case.heads, case.head_dim), draw(case.heads, total)]


def run_case(case: Case, *, group=None, device: torch.device | str = "cpu", seed: int = 0,
             single_device: bool = True, progress=None) -> Result:
    """Run ``case`` on every rank of ``group`` (all ranks call it) and compare with the float64 reference.

    Every rank draws the same global inputs from ``seed``, checks that every rank built the same plan,
    computes the float64 reference on ``device``, runs the ring on its shard and compares with its shard of
    the reference; results are reduced over the group. The same backend also runs on the whole batch on one
    device, as the yardstick for low-precision dtypes; ``single_device=False`` skips it (float64 only, whose
    bound is absolute). ``progress(phase, fraction)``, when given, hears each phase as it starts ("reference",
    "ring", "one device"; ``fraction`` None) and how far the reference has got (``fraction`` from 0 to 1).
    """
    if not single_device and case.dtype != "float64":
        raise ValueError(f"single_device=False needs dtype float64 (an absolute bound); {case.dtype} is judged "
                         "against the same kernel on one device")
    device = torch.device(device)
    report = progress or (lambda phase, fraction: None)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    cu = lengths_to_cu_seqlens(case.lengths)
    plan = make_plan(cu, world, strategy=case.strategy, causal=case.causal, window_size=case.window_size)
    verify_plan(plan, group)
    inputs = [t.to(device) for t in _inputs(case, cu, seed)]
    report("reference", 0.0)
    ref = reference_grads(*inputs, cu, causal=case.causal, window_size=case.window_size, softcap=case.softcap,
                          progress=lambda fraction: report("reference", fraction))
    report("ring", None)
    result = _ring_result(case, plan, rank, group, inputs, ref, device)
    if single_device:
        report("one device", None)
        result.kernel_errors, result.kernel_rel_errors = _single_device_errors(case, *inputs, cu, ref, device,
                                                                               getattr(torch, case.dtype))
    result.reason = _judge(result)
    result.ok = not result.reason
    return result


def _ring_result(case: Case, plan, rank: int, group, inputs, ref, device: torch.device) -> Result:
    """Run the ring on this rank's shard of ``inputs`` and compare with the reference, reduced over the group."""
    dtype = getattr(torch, case.dtype)
    q, k, v, dout, dlse = inputs
    local = [shard(t, plan, rank).to(dtype) for t in (q, k, v, dout)]
    dlse_local = shard(dlse.t(), plan, rank).t()
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
    stats = [_compare(g, w) for g, w in zip(got, want)]
    errors = _reduce([s[0] for s in stats], dist.ReduceOp.MAX, group, device)
    # Squared norms add over ranks: sum ||ring - ref||^2 and ||ref||^2 over every shard.
    squares = _reduce([x for s in stats for x in s[1:3]], dist.ReduceOp.SUM, group, device)
    counts = _reduce([c for s in stats for c in s[3:]], dist.ReduceOp.SUM, group, device)
    return Result(case, dict(zip(GRAD_NAMES, errors)), seconds=seconds,
                  rel_errors=dict(zip(GRAD_NAMES, map(_relative, squares[0::2], squares[1::2]))),
                  nonfinite=dict(zip(GRAD_NAMES, map(int, counts[0::3]))),
                  hidden=dict(zip(GRAD_NAMES, map(int, counts[1::3]))),
                  leaked=dict(zip(GRAD_NAMES, map(int, counts[2::3]))))


def _judge(result: Result) -> str:
    """Why ``result`` fails, or "" when it passes."""
    case = result.case
    for name in GRAD_NAMES:
        ring, reference = result.nonfinite[name], result.reference_nonfinite(name)
        if not case.inject:
            # Nothing was injected: a NaN/Inf anywhere is a failure, even where both agree (softcap=inf once made
            # every output and the reference NaN, and an error over no finite entry is 0).
            if ring or reference:
                return f"{ring} NaN/Inf in {name} of the ring, {reference} in the reference; none was injected"
        elif name not in case.compared:
            # Where an injected value lands in a gradient depends on how the products are grouped (a
            # dense reference poisons whole documents, a tiled kernel whole tiles, through 0 * NaN);
            # that it lands is what must hold.
            if reference and not ring:
                return f"NaN/Inf of the reference vanished from {name}"
        elif result.hidden[name]:
            return f"{result.hidden[name]} NaN/Inf of the reference hidden in {name}"
        elif result.leaked[name]:
            return f"{result.leaked[name]} NaN/Inf in {name} where the reference is finite"
    for name in case.compared:
        if case.dtype == "float64":
            err, bound, what = result.errors[name], FLOAT64_TOLERANCE, "max error"
        else:
            # Norm-wise: a max over entries would judge the rounding of one entry (a partial rounded to 16 bits
            # per tile lands on a different side than once), while a wrong tile or merge moves the whole norm.
            err, what = result.rel_errors[name], "relative error"
            bound = LOW_PRECISION_RATIO * max(result.kernel_rel_errors[name], ROUNDING[case.dtype])
        if not err <= bound:
            return f"{name} {what} {err:.2e} > {bound:.2e}"
    return ""


def _single_device_errors(case, q, k, v, dout, dlse, cu, ref, device,
                          dtype) -> tuple[dict[str, float], dict[str, float]]:
    """Errors of the same backend run on the whole batch on one device (a one-rank plan, no communication)."""
    plan = make_plan(cu, 1, strategy=case.strategy, causal=case.causal, window_size=case.window_size)
    # A one-rank plan may still reorder documents (``balanced`` does): run and compare in its local order. It runs
    # on this device alone inside the job (no communication).
    inputs = [shard(t, plan, 0).to(device=device, dtype=dtype) for t in (q, k, v, dout)]
    got = _grads(lambda q_, k_, v_: ring_attention(q_, k_, v_, plan, causal=case.causal, window_size=case.window_size,
                                                   softcap=case.softcap, return_lse=True, backend=case.backend),
                 *inputs[:3], inputs[3], shard(dlse.t(), plan, 0).t().to(device))
    want = [shard(ref[0], plan, 0), shard(ref[1].t(), plan, 0).t(), *(shard(g, plan, 0) for g in ref[2:])]
    stats = [_compare(g, w) for g, w in zip(got, want)]
    return (dict(zip(GRAD_NAMES, (st[0] for st in stats))),
            dict(zip(GRAD_NAMES, (_relative(st[1], st[2]) for st in stats))))


def _grads(fn, q, k, v, dout, dlse):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.to(torch.float64) * dout.to(torch.float64)).sum() + (lse.to(torch.float64) * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return [t.detach() for t in (out, lse, dq, dk, dv)]


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float, int, int, int]:
    """``(max error, ||got - want||^2, ||want||^2`` over entries finite in both``, NaN/+Inf in got, of them
    hidden, of them leaked)``.

    ``-inf`` is a value (the lse of a row that sees no key) and must match exactly; NaN and ``+inf``
    are poison, and poison must show wherever the reference has it.
    """
    g, w = got.detach().to(torch.float64).cpu(), want.detach().to(torch.float64).cpu()
    g_poison, w_poison = torch.isnan(g) | (g == float("inf")), torch.isnan(w) | (w == float("inf"))
    both = torch.isfinite(g) & torch.isfinite(w)
    diff = (g - w)[both]
    err = float(diff.abs().max()) if both.any() else 0.0
    if ((g == float("-inf")) != (w == float("-inf")))[~g_poison & ~w_poison].any():
        err = float("inf")
    return (err, float(diff.square().sum()), float(w[both].square().sum()), int(g_poison.sum()),
            int((w_poison & ~g_poison).sum()), int((g_poison & ~w_poison).sum()))


def _relative(diff_sq: float, ref_sq: float) -> float:
    return math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)


def _reduce(values: Sequence[float], op, group, device) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def default_cases(world: int) -> list[Case]:
    """The embedded suite of ``python -m ringpack check``: every strategy, mask kind and head layout."""
    mixes = [(0, 1, 7, 97, 31, 0, 13, 64), (211,), (5,) * 12 + (3, 1)]
    cases = []
    for strategy in STRATEGIES:
        for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (9, -1)), (False, (6, 4))):
            for lengths, (h, hk) in zip(mixes, ((4, 4), (4, 2), (4, 1))):
                cases.append(Case(lengths=lengths, strategy=strategy, causal=causal, window_size=window,
                                  heads=h, kv_heads=hk))
    return cases
