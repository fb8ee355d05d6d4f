"""``python benchmarks/bench.py``: local-kernel throughput, ring efficiency, overlap, memory and strategies on GPUs.

Legend: ``P`` GPUs (one process each, NCCL), ``tpg`` tokens per GPU, ``T1`` the time of the same backend on
the whole batch on one GPU, ``T`` the ring's time on ``P`` GPUs; ring efficiency ``= T1 / (P * T)``.
FLOPs count visible pairs only (from the plan's tiles): forward ``4 * pairs * H * D``, backward 2.5x that.

Every rank runs the same sequence of measurements (they are collective); rank 0 writes ``bench.json``,
``bench.md`` and PNG plots into ``--out``. ``--dry-run`` runs the whole flow on the CPU (gloo, the
reference kernel, tiny sizes) so the script itself can be checked without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import mixes
import torch
import torch.distributed as dist

from ringpack.backends import AttnSpec, Backend, select_backend
from ringpack.comm import Pending, Ring
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import STRATEGIES, Plan, make_plan
from ringpack.ring import RingAttention


@dataclasses.dataclass(frozen=True)
class Shape:
    heads: int = 32  # query heads
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Config:
    """What to measure; every field is a command-line option of the same name."""

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

SECTIONS = ("ring", "million", "kernel", "overlap", "strategy")


class _NullBackend(Backend):
    """The kernel call removed: right shapes, no attention (for the overlap measurement)."""

    name = "none"

    def not_supported_reasons(self, spec):
        return []

    def fwd(self, q_NHD, k_MKD, v_MKD, wave, *, scale, softcap):
        q0, q1 = wave.q_span
        return (q_NHD.new_zeros((q1 - q0, *q_NHD.shape[1:])),
                torch.zeros((q_NHD.shape[1], q1 - q0), dtype=torch.float32, device=q_NHD.device))

    def bwd(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        return (q_NHD.new_zeros((q1 - q0, *q_NHD.shape[1:])), k_MKD.new_zeros((k1 - k0, *k_MKD.shape[1:])),
                v_MKD.new_zeros((k1 - k0, *v_MKD.shape[1:])))


class _NoExchange(Ring):
    """The exchange removed: every shift returns an uninitialised buffer at once (for the overlap measurement)."""

    def shift(self, send, shift, recv_shape, dtype, device):
        return Pending([], torch.empty(recv_shape, dtype=dtype, device=device), None)


def _mixes(tpg: int, world: int) -> dict[str, list[int]]:
    total = tpg * world
    return {"one doc": [total], "8k docs": mixes.uniform(total, min(8192, total)),
            "long tail": mixes.long_tail(total, seed=0)}


def _pairs(plan: Plan) -> int:
    return sum(plan.work(r) for r in range(plan.world_size))


def _flops(pairs: int, shape: Shape, backward: bool) -> float:
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
        fn()
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t
        short = first * self.cfg.reps < self.cfg.min_round_s
        reps = max(self.cfg.reps, min(MAX_REPS, math.ceil(self.cfg.min_round_s / max(first, 1e-6))))
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

    def spec(self, causal: bool = True) -> AttnSpec:
        s = self.cfg.shape
        return AttnSpec(self.device.type, self.dtype, s.head_dim, s.heads, s.kv_heads, causal, False, False, False)

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


def _kernel_section(r: Runner) -> list[dict]:
    """Local kernel throughput: every backend on one GPU over a one-rank plan's waves (no ring)."""
    rows = []
    total = r.cfg.kernel_tokens
    for mix_name, lengths in (("one doc", [total]), ("8k docs", mixes.uniform(total, min(8192, total)))):
        plan = make_plan(lengths_to_cu_seqlens(lengths), 1, strategy="contiguous")
        pairs = _pairs(plan)
        for name in r.cfg.kernel_backends:
            if r.over_budget():
                r.skipped.append(f"kernel {name} {mix_name}")
                continue
            try:
                backend = select_backend(name, r.spec())
            except ValueError as e:
                rows.append({"mix": mix_name, "backend": name, "error": str(e)})
                continue
            for backward in (False, True):
                seconds = r.one_gpu(plan, backend, backward, f"kernel {name} {mix_name} bwd={backward}")
                fwd_s = rows[-1]["seconds"] if backward else seconds
                # Backward alone: fwd+bwd time minus the forward just measured.
                t = seconds - fwd_s if backward else seconds
                row = {"mix": mix_name, "backend": name, "pass": "bwd" if backward else "fwd", "tokens": total,
                       "seconds": seconds, "tflops": float("nan")}
                if t > 0:
                    row["tflops"] = _flops(pairs, r.cfg.shape, False) * (2.5 if backward else 1) / t / 1e12
                else:
                    row["error"] = "fwd+bwd timed faster than fwd (a recompilation inside the timed forward?)"
                rows.append(row)
    return rows


def _ring_section(r: Runner) -> list[dict]:
    """Ring efficiency T1 / (P * T) per backend, mix and tokens per GPU, forward and forward+backward."""
    rows = []
    for tpg in r.cfg.tokens_per_gpu:
        for mix_name, lengths in _mixes(tpg, r.world).items():
            cu = lengths_to_cu_seqlens(lengths)
            ring_plan = make_plan(cu, r.world)
            one_plan = make_plan(cu, 1, strategy="contiguous")
            for name in r.cfg.backends:
                if r.over_budget():
                    r.skipped.append(f"ring {name} {mix_name} {tpg}")
                    continue
                backend = select_backend(name, r.spec())
                for backward in (False, True):
                    what = f"ring {name} {mix_name} {tpg} bwd={backward}"
                    one = r.one_gpu(one_plan, backend, backward, what + " (one GPU)")
                    ring_t = r.ring(ring_plan, Ring(), backend, backward, what)
                    rows.append({"backend": name, "mix": mix_name, "tokens_per_gpu": tpg, "docs": len(lengths),
                                 "pass": "fwd+bwd" if backward else "fwd", "t1_s": one, "ring_s": ring_t,
                                 "efficiency": one / (r.world * ring_t),
                                 "ring_tflops_per_gpu": _flops(_pairs(ring_plan), r.cfg.shape, backward)
                                 / r.world / ring_t / 1e12})
    return rows


def _overlap_section(r: Runner) -> list[dict]:
    """Communication hidden: the ring vs the same ring with the kernel removed and with the exchange removed."""
    rows = []
    name = r.cfg.backends[-1]
    backend = select_backend(name, r.spec())
    for tpg in r.cfg.tokens_per_gpu:
        if r.over_budget():
            r.skipped.append(f"overlap {tpg}")
            continue
        plan = make_plan(lengths_to_cu_seqlens([tpg * r.world]), r.world)
        no_exchange = _NoExchange()
        full = r.ring(plan, Ring(), backend, True, f"overlap {tpg} ring")
        comm_only = r.ring(plan, Ring(), _NullBackend(), True, f"overlap {tpg} kernel removed")
        compute_only = r.ring(plan, no_exchange, backend, True, f"overlap {tpg} exchange removed")
        exposed = max(0.0, full - compute_only)
        rows.append({"backend": name, "tokens_per_gpu": tpg, "ring_s": full, "kernel_removed_s": comm_only,
                     "exchange_removed_s": compute_only, "exposed_comm_s": exposed,
                     "hidden_fraction": 1.0 - min(1.0, exposed / comm_only) if comm_only > 0 else 1.0})
    return rows


def _memory_row(r: Runner, tokens: int, name: str) -> dict:
    """Peak memory of one ring fwd+bwd on a one-document batch, against q, k, v, dout, out and gradients alone."""
    plan = make_plan(lengths_to_cu_seqlens([tokens]), r.world)
    backend = select_backend(name, r.spec())
    run, (q, k, v, dout) = r.attention_fn(plan, Ring(), backend, True)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    base = inputs + sum(t.numel() * t.element_size() for t in (q, q, k, v))  # + out, dq, dk, dv
    r.sync()
    cuda = r.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(r.device)
    others = (torch.cuda.memory_allocated(r.device) - inputs) if cuda else 0  # what this call did not allocate
    t = time.perf_counter()
    run()
    r.sync()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(r.device) - others if cuda else 0
    return {"backend": name, "tokens": tokens, "tokens_per_gpu": plan.num_tokens[r.rank], "seconds_fwd_bwd": seconds,
            "peak_bytes": peak, "qkv_out_grads_bytes": base, "ratio": peak / base if base else 0.0}


def _strategy_section(r: Runner) -> list[dict]:
    """balanced vs zigzag vs contiguous, forward+backward: time, fraction of ideal, bytes on the wire."""
    rows = []
    s = r.cfg.shape
    name = r.cfg.backends[-1]
    backend = select_backend(name, r.spec())
    for tpg in r.cfg.tokens_per_gpu:
        total = tpg * r.world
        for mix_name, lengths in (("2k docs", mixes.uniform(total, min(2048, total))),
                                  ("long tail", mixes.long_tail(total, seed=0))):
            if r.over_budget():
                r.skipped.append(f"strategy {mix_name} {tpg}")
                continue
            cu = lengths_to_cu_seqlens(lengths)
            one_plan = make_plan(cu, 1, strategy="contiguous")
            one = r.one_gpu(one_plan, backend, True, f"strategy {mix_name} {tpg} (one GPU)")
            for strategy in STRATEGIES:
                plan = make_plan(cu, r.world, strategy=strategy)
                t = r.ring(plan, Ring(), backend, True, f"strategy {strategy} {mix_name} {tpg}")
                sent = sum(map(sum, plan.send_tokens))
                rows.append({"backend": name, "mix": mix_name, "tokens_per_gpu": tpg, "strategy": strategy,
                             "ring_s": t, "fraction_of_ideal": one / (r.world * t), "t1_s": one,
                             "fwd_bytes_sent": sent * 2 * s.kv_heads * s.head_dim * torch.finfo(r.dtype).bits // 8,
                             "max_rank_pairs": max(plan.work(x) for x in range(r.world)),
                             "mean_rank_pairs": _pairs(plan) / r.world})
    return rows


def _memory_section(r: Runner) -> list[dict]:
    """Peak memory for one document of ``million`` tokens (the OOM target), then at each tokens-per-GPU size."""
    rows = []
    sizes = ([r.cfg.million] if r.cfg.million else []) + [tpg * r.world for tpg in r.cfg.tokens_per_gpu]
    for tokens in sizes:
        if r.over_budget():
            r.skipped.append(f"memory ({tokens} tokens)")
            continue
        row = r.guarded(f"memory {tokens}", lambda tokens=tokens: _memory_row(r, tokens, r.cfg.backends[-1]))
        rows.append(row if isinstance(row, dict) else {"backend": r.cfg.backends[-1], "tokens": tokens,
                                                       "error": r.errors[-1]})
    return rows


SECTION_FUNCTIONS = {"kernel": _kernel_section, "ring": _ring_section, "overlap": _overlap_section,
                     "strategy": _strategy_section}


def _worker(rank: int, world: int, cfg: Config, init_file: str) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=180), device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    r = Runner(cfg, rank, world)
    results: dict = {"sections": {}}
    try:
        # Most wanted first: sections that do not fit the budget are skipped from the end.
        for section in ("ring", "million", "kernel", "overlap", "strategy"):
            if section not in cfg.sections:
                continue
            if r.over_budget():
                r.skipped.append(section)
                continue
            t = time.perf_counter()
            if section == "million":
                results["sections"]["memory"] = _memory_section(r)
            else:
                results["sections"][section] = SECTION_FUNCTIONS[section](r)
            if rank == 0:
                print(f"bench: {section} done in {time.perf_counter() - t:.1f} s", flush=True)
    finally:
        results["skipped"] = r.skipped
        results["errors"] = r.errors
        results["elapsed_s"] = time.perf_counter() - r.start
        if rank == 0:
            write_results(results, cfg, world)
        dist.destroy_process_group()


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


def write_results(results: dict, cfg: Config, world: int) -> None:
    """``bench.json``, ``bench.md`` and PNG plots (when matplotlib is there) in ``cfg.out``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results["environment"] = environment(cfg, world)
    _derive(results)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text(markdown(results))
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    plot(results, out)


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key, "")
            cells.append(format(value, fmt) if isinstance(value, (int, float)) and fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    env = results["environment"]
    sec = results["sections"]
    lines = ["# ringpack benchmarks", "",
             f"- device: {env.get('device', 'cpu')} x{env['world']}; torch {env['torch']}, CUDA {env['cuda']}, "
             f"NCCL {env.get('nccl', '-')}, cuDNN {env.get('cudnn', '-')}",
             f"- date (UTC): {env['date_utc']}; command: `{env['command']}`",
             f"- shape: {env['config']['shape']}, causal; FLOPs: forward 4*pairs*H*D, backward 2.5x", ""]
    if "kernel" in sec:
        lines += ["## Local kernel throughput (1 GPU, one-rank plan)", ""]
        lines += _table(sec["kernel"], [("mix", "mix", ""), ("backend", "backend", ""), ("pass", "pass", ""),
                                        ("tokens", "tokens", "d"), ("seconds", "seconds", ".4f"),
                                        ("TFLOP/s", "tflops", ".0f"), ("error", "error", "")])
        lines.append("")
    if "ring" in sec:
        lines += ["## Ring efficiency T1 / (P x T)", ""]
        lines += _table(sec["ring"], [("backend", "backend", ""), ("mix", "mix", ""),
                                      ("tokens/GPU", "tokens_per_gpu", "d"), ("docs", "docs", "d"),
                                      ("pass", "pass", ""), ("T1 s", "t1_s", ".4f"),
                                      ("ring s", "ring_s", ".4f"), ("efficiency", "efficiency", ".3f"),
                                      ("TFLOP/s/GPU", "ring_tflops_per_gpu", ".0f")])
        lines.append("")
    if "overlap" in sec:
        lines += ["## Communication hidden (one document, fwd+bwd)", ""]
        lines += _table(sec["overlap"], [("backend", "backend", ""), ("tokens/GPU", "tokens_per_gpu", "d"),
                                         ("ring s", "ring_s", ".4f"), ("kernel removed s", "kernel_removed_s", ".4f"),
                                         ("exchange removed s", "exchange_removed_s", ".4f"),
                                         ("exposed comm s", "exposed_comm_s", ".4f"),
                                         ("hidden", "hidden_fraction", ".3f")])
        lines.append("")
    if "memory" in sec:
        lines += ["## Peak memory per GPU (one document, fwd+bwd)", ""]
        lines += _table(sec["memory"], [("backend", "backend", ""), ("tokens", "tokens", "d"),
                                        ("tokens/GPU", "tokens_per_gpu", "d"), ("fwd+bwd s", "seconds_fwd_bwd", ".3f"),
                                        ("peak GiB", "peak_gib", ".2f"), ("q,k,v,out,grads GiB", "base_gib", ".2f"),
                                        ("ratio", "ratio", ".2f"), ("error", "error", "")])
        lines.append("")
    if "strategy" in sec:
        lines += ["## Strategies (fwd+bwd)", ""]
        lines += _table(sec["strategy"], [("mix", "mix", ""), ("tokens/GPU", "tokens_per_gpu", "d"),
                                          ("strategy", "strategy", ""), ("ring s", "ring_s", ".4f"),
                                          ("fraction of ideal", "fraction_of_ideal", ".3f"),
                                          ("fwd MB sent", "fwd_mb", ".1f"), ("max/mean pairs", "imbalance", ".3f")])
        lines.append("")
    if results.get("errors"):
        lines += ["Errors:", "", *(f"- {e}" for e in results["errors"]), ""]
    if results.get("skipped"):
        lines += ["Skipped (time budget): " + ", ".join(results["skipped"]), ""]
    return "\n".join(lines)


def _derive(results: dict) -> None:
    """Columns computed from the raw numbers, for the tables."""
    for row in results["sections"].get("memory", []):
        row["peak_gib"], row["base_gib"] = row["peak_bytes"] / 2 ** 30, row["qkv_out_grads_bytes"] / 2 ** 30
    for row in results["sections"].get("strategy", []):
        row["fwd_mb"] = row["fwd_bytes_sent"] / 1e6
        row["imbalance"] = row["max_rank_pairs"] / row["mean_rank_pairs"] if row["mean_rank_pairs"] else 1.0


def plot(results: dict, out: Path) -> None:
    import matplotlib.pyplot as plt
    sec = results["sections"]
    if sec.get("kernel"):
        rows = [r for r in sec["kernel"] if "tflops" in r]
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['backend']}\n{r['mix']}\n{r['pass']}" for r in rows]
        ax.bar(range(len(rows)), [r["tflops"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        ax.set_ylabel("TFLOP/s")
        ax.set_title("local kernel throughput (1 GPU)")
        fig.tight_layout()
        fig.savefig(out / "kernel_tflops.png", dpi=120)
        plt.close(fig)
    for key, metric, title, fname in (("ring", "efficiency", "ring efficiency T1/(P*T), fwd+bwd",
                                       "ring_efficiency.png"),
                                      ("strategy", "fraction_of_ideal", "strategies, fwd+bwd: fraction of ideal",
                                       "strategies.png")):
        rows = [r for r in sec.get(key, []) if r.get("pass", "fwd+bwd") == "fwd+bwd"]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            label = f"{r.get('backend')} {r['mix']}" + (f" {r['strategy']}" if "strategy" in r else "")
            series.setdefault(label, []).append((r["tokens_per_gpu"], r[metric]))
        for label, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per GPU")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _names(choices):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(x for x in text.replace(",", " ").split() if x)
        bad = [x for x in values if x not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}; "
                                             f"supported: {', '.join(choices)}")
        return values
    return parse


def parser() -> argparse.ArgumentParser:
    from ringpack.backends import BACKENDS
    names = ("auto", *BACKENDS)
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=None, help="GPUs (processes) to use; default: every visible GPU")
    p.add_argument("--tokens-per-gpu", type=_ints, default=(8192, 32768, 131072))
    p.add_argument("--backends", type=_names(names), default=("torch_flash", "auto"),
                   help="ring backends; the last one also runs the overlap, memory and strategy sections")
    p.add_argument("--kernel-backends", type=_names(names), default=("torch_flash", "cudnn", "flex", "auto"))
    p.add_argument("--kernel-tokens", type=int, default=32768)
    p.add_argument("--reps", type=int, default=3, help="the fewest timed calls per round")
    p.add_argument("--min-round-s", type=float, default=0.1,
                   help="a timed round lasts at least this long; shorter calls are timed in 5 rounds, median kept")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--million", type=int, default=1 << 20, help="tokens of the one-document memory run (0: skip)")
    p.add_argument("--sections", type=_names(SECTIONS), default=SECTIONS)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, gloo, reference kernel, tiny shapes: checks the script, measures nothing")
    return p


def run_bench(args: argparse.Namespace) -> int:
    if args.dry_run:
        world = args.world or 2
        cfg = Config(tokens_per_gpu=(64, 128), backends=("reference",), kernel_backends=("reference",),
                     kernel_tokens=128, reps=1, min_round_s=0.0, budget_s=args.budget_s,
                     million=512 if args.million else 0, sections=args.sections, shape=Shape(4, 2, 16, "float32"),
                     device="cpu", out=args.out)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench: CUDA is not available; use --dry-run to check the script on the CPU")
        world = args.world or torch.cuda.device_count()
        if not 1 <= world <= torch.cuda.device_count():
            raise SystemExit(f"bench: --world {world} but {torch.cuda.device_count()} GPUs are visible")
        cfg = Config(tokens_per_gpu=args.tokens_per_gpu, backends=args.backends, kernel_backends=args.kernel_backends,
                     kernel_tokens=args.kernel_tokens, reps=args.reps, min_round_s=args.min_round_s,
                     budget_s=args.budget_s, million=args.million, sections=args.sections, shape=Shape(),
                     device="cuda", out=args.out)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(world, cfg, os.path.join(tmp, "rendezvous")), nprocs=world)
    print(f"bench: results in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_bench(parser().parse_args()))
