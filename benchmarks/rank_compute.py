"""Each rank's share of a P-rank ring, one rank at a time on one GPU: what the ring computes, with the exchange free.

Legend: ``P`` ranks of the plan, ``T1`` the same backend on the whole batch on one GPU, ``T_r`` rank ``r``'s
forward (+ backward) alone. On one GPU no ring runs, but every rank's own work can: ``ringpack.ring``'s forward
and backward loops with the real kernels and merges, each message delivered at once from the other ranks'
shards held on the same GPU (``Delivered``). Then::

    compute efficiency = T1 / (P * max_r T_r)

is the ring efficiency that the plan and the local kernels allow when every exchange is hidden behind compute.
A ring on P GPUs reaches at most about this (less the exposed exchange); it measures load balance as the kernels
see it, the cost of small tiles, merges and host-side issue, on one GPU. It is not a P-GPU measurement.

    python benchmarks/rank_compute.py --out rank_compute.json      # on a GPU machine; writes .json and .md
    python benchmarks/rank_compute.py --dry-run --out /tmp/rc.json  # CPU, reference kernel, tiny sizes
    python benchmarks/rank_compute.py --profile 8192 --out rc.json  # also: the op table of one document's ranks
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import mixes
import torch
from harness import Runner, report_header, script_environment, script_runner

from ringpack.backends import select_backend
from ringpack.comm import Pending, Ring
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import Plan, make_plan
from ringpack.ring import RingAttention, kv_message
from ringpack.sharding import shard


class Delivered(Ring):
    """Rank ``rank`` of ``plan`` with every exchange done already: a forward shift (``s > 0``) returns the rows
    rank ``r - s`` would send (gathered once, up front), a returning shift (``s < 0``) a zero buffer."""

    def __init__(self, plan: Plan, rank: int, kv_by_rank: list[tuple[torch.Tensor, torch.Tensor]]):
        self.group, self.rank, self.size = None, rank, plan.world_size
        self.kv = {s: kv_message(*kv_by_rank[step.source], step.recv_runs)
                   for s, step in enumerate(plan.steps[rank]) if s > 0}
        self.returned: dict[tuple, torch.Tensor] = {}

    def shift(self, send, shift, recv_shape, dtype, device):
        if shift > 0:
            buf = self.kv[shift]
            assert tuple(buf.shape) == tuple(recv_shape) and buf.dtype == dtype, (buf.shape, recv_shape)
            return Pending([], buf, None)
        key = (tuple(recv_shape), dtype)
        if key not in self.returned:
            self.returned[key] = torch.zeros(recv_shape, dtype=dtype, device=device)
        return Pending([], self.returned[key], None)


def rank_runs(plan: Plan, q, k, v, dout, backend, scale: float, backward: bool) -> list:
    """One closure per rank running that rank's ring loops on its shard of the global ``q, k, v``."""
    kv = [(shard(k, plan, r), shard(v, plan, r)) for r in range(plan.world_size)]
    runs = []
    for r in range(plan.world_size):
        ring = Delivered(plan, r, kv)
        q_r, k_r, v_r = (shard(x, plan, r).detach().clone().requires_grad_(backward) for x in (q, k, v))
        dout_r = shard(dout, plan, r).contiguous()

        def run(q_r=q_r, k_r=k_r, v_r=v_r, dout_r=dout_r, ring=ring):
            out, lse = RingAttention.apply(q_r, k_r, v_r, plan, ring, backend, scale, 0.0, False)
            grads = torch.autograd.grad(out, (q_r, k_r, v_r), dout_r) if backward else ()
            return out, lse, *grads

        runs.append(run)
    return runs


def measure(r: Runner, lengths: list[int], world: int, strategy: str, backend_name: str, backward: bool) -> dict:
    cu = lengths_to_cu_seqlens(lengths)
    plan = make_plan(cu, world, strategy=strategy)
    backend = select_backend(backend_name, r.spec())
    whole = r.attention_fn(make_plan(cu, 1, strategy="contiguous"), Ring.local(), backend, backward)[0]
    total = int(cu[-1])
    q, k, v = r.qkv(total, False)
    dout = torch.randn(q.shape, device=r.device, dtype=r.dtype, generator=r.gen)
    scale = 1.0 / math.sqrt(r.cfg.shape.head_dim)
    # T1 and every rank in alternating rounds, so that a drift of the GPU's clocks moves them alike
    runs = rank_runs(plan, q, k, v, dout, backend, scale, backward)
    t1, *per_rank = r.timed_interleaved([whole, *runs])
    row_bytes = 2 * r.cfg.shape.kv_heads * r.cfg.shape.head_dim * q.element_size()
    return {"strategy": strategy, "backend": backend_name, "world": world, "tokens": total,
            "tokens_per_rank": list(plan.num_tokens), "docs": len(lengths), "pass": "fwd+bwd" if backward else "fwd",
            "t1_s": t1, "rank_s": per_rank, "compute_efficiency": t1 / (world * max(per_rank)),
            "host_s": [host_issue(r, run) for run in runs],
            "host_streak_s": [host_streak(r, run) for run in runs],
            "fwd_kv_mb_sent": sum(map(sum, plan.send_tokens)) * row_bytes / 1e6,
            "tiles_per_rank": [sum(plan.tiles_per_step(x)) for x in range(world)]}


def host_issue(r: Runner, run, repeats: int = 3) -> float:
    """Seconds the host takes to issue one ``run`` (the median of ``repeats``), the device idle at the start: where
    it comes near the rank's time, the host, not the device, sets the pace."""
    times = []
    for _ in range(repeats):
        r.sync()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    r.sync()
    return sorted(times)[len(times) // 2]


def host_streak(r: Runner, run, calls: int = 5) -> float:
    """Seconds the host takes per ``run`` when it issues ``calls`` of them back to back (few enough that CUDA's
    launch queue does not fill): the rate the host can feed the device at. Below the rank's time, the device sets
    the pace; a lone call after an idle device (``host_issue``) takes longer."""
    r.sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    issued = (time.perf_counter() - t0) / calls
    r.sync()
    return issued


def issue_and_syncs(r: Runner, run) -> str:
    """Host time to issue one ``run`` against its total time (close: the host, not the GPU, sets the pace), and
    the calls that synchronise with the device on the way (CUDA's sync debug mode)."""
    r.sync()
    t0 = time.perf_counter()
    run()
    issued = time.perf_counter() - t0
    r.sync()
    total = time.perf_counter() - t0
    caught = []
    if r.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        r.sync()
    syncs = "; ".join(str(w.message).splitlines()[0][:160] for w in caught[:5])
    return (f"host issue {1e3 * issued:.3f} ms of {1e3 * total:.3f} ms; synchronising calls: {len(caught)}"
            + (f" ({syncs})" if syncs else ""))


def profiled_runs(r: Runner, tokens_per_rank: int, world: int, backend_name: str, mix: str) -> list:
    """``(what, run)`` for ``mix``'s whole batch on one rank, then each rank of the ``world``-rank plan, fwd+bwd."""
    cu = lengths_to_cu_seqlens(mix_lengths(mix, tokens_per_rank * world))
    backend = select_backend(backend_name, r.spec())
    q, k, v = r.qkv(int(cu[-1]), False)
    dout = torch.randn(q.shape, device=r.device, dtype=r.dtype, generator=r.gen)
    scale = 1.0 / math.sqrt(r.cfg.shape.head_dim)
    whole = rank_runs(make_plan(cu, 1, strategy="contiguous"), q, k, v, dout, backend, scale, True)
    ranks = rank_runs(make_plan(cu, world), q, k, v, dout, backend, scale, True)
    return [("whole batch, one rank", whole[0])] + [(f"rank {i} of {world}", run) for i, run in enumerate(ranks)]


def profile(r: Runner, tokens_per_rank: int, world: int, backend_name: str, mix: str = "one doc") -> str:
    """torch.profiler's op table (by device time) of ``mix``'s whole batch and of each rank, fwd+bwd."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runs = profiled_runs(r, tokens_per_rank, world, backend_name, mix)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.device.type == "cuda" else [])
    parts = []
    for what, run in runs:
        for _ in range(3):
            run()
        r.sync()
        with torch_profile(activities=activities) as prof:
            for _ in range(5):
                run()
            r.sync()
        sort = "self_cuda_time_total" if r.device.type == "cuda" else "self_cpu_time_total"
        parts.append(f"## {what}: {mix}, {tokens_per_rank * world} tokens, {backend_name}, fwd+bwd x 5\n\n"
                     f"{issue_and_syncs(r, run)}\n\n"
                     + prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    return "\n\n".join(parts) + "\n"


def host_profile(r: Runner, tokens_per_rank: int, world: int, backend_name: str, mix: str) -> str:
    """cProfile's table (by own time, then by cumulative time) of the host issuing ``mix``'s whole batch and rank 0,
    fwd+bwd: where the host time of a host-bound rank goes, Python function by function."""
    import cProfile
    import io
    import pstats

    parts = []
    for what, run in profiled_runs(r, tokens_per_rank, world, backend_name, mix)[:2]:
        for _ in range(3):
            run()
        r.sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            run()
        prof.disable()
        r.sync()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        parts.append(f"## {what}: {mix}, {tokens_per_rank * world} tokens, {backend_name}, fwd+bwd x 10\n\n"
                     f"{issue_and_syncs(r, run)}\n\n{text.getvalue()}")
    return "\n\n".join(parts) + "\n"


def mix_lengths(mix: str, total: int) -> list[int]:
    """The document lengths of ``mix`` (a row name of the grid) for ``total`` tokens."""
    return {"one doc": lambda: [total], "2k docs": lambda: mixes.uniform(total, 2048),
            "long tail": lambda: mixes.long_tail(total, seed=0)}[mix]()


def grid(world: int, dry_run: bool) -> list[tuple[str, int, list[int], tuple[str, ...], tuple[str, ...], tuple]]:
    """(mix, tokens per rank, lengths, strategies, backends, passes) to measure, in order."""
    if dry_run:
        return [("long tail", 96, mixes.long_tail(96 * world, seed=0), ("balanced", "zigzag"), ("reference",),
                 (False, True))]
    out = []
    for tpg in (8192, 32768, 131072):
        total = tpg * world
        one = ("balanced",) if tpg == 131072 else ("balanced", "zigzag")
        passes = (True,) if tpg == 131072 else (False, True)
        out.append(("one doc", tpg, mix_lengths("one doc", total), one, ("auto", "torch_flash"), passes))
        if tpg < 131072:
            for mix in ("2k docs", "long tail"):
                out.append((mix, tpg, mix_lengths(mix, total), ("balanced", "zigzag", "contiguous"), ("auto",),
                            (True,)))
    return out


def markdown(rows: list[dict], env: dict) -> str:
    lines = report_header("Each rank's compute, one rank at a time on one GPU (the exchange free)", env, [
        f"- shape {env['shape']}, causal; P = {env['world']} ranks",
        "- compute efficiency = T1 / (P x max over ranks of the rank's time): an upper bound of the P-GPU ring",
        "  efficiency when the exchange is hidden; not a 2-GPU measurement. T1 and the ranks are timed in alternating",
        "  rounds (medians of 5); host ms: the host's time to issue one rank's call after an idle device, then per",
        "  call when it issues 5 back to back (near the rank's time: host-bound)"])
    lines += ["| mix | tokens/rank | strategy | backend | pass | T1 s | rank times s | compute efficiency | "
             "host ms per rank (one / back to back) | fwd KV MB sent | tiles per rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['mix']} | {x['tokens_per_gpu']} | {x['strategy']} | {x['backend']} | {x['pass']} | "
                         f"error: {x['error']} | | | | | |")
            continue
        ranks = " / ".join(f"{t:.4f}" for t in x["rank_s"])
        lines.append(f"| {x['mix']} | {x['tokens_per_gpu']} | {x['strategy']} | {x['backend']} | {x['pass']} | "
                     f"{x['t1_s']:.4f} | {ranks} | {x['compute_efficiency']:.3f} | "
                     f"{' / '.join(f'{1e3 * t:.2f}' for t in x.get('host_s', []))} "
                     f"({' / '.join(f'{1e3 * t:.2f}' for t in x.get('host_streak_s', []))}) | "
                     f"{x['fwd_kv_mb_sent']:.1f} | "
                     f"{x['tiles_per_rank']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks of the plan (run one after another)")
    p.add_argument("--out", default="rank_compute.json", help="JSON file; the markdown table goes beside it (.md)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip what is left after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU, reference kernel, tiny sizes (checks the script)")
    p.add_argument("--mix", choices=("one doc", "2k docs", "long tail"), action="append",
                   help="measure only this mix (repeat for several)")
    p.add_argument("--tokens-per-rank", type=int, choices=(8192, 32768, 131072), action="append",
                   help="measure only this size (repeat for several)")
    p.add_argument("--strategy", choices=("balanced", "zigzag", "contiguous"), action="append",
                   help="measure only this strategy (repeat for several)")
    p.add_argument("--backend", action="append",
                   help="run these backends on every mix instead of the grid's (repeat for several)")
    p.add_argument("--fwd-bwd-only", action="store_true", help="skip the forward-only rows")
    p.add_argument("--profile", type=int, default=0, metavar="TOKENS_PER_RANK",
                   help="first write torch.profiler's op tables of --profile-mix at this many tokens per rank "
                        "(auto) beside --out (.profile.txt)")
    p.add_argument("--profile-mix", choices=("one doc", "2k docs", "long tail"), default="one doc",
                   help="the mix --profile and --host-profile profile (default: %(default)s)")
    p.add_argument("--host-profile", type=int, default=0, metavar="TOKENS_PER_RANK",
                   help="first write cProfile's tables of the host issuing --profile-mix at this many tokens per "
                        "rank (auto) beside --out (.host.txt)")
    args = p.parse_args(argv)
    r = script_runner(args.dry_run, budget_s=args.budget_s, out=args.out)
    shape = r.cfg.shape
    if args.profile:
        with open(args.out.removesuffix(".json") + ".profile.txt", "w") as f:
            f.write(profile(r, args.profile, args.world, "reference" if args.dry_run else "auto", args.profile_mix))
    if args.host_profile:
        with open(args.out.removesuffix(".json") + ".host.txt", "w") as f:
            f.write(host_profile(r, args.host_profile, args.world, "reference" if args.dry_run else "auto",
                                 args.profile_mix))
    start, rows = time.perf_counter(), []
    for mix, tpg, lengths, strategies, backends, passes in grid(args.world, args.dry_run):
        if mix not in (args.mix or [mix]) or tpg not in (args.tokens_per_rank or [tpg]):
            continue
        for backend in args.backend or backends:
            for strategy in (s for s in strategies if s in (args.strategy or [s])):
                for backward in (b for b in passes if b or not args.fwd_bwd_only):
                    head = {"mix": mix, "tokens_per_gpu": tpg, "strategy": strategy, "backend": backend,
                            "pass": "fwd+bwd" if backward else "fwd"}
                    if time.perf_counter() - start > args.budget_s:
                        rows.append({**head, "error": "skipped (budget)"})
                        continue
                    try:
                        rows.append({**head, **measure(r, lengths, args.world, strategy, backend, backward)})
                    except (RuntimeError, ValueError) as e:  # recorded in the table; the other rows still run
                        rows.append({**head, "error": f"{type(e).__name__}: {e}"[:300]})
                    print(f"rank_compute: {rows[-1]}", flush=True)
    env = script_environment("benchmarks/rank_compute.py", sys.argv[1:] if argv is None else argv, r.device,
                             world=args.world, shape=vars(shape))
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
