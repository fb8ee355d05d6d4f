"""Host-side planning cost and balance: ``make_plan`` time, max/mean work and KV bytes per strategy.

Runs on one CPU core (no GPU needed). Example:
    taskset -c 0 python benchmarks/bench_plan.py --out benchmarks/results/plan_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
from mixes import MIXES

import ringpack


def measure(lengths: list[int], world: int, strategy: str, repeats: int) -> tuple[float, float, int]:
    cu = ringpack.lengths_to_cu_seqlens(lengths).tolist()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = ringpack.make_plan(cu, world, strategy=strategy)
        times.append(time.perf_counter() - start)
    costs = [plan.cost(r) for r in range(world)]
    return statistics.median(times), max(costs) / (sum(costs) / world), sum(map(sum, plan.send_tokens))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the markdown table here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [f"# make_plan on the host: {args.tokens} tokens", "",
             f"- date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
             f"python {platform.python_version()}, torch {torch.__version__}; one thread",
             f"- command: `{' '.join(sys.argv)}`", "",
             "| mix | docs | ranks | strategy | make_plan ms (median) | work max/mean | KV tokens sent (fwd) |",
             "|---|---|---|---|---|---|---|"]
    for mix, gen in MIXES.items():
        lengths = gen(args.tokens)
        for world in (2, 4, 8):
            for strategy in ringpack.STRATEGIES:
                repeats = args.repeats if strategy != "zigzag" else 1
                seconds, imbalance, sent = measure(lengths, world, strategy, repeats)
                lines.append(f"| {mix} | {len(lengths)} | {world} | {strategy} | {seconds * 1e3:.1f} | "
                             f"{imbalance:.3f} | {sent} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
