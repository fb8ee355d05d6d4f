"""``python -m ringpack plan``: how a pack is split, what each (rank, step) computes and sends."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import STRATEGIES, Plan, make_plan


def report(plan: Plan, *, kv_heads: int = 8, head_dim: int = 128, itemsize: int = 2) -> str:
    """A text table: per rank its tokens, pairs, estimated cost, tiles per step and KV bytes sent per step."""
    bytes_per_token = 2 * kv_heads * head_dim * itemsize
    costs = [plan.cost(r) for r in range(plan.world_size)]
    mean = sum(costs) / plan.world_size
    total_sent = _size(sum(map(sum, plan.send_tokens)) * bytes_per_token)
    lines = [plan.summary().splitlines()[0],
             f"work max/mean = {max(costs) / mean if mean else 1.0:.3f}; KV bytes at {kv_heads} KV heads x "
             f"{head_dim} dims x {itemsize} bytes; forward total {total_sent}",
             f"{'rank':>4} {'tokens':>9} {'pairs':>14} {'cost':>14}  tiles per step | KV sent per step"]
    for r in range(plan.world_size):
        tiles = " ".join(str(t) for t in plan.tiles_per_step(r))
        sent = " ".join(_size(t * bytes_per_token) for t in plan.send_tokens[r])
        lines.append(f"{r:>4} {plan.num_tokens[r]:>9} {plan.work(r):>14} {costs[r]:>14}  {tiles} | {sent}")
    return "\n".join(lines)


def draw(plan: Plan, path: str) -> None:
    """Save a rank x step picture: colour = visible pairs computed, label = tiles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install 'ringpack[plot]'") from None
    world = plan.world_size
    pairs = [[sum(t.pairs for t in plan.steps[r][s].tiles) for s in range(world)] for r in range(world)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * world, 1.0 + 0.5 * world))
    image = ax.imshow(pairs, cmap="viridis", vmin=0)
    for r in range(world):
        for s in range(world):
            ax.text(s, r, str(len(plan.steps[r][s].tiles)), ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel("ring step (label: tiles)")
    ax.set_ylabel("rank")
    ax.set_title(f"{plan.strategy}, {world} ranks, {plan.total_tokens} tokens")
    fig.colorbar(image, ax=ax, label="visible pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show how a pack is split across ranks and what each step computes and sends")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", help="document lengths, comma separated (e.g. 8192,97,1)")
    src.add_argument("--lengths-file", help="file of document lengths, whitespace or comma separated")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--strategy", choices=STRATEGIES, default="balanced")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--window", default="-1,-1", help="LEFT,RIGHT (default -1,-1: unbounded)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--png", help="also save the rank x step tile map to this PNG file")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    text = Path(args.lengths_file).read_text() if args.lengths_file else args.lengths
    try:
        lengths = [int(x) for x in text.replace(",", " ").split()]
        window = tuple(int(x) for x in args.window.split(","))
        plan = make_plan(lengths_to_cu_seqlens(lengths), args.world, strategy=args.strategy, causal=args.causal,
                         window_size=window)
        print(report(plan, kv_heads=args.kv_heads, head_dim=args.head_dim))
        if args.png:
            draw(plan, args.png)
            print(f"tile map saved to {args.png}")
    except ValueError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    return 0
