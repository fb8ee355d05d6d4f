"""The timing rule every benchmark here follows, and the one-rank runner the one-GPU scripts share.

Legend: ``P`` ranks, ``T1`` the time of a backend on the whole batch on one GPU. FLOPs count visible pairs only
(from the plan's tiles): forward ``4 * pairs * H * D``, backward 2.5x that.

``Runner.timed`` is the rule: two warm-ups (compilation and first-call costs stay out of the numbers and are
reported apart where a script measures them), then rounds of a fixed number of calls, the median of five rounds
for short calls, the max over ranks when collective. ``script_runner`` gives the one-rank runner of the one-GPU
scripts (``tile_kernels.py``, ``rank_compute.py``): Llama-3-8B attention in bf16 on CUDA, or a tiny float64
shape on the CPU with ``--dry-run``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ringpack.backends import AttnSpec, Backend
from ringpack.comm import Ring
from ringpack.plan import Plan
from ringpack.ring import RingAttention


@dataclasses.dataclass(frozen=True)
class Shape:
    heads: int = 32  # query heads
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Config:
    """What to measure; every field is a command-line option of ``bench.py`` of the same name."""

    tokens_per_gpu: tuple[int, ...]  # ring efficiency and strategy grids
    backends: tuple[str, ...]  # ring efficiency backends
    kernel_backends: tuple[str, ...]  # local-kernel throughput backends
    kernel_tokens: int  # tokens of the local-kernel batches
    reps: int  # the fewest timed calls per round (see Runner.timed)
    min_round_s: float  # a timed round lasts at least this long (up to MAX_REPS calls)
    budget_s: float  # sections left when this is spent are skipped (and listed as skipped)
    million: int  # tokens of the one-document memory run (0 skips it)
    sections: tuple[str, ...]
    shape: Shape
    device: str  # "cuda" or "cpu" (dry run)
    out: str


MAX_REPS = 200  # timed calls per round at most
SHORT_ROUNDS = 5  # rounds (median taken) when ``reps`` calls take less than ``min_round_s``


def visible_pairs(plan: Plan) -> int:
    return sum(plan.work(r) for r in range(plan.world_size))


def flops(pairs: int, shape: Shape, backward: bool) -> float:
    fwd = 4.0 * pairs * shape.heads * shape.head_dim
    return fwd * (3.5 if backward else 1.0)


class Runner:
    """Collective timing helpers for one rank."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device(cfg.device, rank) if cfg.device == "cuda" else torch.device("cpu")
        self.dtype = getattr(torch, cfg.shape.dtype)
        self.start = time.perf_counter()
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.gen = torch.Generator(device=self.device).manual_seed(rank)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def over_budget(self) -> bool:
        """Rank 0's clock decides for everyone, so that all ranks skip the same measurements."""
        flag = torch.tensor([float(time.perf_counter() - self.start > self.cfg.budget_s)], device=self.device)
        if self.world > 1:
            dist.broadcast(flag, 0)
        return bool(flag.item())

    def timed(self, fn, *, collective: bool = True) -> float:
        """Seconds per call of ``fn``, the max over ranks when collective.

        Two warm-ups (a compiled backend, flex, may compile again on its second call, when torch.compile turns
        sizes dynamic; one warm-up left that compile inside flex's timed forward on 2026-11-23). Then rounds of
        at least ``reps`` calls and ``min_round_s`` seconds; short calls get five rounds and their median, since
        a few milliseconds timed once moved by 5% between runs on 2026-11-23."""
        first, reps = self._warm_up(fn)
        short = first * self.cfg.reps < self.cfg.min_round_s
        if collective and self.world > 1:  # every rank runs the same rounds of the same number of calls
            n = torch.tensor([reps, int(short)], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            reps, short = int(n[0].item()), bool(n[1].item())
        rounds = SHORT_ROUNDS if short else 1
        times = []
        for _ in range(rounds):
            if collective and self.world > 1:
                dist.barrier()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            self.sync()
            seconds = (time.perf_counter() - t) / reps
            if collective and self.world > 1:
                s = torch.tensor([seconds], device=self.device, dtype=torch.float64)
                dist.all_reduce(s, op=dist.ReduceOp.MAX)
                seconds = float(s.item())
            times.append(seconds)
        return sorted(times)[len(times) // 2]

    def timed_interleaved(self, fns, rounds: int = SHORT_ROUNDS) -> list[float]:
        """Seconds per call of each of ``fns`` (one rank, no collective), measured in alternating rounds.

        Each function gets ``timed``'s two warm-ups and its own number of calls per round (at least ``reps`` and
        ``min_round_s``), then ``rounds`` rounds run the functions one after another, the median of each taken.
        Functions compared with each other (a whole batch against each rank's share of it) then see the same GPU
        clocks and temperature: timed one after another, the later ones ran up to 3% slower on an H200."""
        reps = [self._warm_up(fn)[1] for fn in fns]
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(rounds):
            for fn, n, out in zip(fns, reps, times):
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                self.sync()
                out.append((time.perf_counter() - t) / n)
        return [sorted(x)[len(x) // 2] for x in times]

    def _warm_up(self, fn) -> tuple[float, int]:
        """Two calls of ``fn``; the seconds of the second, and the calls a round of ``timed`` makes of it."""
        fn()
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t
        return first, max(self.cfg.reps, min(MAX_REPS, math.ceil(self.cfg.min_round_s / max(first, 1e-6))))

    def on_rank0(self, fn) -> float:
        """Run a one-GPU measurement on rank 0 while the others wait; everyone gets the result."""
        result = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.rank == 0:
            result[0] = fn()
        if self.world > 1:
            dist.broadcast(result, 0)
        return float(result.item())

    def guarded(self, what: str, fn):
        """``fn()``, or NaN with the error recorded and printed at once: one failing backend must not cost
        the other measurements (every rank runs the same code, so they fail alike and stay in step)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - recorded in the results and printed with its traceback
            self.errors.append(f"{what}: {type(e).__name__}: {e}")
            print(f"bench rank {self.rank}: {what} failed", file=sys.stderr, flush=True)
            traceback.print_exc()
            return float("nan")

    def one_gpu(self, plan: Plan, backend: Backend, backward: bool, what: str = "one GPU") -> float:
        """T1: the one-rank ``plan`` (the whole batch) timed on rank 0's GPU."""
        return self.on_rank0(lambda: self.guarded(what, lambda: self.timed(
            self.attention_fn(plan, Ring.local(), backend, backward)[0], collective=False)))

    def ring(self, plan: Plan, ring: Ring, backend: Backend, backward: bool, what: str) -> float:
        """The ring on every rank, the max over ranks."""
        return self.guarded(what, lambda: self.timed(self.attention_fn(plan, ring, backend, backward)[0]))

    def qkv(self, n: int, requires_grad: bool):
        s = self.cfg.shape
        make = [(n, s.heads, s.head_dim), (n, s.kv_heads, s.head_dim), (n, s.kv_heads, s.head_dim)]
        return [torch.randn(*m, device=self.device, dtype=self.dtype, generator=self.gen).requires_grad_(requires_grad)
                for m in make]

    def spec(self, causal: bool = True, window: bool = False, softcap: bool = False) -> AttnSpec:
        s = self.cfg.shape
        return AttnSpec(self.device.type, self.dtype, s.head_dim, s.heads, s.kv_heads, causal, window, softcap, False)

    def attention_fn(self, plan: Plan, ring: Ring, backend: Backend, backward: bool):
        """A closure running the ring (or, with a one-rank plan and ring, the whole batch) once."""
        n = plan.num_tokens[ring.rank]
        q, k, v = self.qkv(n, backward)
        dout = torch.randn(q.shape, device=self.device, dtype=self.dtype, generator=self.gen)
        scale = 1.0 / math.sqrt(self.cfg.shape.head_dim)

        def run():
            out, _ = RingAttention.apply(q, k, v, plan, ring, backend, scale, 0.0, False)
            if backward:
                torch.autograd.grad(out, (q, k, v), dout)

        return run, (q, k, v, dout)


def environment(cfg: Config, world: int) -> dict:
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "world": world,
           "config": dataclasses.asdict(cfg)}
    if cfg.device == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def script_runner(dry_run: bool, *, budget_s: float = float("inf"), min_round_s: float = 0.2,
                  out: str = "") -> Runner:
    """A one-rank ``Runner`` for a one-GPU benchmark script: Llama-3-8B attention in bf16 on CUDA, or a tiny
    float64 shape on the CPU with ``dry_run``; its ``timed`` is the rule every benchmark here times by."""
    shape = Shape(heads=4, kv_heads=2, head_dim=16, dtype="float64") if dry_run else Shape()
    cfg = Config(tokens_per_gpu=(), backends=(), kernel_backends=(), kernel_tokens=0, reps=1 if dry_run else 3,
                 min_round_s=0.0 if dry_run else min_round_s, budget_s=budget_s, million=0, sections=(),
                 shape=shape, device="cpu" if dry_run else "cuda", out=out)
    return Runner(cfg, 0, 1)


def script_environment(script: str, argv: list[str], device: torch.device, **extra) -> dict:
    """Device, versions, date and command line of a one-GPU benchmark script's run, for its JSON and markdown."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([f"python {script}", *argv]), **extra}


def report_header(title: str, env: dict, notes: list[str]) -> list[str]:
    """The opening lines of a benchmark script's markdown report: title, device, versions, command, ``notes``."""
    return [f"# {title}", "", f"- device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}; date (UTC) "
            f"{env['date']}", f"- command: `{env['command']}`", *notes, ""]
