"""``python benchmarks/bench.py``: local-kernel throughput, ring efficiency, overlap, memory and strategies on GPUs.

Legend: ``P`` GPUs (one process each, NCCL), ``tpg`` tokens per GPU, ``T1`` the time of the same backend on
the whole batch on one GPU, ``T`` the ring's time on ``P`` GPUs; ring efficiency ``= T1 / (P * T)``.
FLOPs count visible pairs only (from the plan's tiles): forward ``4 * pairs * H * D``, backward 2.5x that.

Every rank runs the same sequence of measurements (they are collective); rank 0 writes ``bench.json``,
``bench.md`` and PNG plots into ``--out`` (``report.py``). ``--dry-run`` runs the whole flow on the CPU (gloo, the
reference kernel, tiny sizes) so the script itself can be checked without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import mixes
import torch
import torch.distributed as dist
from harness import Config, Runner, Shape, flops, visible_pairs
from report import write_results

from ringpack import cli
from ringpack.backends import Backend, select_backend
from ringpack.backends.base import BwdPiece, FwdPiece
from ringpack.comm import Pending, Ring
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import STRATEGIES, make_plan

SECTIONS = ("ring", "million", "kernel", "overlap", "strategy")


class _NullBackend(Backend):
    """The kernel call removed: right shapes, no attention (for the overlap measurement)."""

    name = "none"

    def not_supported_reasons(self, spec):
        return []

    def forward(self, q_NHD, k_MKD, v_MKD, wave, *, scale, softcap):
        q0, q1 = wave.q_span
        yield FwdPiece(slice(q0, q1), q_NHD.new_zeros((q1 - q0, *q_NHD.shape[1:])),
                       torch.zeros((q_NHD.shape[1], q1 - q0), dtype=torch.float32, device=q_NHD.device))

    def backward(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        yield BwdPiece(slice(q0, q1), slice(k0, k1), q_NHD.new_zeros((q1 - q0, *q_NHD.shape[1:])),
                       k_MKD.new_zeros((k1 - k0, *k_MKD.shape[1:])), v_MKD.new_zeros((k1 - k0, *v_MKD.shape[1:])))


class _NoExchange(Ring):
    """The exchange removed: every shift returns an uninitialised buffer at once (for the overlap measurement)."""

    def shift(self, send, shift, recv_shape, dtype, device):
        return Pending([], torch.empty(recv_shape, dtype=dtype, device=device), None)


def _mixes(tpg: int, world: int) -> dict[str, list[int]]:
    total = tpg * world
    return {"one doc": [total], "8k docs": mixes.uniform(total, min(8192, total)),
            "long tail": mixes.long_tail(total, seed=0)}


def _kernel_section(r: Runner) -> list[dict]:
    """Local kernel throughput: every backend on one GPU over a one-rank plan's waves (no ring)."""
    rows = []
    total = r.cfg.kernel_tokens
    for mix_name, lengths in (("one doc", [total]), ("8k docs", mixes.uniform(total, min(8192, total)))):
        plan = make_plan(lengths_to_cu_seqlens(lengths), 1, strategy="contiguous")
        pairs = visible_pairs(plan)
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
                    row["tflops"] = flops(pairs, r.cfg.shape, False) * (2.5 if backward else 1) / t / 1e12
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
                                 "ring_tflops_per_gpu": flops(visible_pairs(ring_plan), r.cfg.shape, backward)
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
                             "mean_rank_pairs": visible_pairs(plan) / r.world})
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
    p.add_argument("--world", type=cli.POSITIVE, default=None,
                   help="GPUs (processes) to use; default: every visible GPU")
    p.add_argument("--tokens-per-gpu", type=cli.int_list("integers >= 1 separated by commas", minimum=1),
                   default=(8192, 32768, 131072), help="(default %(default)s)")
    p.add_argument("--backends", type=_names(names), default=("torch_flash", "auto"),
                   help="ring backends; the last one also runs the overlap, memory and strategy sections")
    p.add_argument("--kernel-backends", type=_names(names), default=("torch_flash", "cudnn", "flex", "auto"))
    p.add_argument("--kernel-tokens", type=cli.POSITIVE, default=32768, help="(default %(default)s)")
    p.add_argument("--reps", type=cli.POSITIVE, default=3,
                   help="the fewest timed calls per round (default %(default)s)")
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
