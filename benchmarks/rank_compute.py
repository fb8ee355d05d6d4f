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
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time

import torch

from ringpack import mixes
from ringpack.backends import select_backend
from ringpack.bench import Config, Runner, Shape
from ringpack.comm import Pending, Ring
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import Plan, make_plan, shard
from ringpack.ring import RingAttention, _gather


class Delivered(Ring):
    """Rank ``rank`` of ``plan`` with every exchange done already: a forward shift (``s > 0``) returns the rows
    rank ``r - s`` would send (gathered once, up front), a returning shift (``s < 0``) a zero buffer."""

    def __init__(self, plan: Plan, rank: int, kv_by_rank: list[torch.Tensor]):
        self.group, self.rank, self.size = None, rank, plan.world_size
        self.kv = {s: _gather(kv_by_rank[step.source], step.recv_runs)
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
    kv = [torch.stack((shard(k, plan, r), shard(v, plan, r)), dim=1) for r in range(plan.world_size)]
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
    t1 = r.timed(r.attention_fn(make_plan(cu, 1, strategy="contiguous"), Ring.local(), backend, backward)[0],
                 collective=False)
    total = int(cu[-1])
    q, k, v = r.qkv(total, False)
    dout = torch.randn(q.shape, device=r.device, dtype=r.dtype, generator=r.gen)
    scale = 1.0 / math.sqrt(r.cfg.shape.head_dim)
    per_rank = [r.timed(run, collective=False) for run in rank_runs(plan, q, k, v, dout, backend, scale, backward)]
    row_bytes = 2 * r.cfg.shape.kv_heads * r.cfg.shape.head_dim * q.element_size()
    return {"strategy": strategy, "backend": backend_name, "world": world, "tokens": total,
            "tokens_per_rank": list(plan.num_tokens), "docs": len(lengths), "pass": "fwd+bwd" if backward else "fwd",
            "t1_s": t1, "rank_s": per_rank, "compute_efficiency": t1 / (world * max(per_rank)),
            "fwd_kv_mb_sent": sum(map(sum, plan.send_tokens)) * row_bytes / 1e6,
            "tiles_per_rank": [sum(plan.tiles_per_step(x)) for x in range(world)]}


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
        out.append(("one doc", tpg, [total], one, ("auto", "torch_flash"), passes))
        if tpg < 131072:
            out.append(("2k docs", tpg, mixes.uniform(total, 2048), ("balanced", "zigzag", "contiguous"), ("auto",),
                        (True,)))
            out.append(("long tail", tpg, mixes.long_tail(total, seed=0), ("balanced", "zigzag", "contiguous"),
                        ("auto",), (True,)))
    return out


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["# Each rank's compute, one rank at a time on one GPU (the exchange free)", "",
             f"- device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}; date (UTC) {env['date']}",
             f"- command: `{env['command']}`",
             f"- shape {env['shape']}, causal; P = {env['world']} ranks",
             "- compute efficiency = T1 / (P x max over ranks of the rank's time): an upper bound of the P-GPU ring",
             "  efficiency when the exchange is hidden; not a 2-GPU measurement", "",
             "| mix | tokens/rank | strategy | backend | pass | T1 s | rank times s | compute efficiency | "
             "fwd KV MB sent | tiles per rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['mix']} | {x['tokens_per_gpu']} | {x['strategy']} | {x['backend']} | {x['pass']} | "
                         f"error: {x['error']} | | | | |")
            continue
        ranks = " / ".join(f"{t:.4f}" for t in x["rank_s"])
        lines.append(f"| {x['mix']} | {x['tokens_per_gpu']} | {x['strategy']} | {x['backend']} | {x['pass']} | "
                     f"{x['t1_s']:.4f} | {ranks} | {x['compute_efficiency']:.3f} | {x['fwd_kv_mb_sent']:.1f} | "
                     f"{x['tiles_per_rank']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks of the plan (run one after another)")
    p.add_argument("--out", default="rank_compute.json", help="JSON file; the markdown table goes beside it (.md)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip what is left after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU, reference kernel, tiny sizes (checks the script)")
    args = p.parse_args(argv)
    shape = Shape(heads=4, kv_heads=2, head_dim=16, dtype="float64") if args.dry_run else Shape()
    cfg = Config(tokens_per_gpu=(), backends=(), kernel_backends=(), kernel_tokens=0, reps=1 if args.dry_run else 3,
                 min_round_s=0.0 if args.dry_run else 0.2, budget_s=args.budget_s, million=0, sections=(), shape=shape,
                 device="cpu" if args.dry_run else "cuda", out=args.out)
    r = Runner(cfg, 0, 1)
    start, rows = time.perf_counter(), []
    for mix, tpg, lengths, strategies, backends, passes in grid(args.world, args.dry_run):
        for backend in backends:
            for strategy in strategies:
                for backward in passes:
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
    cuda = r.device.type == "cuda"
    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "world": args.world, "shape": vars(shape),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python benchmarks/rank_compute.py", *(sys.argv[1:] if argv is None else argv)])}
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
