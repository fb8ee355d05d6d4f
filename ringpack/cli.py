"""``python -m ringpack check``: the distributed exactness check that an operator runs before a long job, and the
option parsers that ``check`` and ``plan`` share (bad input exits 2 with a message naming the option)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ringpack import distributed
from ringpack.backends import BACKENDS
from ringpack.checking import DTYPES, GRAD_NAMES, Case, Result, default_cases, run_case, token_mix
from ringpack.plan import STRATEGIES
from ringpack.validation import integer, real
from ringpack.warmup import warmup

PROGRESS_S = 5.0  # seconds between two progress lines inside one long case (rank 0, stderr)
LENGTHS = "document lengths: integers >= 0 separated by commas or spaces, e.g. 4096,97,1,0"
WINDOW = "LEFT,RIGHT: two integers >= -1, -1 = unbounded, e.g. 128,0"


def parse_ints(text: str, *, what: str, minimum: int | None = None, count: int | None = None) -> tuple[int, ...]:
    """Integers separated by commas and/or whitespace (``"4096,97 1"``), each ``>= minimum``, exactly ``count`` of
    them when given; otherwise a ValueError saying what was expected (``what``) and what was got."""
    try:
        values = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count) or (minimum is not None and min(values) < minimum):
        shown = text.strip() if len(text.strip()) <= 80 else text.strip()[:77] + "..."
        raise ValueError(f"expected {what}; got {shown!r}")
    return values


def int_list(what: str, *, minimum: int | None = None, count: int | None = None):
    """An argparse ``type=`` for :func:`parse_ints` (argparse then names the option in its error)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return parse_ints(text, what=what, minimum=minimum, count=count)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def number(kind: type, allowed: str, *, minimum: float | None = None, positive: bool = False,
           maximum: float | None = None):
    """An argparse ``type=`` reading an ``int`` or a finite ``float`` within bounds (checked by
    ``ringpack.validation``); the error names the option (argparse) and says what is ``allowed``."""
    def parse(text: str):
        try:
            if kind is int:
                return integer("", int(text), minimum=minimum, maximum=maximum)
            return real("", float(text), minimum=minimum, positive=positive, maximum=maximum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}; got {text!r}") from None
    return parse


POSITIVE = number(int, "an integer >= 1", minimum=1)
SEED = number(int, "an integer >= 0", minimum=0)


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--window -1,3`` -> ``--window=-1,3``: argparse takes a value that starts with ``-`` for an option unless it
    is a plain negative number, and no option of ringpack's is spelled like a list of integers."""
    out: list[str] = []
    for arg in argv:
        if out and re.fullmatch(r"-\d+([, ]+-?\d+)+", arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def lengths_from_file(path: str) -> tuple[int, ...]:
    """The document lengths in ``path`` (commas, spaces or newlines between them); a ValueError naming the file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"--lengths-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--lengths-file {path}: cannot be read as text ({e.__class__.__name__}: {e})") from None
    try:
        return parse_ints(text, what=LENGTHS, minimum=0)
    except ValueError as e:
        raise ValueError(f"--lengths-file {path}: {e}") from None


def add_lengths_options(group, *, default: str, tokens: bool = False) -> None:
    """``--lengths`` / ``--lengths-file`` (and ``--tokens`` for the check) into a mutually exclusive ``group``;
    ``default`` says what happens without any of them."""
    group.add_argument("--lengths", type=int_list(LENGTHS, minimum=0), metavar="N,N,...",
                       help="document lengths of the pack, comma separated (e.g. 4096,97,1,0; 0 = an empty "
                            f"document; {default})")
    group.add_argument("--lengths-file", metavar="FILE",
                       help=f"a file of document lengths, separated by commas, spaces or newlines ({default})")
    if tokens:
        group.add_argument("--tokens", type=POSITIVE, metavar="N",
                           help="generate a length mix of N tokens (a long document of N/3, an empty one, a "
                                f"one-token one, log-uniform others; from --seed) ({default})")


def _lengths(args: argparse.Namespace) -> tuple[int, ...] | None:
    if args.lengths_file is not None:
        return lengths_from_file(args.lengths_file)
    if args.lengths is not None:
        return args.lengths
    if args.tokens is not None:
        return token_mix(args.tokens, seed=args.seed)
    return None


def add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="run the exactness check of the ring against a float64 reference",
                       description="Run ring attention on every rank and compare out, lse, dq, dk, dv with a "
                                   "single-process float64 reference, and with the same kernel run on one device. "
                                   "Under torchrun, mpirun, the DeepSpeed launcher or srun it uses the launched "
                                   "world; launched plainly it spawns --world local ranks (CPU/gloo without GPUs). "
                                   "Without case options it runs the embedded suite (every strategy, mask kind and "
                                   "head layout); each case option replaces that field in every case of the suite. "
                                   "Exit status: 0 all passed, 1 a case failed or a rank fault, 2 bad input.")
    p.add_argument("--world", type=POSITIVE, default=None,
                   help="ranks to spawn when not launched (default 2); under a launcher it must match the world")
    p.add_argument("--device", choices=distributed.DEVICES, default="auto",
                   help="auto: GPUs (NCCL) when torch sees them, else CPU (gloo) (default %(default)s)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="local kernel backend (default %(default)s)")
    p.add_argument("--strategy", choices=("all", *STRATEGIES), default="all",
                   help="strategy of the cases (default %(default)s: every one)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="float64 must match the reference to 1e-10; lower precisions must stay within 1.5x "
                        "of the same kernel's error on one device (norm-wise relative error; column ratio) "
                        "(default: float64)")
    add_lengths_options(p.add_mutually_exclusive_group(), default="default: the suite's mixes", tokens=True)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                   help="causal or not (default: the suite's, both)")
    p.add_argument("--window", type=int_list(WINDOW, minimum=-1, count=2), default=None, metavar="LEFT,RIGHT",
                   help="sliding window, e.g. --window -1,3 (-1 = unbounded; default: the suite's)")
    p.add_argument("--heads", type=POSITIVE, default=None, help="query heads (default: the suite's, 4)")
    p.add_argument("--kv-heads", type=POSITIVE, default=None,
                   help="KV heads, dividing --heads (default: --heads when that is given, else the suite's)")
    p.add_argument("--head-dim", type=POSITIVE, default=None, help="head dimension (default: the suite's, 16)")
    p.add_argument("--softcap", type=number(float, "a finite number >= 0 (0: no softcap)", minimum=0), default=None,
                   help="tanh softcap of the scores, 0 for none (default 0)")
    p.add_argument("--inject", choices=("nan", "inf"), default=None,
                   help="put a NaN or +Inf into one key of every case: it must reach the output wherever it "
                        "reaches the reference's (default: none)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the inputs and of --tokens (default %(default)s)")
    p.add_argument("--timeout", default=distributed.DEFAULT_TIMEOUT_S,
                   type=number(float, "seconds, a finite number > 0", positive=True,
                               maximum=distributed.MAX_TIMEOUT_S),
                   help="seconds a rank waits for another before failing (default %(default)g)")
    p.add_argument("--json", metavar="FILE", help="write every result to this JSON file (rank 0; default: none)")
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


def _header(count: int, width: int) -> str:
    pad = " " * (2 * len(str(count)) + 3)
    errors = " ".join(f"{name:>7}" for name in GRAD_NAMES)
    return (f"{pad} {'case':<{width}} {errors} {'1-dev':>7} {'ratio':>5} {'nan/inf':>11} {'ring ms':>8}  status\n"
            f"{pad} {'':<{width}} {'max |ring - float64 reference|':^39} {'max':>7}")


def _row(index: int, count: int, result: Result, width: int) -> str:
    case = result.case
    errors = " ".join(f"{result.errors[n]:7.1e}" if n in case.compared else f"{'-':>7}" for n in GRAD_NAMES)
    ratio = "-" if case.dtype == "float64" else f"{result.error_ratio:.2f}"
    poison = f"{sum(result.nonfinite[n] for n in case.compared)}/" \
             f"{sum(result.reference_nonfinite(n) for n in case.compared)}"
    status = "ok" if result.ok else f"FAIL: {result.reason}"
    return (f"[{index:>{len(str(count))}}/{count}] {case.label:<{width}} {errors} {result.max_kernel_error:7.1e} "
            f"{ratio:>5} {poison:>11} {result.seconds * 1e3:8.1f}  {status}")


class Progress:
    """Rank 0's heartbeat inside a long case: every ``interval`` seconds a line on stderr naming the case, the phase
    it is in and how far the reference has got; none for a case that ends sooner. ``run_case`` calls it."""

    def __init__(self, label: str, interval: float = PROGRESS_S, stream=None):
        self.label, self.interval, self.stream = label, interval, stream or sys.stderr
        self.phase, self.fraction = "starting", None
        self._start, self._stop = time.monotonic(), threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __call__(self, phase: str, fraction: float | None) -> None:
        self.phase, self.fraction = phase, fraction

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            done = "" if self.fraction is None else f" {self.fraction:.0%}"
            print(f"    {self.label}: {self.phase}{done}, {time.monotonic() - self._start:.0f} s",
                  file=self.stream, flush=True)


def check_worker(args: argparse.Namespace, launcher: str) -> bool:
    """Run the check's cases on this rank (all ranks call it); rank 0 prints progress and writes JSON."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.world is not None and args.world != world:
        raise ValueError(f"--world {args.world} does not match the launched world of {world} ranks")
    device = distributed.default_device()
    cases = _cases(args, world)
    width = max(len(c.label) for c in cases)
    if rank == 0:
        print(f"ringpack check: world={world} launcher={launcher} device={device.type} backend={args.backend} "
              f"cases={len(cases)} timeout={args.timeout:g}s")
    if device.type == "cuda":  # compiled kernels (FlashAttention-4) compile here, not inside the first case's time
        seconds, configs = warm_up(cases, args.backend, device)
        if rank == 0:
            print(f"kernels ready for {configs} configurations in {seconds:.1f} s (first calls, compilation)")
    if rank == 0:
        print(_header(len(cases), width), flush=True)
    results = []
    for i, case in enumerate(cases, 1):
        if rank == 0:
            with Progress(f"[{i}/{len(cases)}] {case.label}") as progress:
                results.append(run_case(case, device=device, seed=args.seed, progress=progress))
            print(_row(i, len(cases), results[-1], width), flush=True)
        else:
            results.append(run_case(case, device=device, seed=args.seed))
    passed = sum(r.ok for r in results)
    if rank == 0:
        print(f"{passed} passed, {len(results) - passed} failed", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"world": world, "launcher": launcher, "device": device.type, "backend": args.backend,
                 "passed": passed, "failed": len(results) - passed, "results": [r.as_dict() for r in results]},
                indent=2))
    return passed == len(results)


def warm_up(cases: list[Case], backend: str, device: torch.device) -> tuple[float, int]:
    """``ringpack.warmup`` for every distinct head layout, dtype, mask and softcap of ``cases``: seconds and count."""
    configs = {(c.heads, c.kv_heads, c.head_dim, c.dtype, c.causal, c.window_size, c.softcap) for c in cases}
    seconds = 0.0
    for heads, kv_heads, head_dim, dtype, causal, window, softcap in sorted(configs):
        seconds += warmup(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=getattr(torch, dtype), causal=causal,
                          window_size=window, softcap=softcap, lse_grad=True, backend=backend, device=device)
    return seconds, len(configs)


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


def check_output_file(option: str, path: str | None) -> None:
    """A ValueError naming ``option`` unless ``path`` (when given) can be written: its folder exists and it is no
    folder itself (found before the work, not as a traceback after it)."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    if not Path(path).resolve().parent.is_dir():
        raise ValueError(f"{option} {path}: folder {Path(path).resolve().parent} does not exist")


def run_check(args: argparse.Namespace) -> int:
    try:
        check_output_file("--json", args.json)
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
