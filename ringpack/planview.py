"""``python -m ringpack plan``: how a pack is split across ranks, what each (rank, step) computes and sends.

``report`` is the text table; ``draw`` the picture: the pack as a strip of documents with the pieces each rank
owns beneath it (cut where a document is shared), and the rank x step maps of work and of KV bytes sent.
"""

from __future__ import annotations

import argparse
import sys

from ringpack.cli import POSITIVE, WINDOW, add_lengths_options, check_output_file, int_list, lengths_from_file
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import STRATEGIES, Plan, make_plan

MAX_LABELLED_RANKS = 12  # beyond this the cells of the rank x step maps are too small for numbers


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


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install 'ringpack[plot]'") from None
    return plt


def draw(plan: Plan, path: str, *, kv_heads: int = 8, head_dim: int = 128, itemsize: int = 2) -> None:
    """Save the plan as a PNG: the pack and who owns which piece of it, then work and bytes per (rank, step)."""
    plt = _pyplot()
    world = plan.world_size
    fig = plt.figure(figsize=(12, 2.4 + 0.75 * world), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.2 + 0.28 * (world + 1), 1.0 + 0.45 * world])
    _draw_pack(fig.add_subplot(grid[0, :]), plan)
    work = [[sum(t.pairs for t in plan.steps[r][s].tiles) for s in range(world)] for r in range(world)]
    tiles = [[len(plan.steps[r][s].tiles) for s in range(world)] for r in range(world)]
    labels = [[f"{_count(w)}\n{n} tile{'s' * (n != 1)}" if n else "" for w, n in zip(*row)]
              for row in zip(work, tiles)]
    _draw_map(fig.add_subplot(grid[1, 0]), work, labels, "Blues",
              f"work: visible (query, key) pairs per step; {sum(map(sum, tiles))} tiles in all", _count)
    sent = [[n * 2 * kv_heads * head_dim * itemsize for n in row] for row in plan.send_tokens]
    _draw_map(fig.add_subplot(grid[1, 1]), sent, [[_size(b) if b else "" for b in row] for row in sent], "Oranges",
              "KV bytes sent per step (rank r sends to rank r + step)", _size)
    mask = ("causal" if plan.causal else "not causal") + ("" if plan.window_size == (-1, -1)
                                                           else f", window {plan.window_size}")
    fig.suptitle(f"ringpack plan: strategy {plan.strategy}, {world} ranks, {len(plan.cu_seqlens) - 1} documents, "
                 f"{plan.total_tokens} tokens, {mask}; a K/V row is {kv_heads} heads x {head_dim} x {itemsize} "
                 "bytes", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_pack(ax, plan: Plan) -> None:
    """The pack as a strip of documents (top row) and, one row per rank, the pieces it owns where they lie."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab20").colors
    colours = palette[0::2] + palette[1::2]  # 10 strong hues, then their light twins: neighbours differ in hue
    cu, world, total = plan.cu_seqlens, plan.world_size, max(plan.total_tokens, 1)
    docs = [(a, b - a) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    doc_ids = [d for d, (a, b) in enumerate(zip(cu[:-1], cu[1:])) if b > a]
    ax.broken_barh(docs, (world + 0.15, 0.7), facecolors=[colours[d % 20] for d in doc_ids], edgecolor="white")
    for d, (a, n) in zip(doc_ids, docs):  # as much of a label as fits: "doc 3: 2500 tokens", "doc 3", "3"
        for label, share in ((f"doc {d}: {n} tokens", 0.12), (f"doc {d}", 0.04), (str(d), 0.012)):
            if n / total > share:
                ax.text(a + n / 2, world + 0.5, label, ha="center", va="center", fontsize=7)
                break
    for r, segs in enumerate(plan.segments):
        y = world - 1 - r
        ax.broken_barh([(s.start, s.length) for s in segs], (y + 0.15, 0.7),
                       facecolors=[colours[s.doc % 20] for s in segs], edgecolor="black", linewidth=0.4)
        for s in segs:
            if s.doc_offset:  # this piece starts inside its document: a cut between ranks
                ax.axvline(s.start, color="black", linestyle=":", linewidth=0.8)
    ax.set_yticks([world + 0.5, *(world - 0.5 - r for r in range(world))],
                  ["documents", *(f"rank {r}: {plan.num_tokens[r]} tokens" for r in range(world))])
    ax.set_ylim(0, world + 1)
    ax.set_xlim(0, total)
    ax.set_xlabel("token of the pack (dotted: a document cut between ranks; colour: document)")
    ax.set_title("who owns which tokens", loc="left", fontsize=10)
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.tick_params(axis="y", length=0)


def _draw_map(ax, values: list[list[float]], labels: list[list[str]], cmap: str, title: str, unit) -> None:
    """A rank x step heat map of ``values`` with each cell's label, and each rank's total beside its row."""
    world = len(values)
    top = max(max(row) for row in values) or 1
    ax.imshow(values, cmap=cmap, vmin=0, vmax=top, aspect="auto")
    if world <= MAX_LABELLED_RANKS:
        for r, row in enumerate(labels):
            for s, text in enumerate(row):
                ax.text(s, r, text or "-", ha="center", va="center", fontsize=7,
                        color="white" if values[r][s] > 0.6 * top else "black")
    totals = [sum(row) for row in values]
    mean = sum(totals) / world
    ax.set_yticks(range(world), [f"rank {r}: {unit(t)}" + (f", {t / mean:.2f}x mean" if mean else "")
                                 for r, t in enumerate(totals)], fontsize=8)
    ax.set_xticks(range(world), ["0 (own)", *map(str, range(1, world))] if world <= MAX_LABELLED_RANKS else None)
    ax.set_xlabel("ring step (at step s, rank r uses the KV of rank r - s)")
    ax.set_title(title, loc="left", fontsize=10)
    for side in ax.spines.values():
        side.set_visible(False)


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show how a pack is split and what each ring step computes and sends",
                       description="Make the plan of a pack and print, per rank, its tokens, visible pairs, estimated "
                                   "cost, tiles per ring step and KV bytes sent per step; --png also draws it. "
                                   "Exit status: 0 done, 2 bad input.")
    add_lengths_options(p.add_mutually_exclusive_group(required=True),
                        default="no default: --lengths or --lengths-file is required")
    p.add_argument("--world", type=POSITIVE, required=True, help="ranks of the context-parallel group (required)")
    p.add_argument("--strategy", choices=STRATEGIES, default="balanced",
                   help="partition strategy (default %(default)s)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal mask or not (default: causal)")
    p.add_argument("--window", type=int_list(WINDOW, minimum=-1, count=2), default=(-1, -1), metavar="LEFT,RIGHT",
                   help="sliding window, e.g. --window -1,3 (default -1,-1: unbounded)")
    p.add_argument("--kv-heads", type=POSITIVE, default=8, help="KV heads, for the bytes sent (default %(default)s)")
    p.add_argument("--head-dim", type=POSITIVE, default=128, help="head dimension, for the bytes sent "
                                                                   "(default %(default)s)")
    p.add_argument("--itemsize", type=POSITIVE, default=2,
                   help="bytes per K/V value, for the bytes sent (default %(default)s: bf16/fp16)")
    p.add_argument("--png", metavar="FILE", help="also draw the plan into this PNG file (needs matplotlib; "
                                                 "default: no picture)")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    try:
        check_output_file("--png", args.png)
        lengths = lengths_from_file(args.lengths_file) if args.lengths_file is not None else args.lengths
        plan = make_plan(lengths_to_cu_seqlens(lengths), args.world, strategy=args.strategy, causal=args.causal,
                         window_size=args.window)
        sizes = {"kv_heads": args.kv_heads, "head_dim": args.head_dim, "itemsize": args.itemsize}
        print(report(plan, **sizes))
        if args.png:
            draw(plan, args.png, **sizes)
            print(f"picture of the plan saved to {args.png}")
    except ValueError as e:
        print(f"ringpack plan: {e}", file=sys.stderr)
        return 2
    return 0
