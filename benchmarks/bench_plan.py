"""Host-side planning cost and balance: ``make_plan`` time, what one rank's ring then reads, memory, tiles.

Runs on one CPU core (no GPU needed). Example:
    taskset -c 0 python benchmarks/bench_plan.py --out benchmarks/results/plan_cpu.md

A plan computes each rank's schedule on first access, so ``make_plan`` alone says little. For every case the
table gives ``make_plan`` and, on a fresh plan, what the ring of one rank reads in a training step
(``ring_reads``): every wave of its steps, hashed as the backends' layout caches take it and its tiles counted
(from the wave's table: ``Tile`` objects are made only for a consumer that asks for ``wave.tiles``), its sends,
busy steps, KV tokens, query depth and the key depth of itself and of every source it reads.
The key depths are read two ways: ``key_depth[src]`` (exact, a whole column of the plan per source) and
``key_depth_capped(src, 3)`` (all the ring's 16-bit rule asks: stops at the first key row read 3 times).
Memory is measured in a fresh process per case: Python's peak (tracemalloc) and the growth of the resident
set (which also counts torch's buffers), for the sampled rank with the most tiles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc

import torch
from mixes import MIXES, n_docs

import ringpack
from ringpack.backends.varlen import varlen_groups

CAP = 3  # ring.ROUND_ONCE_DEPTH + 1: the ring keeps a key's gradients 16-bit where its depth is below this
SCALE = {  # the packs of issue 18: name -> (document lengths, world sizes)
    "docs-10k": (lambda: n_docs(1 << 20, 10_000), (8, 64)),
    "docs-100k": (lambda: n_docs(1 << 20, 100_000), (8, 64)),
    "10-tokens": (lambda: [3, 0, 4, 3], (4096,)),
}


def ring_reads(plan: ringpack.Plan, rank: int, *, capped: bool) -> int:
    """Read everything the ring of ``rank`` reads from ``plan``; returns the rank's tiles.

    ``capped=False`` reads the key depths as ``ring.py`` does today: ``key_depth`` of the source of every step,
    idle or not, and its own. ``capped=True``: ``key_depth_capped(src, 3)`` of the sources of steps with tiles."""
    tiles, read = 0, []
    for s, step in enumerate(plan.steps[rank]):
        for wave in step.waves:
            read.append(hash(wave))
            tiles += len(wave)
        if not capped:
            read.append(plan.key_depth[step.source])
        elif step.waves:
            read.append(plan.key_depth_capped(step.source, CAP))
        read.append((plan.send_runs(rank, s), step.recv_tokens))
    read.append((plan.busy_steps(rank), plan.send_tokens[rank], plan.query_depth[rank]))
    return tiles


def layouts(plan: ringpack.Plan, rank: int) -> int:
    """Lay out every wave of ``rank`` as varlen kernel calls, as the varlen backends do on a wave's first run (the
    layout cache bypassed); returns the calls."""
    return sum(len(varlen_groups.__wrapped__(wave)) for step in plan.steps[rank] for wave in step.waves)


def timed(fn, repeats: int, setup=lambda: None, budget_s: float = 2.0) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn(setup())`` over ``repeats`` calls (``setup`` not timed); one call when
    it takes longer than ``budget_s``."""
    wall, cpu = [], []
    for _ in range(repeats):
        arg = setup()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(arg)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if wall[-1] > budget_s:
            break
    return statistics.median(wall), statistics.median(cpu)


def sample_ranks(plan: ringpack.Plan) -> list[int]:
    """Rank 0, the last rank and the rank holding the most tokens."""
    most = max(range(plan.world_size), key=plan.num_tokens.__getitem__)
    return sorted({0, plan.world_size - 1, most})


def measure_case(name: str, world: int, strategy: str, repeats: int) -> dict:
    """Timings of one case in this process (each rank on a fresh plan), then memory in a fresh one (``--child``)."""
    cu = ringpack.lengths_to_cu_seqlens(SCALE[name][0]()).tolist()

    def plan(_=None):
        return ringpack.make_plan(cu, world, strategy=strategy)

    ranks = sample_ranks(plan())
    row = dict(zip(("make_plan_s", "make_plan_cpu_s"), timed(plan, repeats)))
    for capped in (False, True):
        times = [timed(lambda p, r=r, c=capped: ring_reads(p, r, capped=c), repeats, plan) for r in ranks]
        how = "capped" if capped else "exact"
        row[f"rank_{how}_s"], row[f"rank_{how}_cpu_s"] = max(t[0] for t in times), max(t[1] for t in times)
    times = []
    for r in ranks:
        def ready(_=None, r=r):
            p = plan()
            ring_reads(p, r, capped=True)
            return p
        times.append(timed(lambda p, r=r: layouts(p, r), repeats, ready))
    row["layouts_s"], row["layouts_cpu_s"] = max(t[0] for t in times), max(t[1] for t in times)
    tiles = {r: ring_reads(plan(), r, capped=True) for r in ranks}
    rank = max(ranks, key=tiles.__getitem__)
    row["tiles"] = tiles[rank]
    child = subprocess.run([sys.executable, __file__, "--child", json.dumps([name, world, strategy, rank])],
                           capture_output=True, text=True, check=True)
    row.update(json.loads(child.stdout))
    return row


def child(args: str) -> int:
    """Memory of make_plan plus one rank's (capped) reads in this fresh process: Python's peak, then the growth of
    the resident set on a second, untraced run of the same (tracemalloc's own bookkeeping stays out of it)."""
    name, world, strategy, rank = json.loads(args)
    cu = ringpack.lengths_to_cu_seqlens(SCALE[name][0]()).tolist()
    rss_before = peak_rss_mib()
    plan = ringpack.make_plan(cu, world, strategy=strategy)
    tiles = ring_reads(plan, rank, capped=True)
    rss = peak_rss_mib() - rss_before
    del plan
    tracemalloc.start()
    ring_reads(ringpack.make_plan(cu, world, strategy=strategy), rank, capped=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"py_peak_mib": peak / 2 ** 20, "rss_growth_mib": rss, "mem_rank_tiles": tiles}))
    return 0


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux ``VmHWM``: unlike ``ru_maxrss`` it does not carry over the parent's
    peak through fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 10


def balance_rows(tokens: int, repeats: int) -> list[str]:
    """The packs of the README at 2, 4 and 8 ranks: make_plan time, estimated balance, KV sent (all ranks)."""
    lines = ["| mix | docs | ranks | strategy | make_plan ms | + every rank's schedule ms | work max/mean | "
             "KV tokens sent (fwd) |", "|---|---|---|---|---|---|---|---|"]
    for mix, gen in MIXES.items():
        lengths = gen(tokens)
        cu = ringpack.lengths_to_cu_seqlens(lengths).tolist()
        for world in (2, 4, 8):
            for strategy in ringpack.STRATEGIES:
                def plan(_=None, cu=cu, world=world, strategy=strategy):
                    return ringpack.make_plan(cu, world, strategy=strategy)

                def every_rank(p):
                    return [p.cost(r) for r in range(p.world_size)], sum(map(sum, p.send_tokens))

                made, _ = timed(plan, repeats)
                everything, _ = timed(every_rank, repeats, plan)
                costs, sent = every_rank(plan())
                lines.append(f"| {mix} | {len(lengths)} | {world} | {strategy} | {made * 1e3:.1f} | "
                             f"{everything * 1e3:.1f} | {max(costs) / (sum(costs) / world):.3f} | {sent} |")
                print(lines[-1], flush=True)
    return lines


def scale_rows(repeats: int) -> list[str]:
    lines = ["| pack | docs | ranks | strategy | make_plan ms | + one rank, ring today (exact key_depth of every "
             "source) ms | + one rank, key_depth_capped ms | + its varlen call layouts ms | total with capped and "
             "layouts ms (CPU ms) | tiles of the rank | Python peak MiB | RSS growth MiB | bytes per tile |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (gen, worlds) in SCALE.items():
        lengths = gen()
        for world in worlds:
            for strategy in ringpack.STRATEGIES:
                m = measure_case(name, world, strategy, repeats)
                total = m["make_plan_s"] + m["rank_capped_s"] + m["layouts_s"]
                total_cpu = m["make_plan_cpu_s"] + m["rank_capped_cpu_s"] + m["layouts_cpu_s"]
                per_tile = m["py_peak_mib"] * 2 ** 20 / max(m["mem_rank_tiles"], 1)
                lines.append(f"| {name} | {len(lengths)} | {world} | {strategy} | {m['make_plan_s'] * 1e3:.1f} | "
                             f"{m['rank_exact_s'] * 1e3:.1f} | {m['rank_capped_s'] * 1e3:.1f} | "
                             f"{m['layouts_s'] * 1e3:.1f} | "
                             f"{total * 1e3:.1f} ({total_cpu * 1e3:.1f}) | {m['tiles']} | {m['py_peak_mib']:.1f} | "
                             f"{m['rss_growth_mib']:.1f} | {per_tile:.0f} |")
                print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 20, help="tokens of the README's packs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("balance", "scale"), help="one of the two tables")
    parser.add_argument("--out", help="write the markdown tables here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        return child(args.child)
    lines = ["# make_plan on the host", "",
             f"- date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
             f"python {platform.python_version()}, torch {torch.__version__}; one thread",
             f"- command: `{' '.join(sys.argv)}`", ""]
    if args.only != "scale":
        lines += [f"## The README's packs, {args.tokens} tokens", ""] + balance_rows(args.tokens, args.repeats) + [""]
    if args.only != "balance":
        lines += ["## Planning at scale (issue 18): 1M tokens in 10k and 100k documents, 10 tokens over 4096 ranks",
                  "", "One rank = the slowest of rank 0, the last rank and the rank with the most tokens, each on a "
                  "fresh plan (its time beyond make_plan), then its waves laid out as varlen kernel calls (what the "
                  "varlen backends compute on a wave's first run, host side). Memory: make_plan plus that rank's "
                  "reads, fresh process.",
                  ""] + scale_rows(args.repeats) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
