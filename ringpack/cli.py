"""``python -m ringpack check``: the distributed exactness check that an operator runs before a long job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ringpack import distributed
from ringpack.backends import BACKENDS
from ringpack.checking import DTYPES, Case, Result, default_cases, run_case, token_mix
from ringpack.plan import STRATEGIES


def _int_pair(text: str) -> tuple[int, int]:
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT (integers, -1 = unbounded), got {text!r}") from None
    return left, right


def _positive(kind):
    what = {int: "an integer", float: "a number"}[kind]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
        return value
    return parse


def _parse_lengths(text: str, where: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{where}: expected document lengths (integers >= 0) separated by commas or spaces, "
                         f"got {text.strip()[:80]!r}") from None
    if not lengths or min(lengths) < 0:
        raise ValueError(f"{where}: expected at least one document length, all >= 0, got {text.strip()[:80]!r}")
    return lengths


def _lengths(args: argparse.Namespace) -> tuple[int, ...] | None:
    if getattr(args, "lengths_file", None):
        return _parse_lengths(Path(args.lengths_file).read_text(), f"--lengths-file {args.lengths_file}")
    if getattr(args, "lengths", None):
        return _parse_lengths(args.lengths, "--lengths")
    if getattr(args, "tokens", None):
        return token_mix(args.tokens, seed=args.seed)
    return None


def add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="distributed exactness check against a float64 reference",
                       description="Run ring attention on every rank and compare out, lse, dq, dk, dv with a "
                                   "single-process float64 reference, and with the same kernel run on one device. "
                                   "Under torchrun, mpirun, the DeepSpeed launcher or srun it uses the launched "
                                   "world; launched plainly it spawns --world local ranks (CPU/gloo without GPUs). "
                                   "Without case options it runs the embedded suite (every strategy, mask kind and "
                                   "head layout); each case option replaces that field in every case of the suite.")
    p.add_argument("--world", type=_positive(int), default=None,
                   help="ranks to spawn when not launched (default 2); under a launcher it must match the world")
    p.add_argument("--device", choices=distributed.DEVICES, default="auto",
                   help="auto: GPUs (NCCL) when torch sees them, else CPU (gloo)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="local kernel backend")
    p.add_argument("--strategy", choices=("all", *STRATEGIES), default="all")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="float64 must match the reference to 1e-10; lower precisions must stay within 1.5x "
                        "of the same kernel's error on one device (norm-wise relative error; column ratio)")
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument("--lengths", help="document lengths, comma separated (e.g. 4096,97,1,0)")
    lengths.add_argument("--lengths-file", help="file of document lengths, whitespace or comma separated")
    lengths.add_argument("--tokens", type=_positive(int),
                         help="generate a length mix of this many tokens (a long document, an empty one, a "
                              "one-token one, log-uniform others; from --seed)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--window", type=_int_pair, default=None,
                   help="--window=LEFT,RIGHT (-1 = unbounded; write it with '=' when it starts with '-')")
    p.add_argument("--heads", type=_positive(int), default=None, help="query heads")
    p.add_argument("--kv-heads", type=_positive(int), default=None,
                   help="KV heads (must divide --heads; default: --heads when that is given)")
    p.add_argument("--head-dim", type=_positive(int), default=None)
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--inject", choices=("nan", "inf"), default=None,
                   help="put a NaN or +Inf into one key of every case: it must reach the output wherever it "
                        "reaches the reference's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=_positive(float), default=distributed.DEFAULT_TIMEOUT_S,
                   help="seconds a rank waits for another before failing (default %(default)s)")
    p.add_argument("--json", help="write every result to this JSON file (rank 0)")
    p.set_defaults(run=run_check)


def _cases(args: argparse.Namespace, world: int) -> list[Case]:
    """The embedded suite with every field given on the command line replaced, without duplicates."""
    fields = {"dtype": args.dtype, "causal": args.causal, "window_size": args.window, "head_dim": args.head_dim,
              "softcap": args.softcap, "lengths": _lengths(args), "inject": args.inject}
    fields = {name: value for name, value in fields.items() if value is not None}
    if args.heads is not None:
        fields["heads"] = args.heads
        fields["kv_heads"] = args.kv_heads or args.heads
    elif args.kv_heads is not None:
        fields["kv_heads"] = args.kv_heads
    fields["backend"] = args.backend
    cases = []
    for case in default_cases(world):
        if args.strategy not in ("all", case.strategy):
            continue
        case = dataclasses.replace(case, **fields)
        if case not in cases:
            case.validate(world)
            cases.append(case)
    return cases


def _row(index: int, count: int, result: Result) -> str:
    width = len(str(count))
    status = "ok" if result.ok else f"FAIL: {result.reason}"
    ratio = "-" if result.case.dtype == "float64" else f"{result.error_ratio:.2f}"
    return (f"[{index:>{width}}/{count}] {result.case.label:<44} {result.max_error:10.2e} "
            f"{result.max_kernel_error:10.2e} {ratio:>6} {result.seconds * 1e3:9.1f}  {status}")


def check_worker(args: argparse.Namespace, launcher: str) -> bool:
    """Run the check's cases on this rank (all ranks call it); rank 0 prints progress and writes JSON."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.world is not None and args.world != world:
        raise ValueError(f"--world {args.world} does not match the launched world of {world} ranks")
    device = distributed.default_device()
    cases = _cases(args, world)
    if rank == 0:
        print(f"ringpack check: world={world} launcher={launcher} device={device.type} backend={args.backend} "
              f"cases={len(cases)} timeout={args.timeout:g}s")
        pad = " " * (2 * len(str(len(cases))) + 3)
        print(f"{pad} {'case':<44} {'max err':>10} {'1-dev err':>10} {'ratio':>6} {'time ms':>9}  status", flush=True)
    results = []
    for i, case in enumerate(cases, 1):
        results.append(run_case(case, device=device, seed=args.seed))
        if rank == 0:
            print(_row(i, len(cases), results[-1]), flush=True)
    passed = sum(r.ok for r in results)
    if rank == 0:
        print(f"{passed} passed, {len(results) - passed} failed", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"world": world, "launcher": launcher, "device": device.type, "backend": args.backend,
                 "passed": passed, "failed": len(results) - passed, "results": [r.as_dict() for r in results]},
                indent=2))
    return passed == len(results)


def _worker_status(args: argparse.Namespace, launcher: str) -> int:
    """Exit status of this rank: 0 all passed, 1 a case failed or a rank fault, 2 bad input."""
    try:
        ok = check_worker(args, launcher)
    except ValueError as e:
        print(f"ringpack check: rank {dist.get_rank()}: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        # A fault (dead or stalled rank): say so in one line; the process group is unusable now.
        print(f"ringpack check: rank {dist.get_rank()} failed: {e}", file=sys.stderr, flush=True)
        return 1
    dist.destroy_process_group()
    return 0 if ok else 1


def _spawned(local_rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    # Ranks share this machine's cores: more threads than cores only slows every rank down.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    distributed.init_spawned(local_rank, world, init_file, device=args.device, timeout_s=args.timeout)
    status = _worker_status(args, "spawn")
    if status:
        sys.exit(status)


def _check_output(args: argparse.Namespace) -> None:
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")
    if args.lengths_file and not Path(args.lengths_file).is_file():
        raise ValueError(f"--lengths-file {args.lengths_file}: no such file")


def run_check(args: argparse.Namespace) -> int:
    try:
        _check_output(args)
        if distributed.launched():
            groups = distributed.init_distributed(device=args.device, timeout_s=args.timeout)
            return _worker_status(args, groups.launcher)
        world = 2 if args.world is None else args.world
        _cases(args, world)  # bad options fail here, once, before any rank starts
        if args.device == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"--device cuda needs {world} GPUs, found {torch.cuda.device_count()}")
    except ValueError as e:
        print(f"ringpack check: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            torch.multiprocessing.spawn(_spawned, args=(world, os.path.join(tmp, "rendezvous"), args), nprocs=world)
        except torch.multiprocessing.ProcessExitedException as e:
            return e.exit_code if e.exit_code > 0 else 1
    return 0

