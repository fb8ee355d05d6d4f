"""Command-line jobs behind ``python -m ringpack``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ringpack import distributed
from ringpack.checking import Case, Result, default_cases, run_case
from ringpack.plan import STRATEGIES, make_plan
from ringpack.packing import lengths_to_cu_seqlens


def _int_pair(text: str) -> tuple[int, int]:
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT (integers, -1 = unbounded), got {text!r}") from None
    return left, right


def _lengths(args: argparse.Namespace) -> tuple[int, ...] | None:
    if getattr(args, "lengths_file", None):
        text = Path(args.lengths_file).read_text()
        return tuple(int(x) for x in text.replace(",", " ").split())
    if getattr(args, "lengths", None):
        return tuple(int(x) for x in args.lengths.replace(",", " ").split())
    return None


def add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="distributed exactness check against a float64 reference",
                       description="Run ring attention on every rank and compare out, lse, dq, dk, dv with a "
                                   "single-process float64 reference. Under torchrun it uses the launched world; "
                                   "launched plainly it spawns --world local ranks (CPU/gloo without GPUs).")
    p.add_argument("--world", type=int, default=2, help="ranks to spawn when not launched by torchrun (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", default="auto", help="local kernel backend (default auto)")
    p.add_argument("--strategy", choices=("all", *STRATEGIES), default=None)
    p.add_argument("--dtype", choices=("float64", "float32", "bfloat16", "float16"), default=None)
    p.add_argument("--lengths", help="document lengths, comma separated (e.g. 4096,97,1)")
    p.add_argument("--lengths-file", help="file of document lengths, whitespace or comma separated")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--window", type=_int_pair, default=None, help="LEFT,RIGHT (default -1,-1)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every result to this JSON file (rank 0)")
    p.set_defaults(run=run_check)


def _cases(args: argparse.Namespace, world: int) -> list[Case]:
    custom = [args.strategy, args.dtype, _lengths(args), args.causal, args.window, args.heads, args.kv_heads,
              args.head_dim, args.softcap]
    if all(x is None for x in custom) and args.backend == "auto":
        return default_cases(world)
    lengths = _lengths(args) or (0, 1, 7, 97, 31, 13, 64)
    strategies = STRATEGIES if args.strategy in (None, "all") else (args.strategy,)
    heads = args.heads or 4
    return [Case(lengths=lengths, strategy=s, causal=True if args.causal is None else args.causal,
                 window_size=args.window or (-1, -1), heads=heads, kv_heads=args.kv_heads or heads,
                 head_dim=args.head_dim or 16, dtype=args.dtype or "float64", softcap=args.softcap or 0.0,
                 backend=args.backend) for s in strategies]


def _row(result: Result) -> str:
    worst = max(result.errors.values()) if result.errors else float("nan")
    kernel = max(result.kernel_errors.values()) if result.kernel_errors else None
    kernel_text = f"{kernel:10.2e}" if kernel is not None else f"{'-':>10}"
    return (f"{result.case.label:<44} {worst:10.2e} {kernel_text} {result.seconds * 1e3:9.1f}  "
            f"{'ok' if result.ok else 'FAIL'}")


def check_worker(args: argparse.Namespace) -> bool:
    """Run the check's cases on this rank (all ranks call it); rank 0 prints and writes JSON."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = distributed.default_device()
    cases = _cases(args, world)
    if rank == 0:
        print(f"ringpack check: world={world} device={device.type} backend={args.backend} cases={len(cases)}")
        print(f"{'case':<44} {'max err':>10} {'1-dev err':>10} {'time ms':>9}  status", flush=True)
    results = []
    for case in cases:
        result = run_case(case, device=device, seed=args.seed)
        results.append(result)
        if rank == 0:
            print(_row(result), flush=True)
    ok = all(r.ok for r in results)
    if rank == 0:
        print(f"{sum(r.ok for r in results)} passed, {sum(not r.ok for r in results)} failed")
        if args.json:
            Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return ok


def _spawned(local_rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    distributed.init_spawned(local_rank, world, init_file)
    try:
        ok = check_worker(args)
    finally:
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def run_check(args: argparse.Namespace) -> int:
    if distributed.launched():
        distributed.init_distributed()
        try:
            ok = check_worker(args)
        finally:
            dist.destroy_process_group()
        return 0 if ok else 1
    if args.world < 1:
        print(f"--world must be >= 1, got {args.world}", file=sys.stderr)
        return 2
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"--device cuda needs {args.world} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    if args.device != "auto":
        os.environ["RINGPACK_DEVICE"] = args.device
    with tempfile.TemporaryDirectory() as tmp:
        try:
            torch.multiprocessing.spawn(_spawned, args=(args.world, os.path.join(tmp, "rendezvous"), args),
                                        nprocs=args.world)
        except torch.multiprocessing.ProcessExitedException:
            return 1
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show how a pack is split across ranks and what each step computes")
    p.add_argument("--lengths", help="document lengths, comma separated")
    p.add_argument("--lengths-file", help="file of document lengths")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--strategy", choices=STRATEGIES, default="balanced")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--window", type=_int_pair, default=(-1, -1))
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    lengths = _lengths(args)
    if lengths is None:
        print("plan: give --lengths or --lengths-file", file=sys.stderr)
        return 2
    plan = make_plan(lengths_to_cu_seqlens(lengths), args.world, strategy=args.strategy, causal=args.causal,
                     window_size=args.window)
    print(plan.summary())
    return 0
