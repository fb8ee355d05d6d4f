"""Where a ring step's time goes: per-rank device and host times and torch.profiler's op table.

One process per GPU (NCCL), ``--tokens-per-gpu * P`` tokens of causal documents of ``--doc-len`` tokens
(0: one document) or of the long-tail mix (``--mix long_tail``); ``--world 1`` profiles the one-GPU run
the ring is compared with. Llama-3-8B attention shape (32 query heads, 8 KV heads, head dim 128), bf16. For each
rank, ``--out`` gets: forward and backward time on the GPU (CUDA events, median of ``--reps``), the host
time spent issuing them (when it is close to the GPU time, the ring is host-bound), and the profiler's
table of the ops, sorted by CUDA time.

    python benchmarks/profile_ring.py --tokens-per-gpu 8192 --doc-len 2048 --out profile.txt
    python benchmarks/profile_ring.py --world 1 --tokens-per-gpu 16384 --mix long_tail --out profile.txt
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from mixes import long_tail, uniform

from ringpack import lengths_to_cu_seqlens, make_plan, ring_attention, shard
from ringpack.backends import AttnSpec, select_backend


def _worker(rank: int, world: int, args: argparse.Namespace, rendezvous: str) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            device_id=device)
    total = args.tokens_per_gpu * world
    lengths = long_tail(total, seed=0) if args.mix == "long_tail" else uniform(total, args.doc_len or total)
    plan = make_plan(lengths_to_cu_seqlens(lengths), world, strategy=args.strategy)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(total, h, 128, device=device, dtype=torch.bfloat16, generator=gen) for h in (32, 8, 8))
    q, k, v = (shard(x, plan, rank).clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    spec = AttnSpec("cuda", torch.bfloat16, 128, 32, 8, True, False, False, False)
    backend = select_backend(args.backend, spec)
    scale = 1.0 / math.sqrt(128)

    def step(times: list[tuple[float, ...]] | None) -> None:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        t0 = time.perf_counter()
        out = ring_attention(q, k, v, plan, softmax_scale=scale, backend=backend)
        events[1].record()
        t1 = time.perf_counter()
        torch.autograd.grad(out, (q, k, v), dout)
        events[2].record()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        if times is not None:
            times.append((events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]),
                          1e3 * (t1 - t0), 1e3 * (t2 - t1)))

    for _ in range(3):
        step(None)
    dist.barrier()
    times: list[tuple[float, ...]] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            dist.barrier()
            step(times)
    fwd, bwd, host_fwd, host_bwd = (statistics.median(t[i] for t in times) for i in range(4))
    lines = [f"== rank {rank} of {world}, {args.backend}, {args.strategy}, {args.tokens_per_gpu} tokens/GPU, "
             f"{len(lengths)} documents ({args.mix}), tiles per step {plan.tiles_per_step(rank)}, "
             f"KV tokens received per step {[s.recv_tokens for s in plan.steps[rank]]}",
             f"GPU: forward {fwd:.3f} ms, backward {bwd:.3f} ms; host issuing them: {host_fwd:.3f} ms, "
             f"{host_bwd:.3f} ms (median of {args.reps})", "",
             prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), ""]
    reports = [None] * world
    dist.all_gather_object(reports, "\n".join(lines))
    if rank == 0:
        with open(args.out, "a") as f:
            f.write("\n".join(reports))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-gpu", type=int, default=8192)
    p.add_argument("--backend", default="auto")
    p.add_argument("--strategy", default="balanced")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--world", type=int, default=None)
    p.add_argument("--mix", choices=("uniform", "long_tail"), default="uniform")
    p.add_argument("--doc-len", type=int, default=0, help="uniform mix: document length (0: one document)")
    p.add_argument("--out", default="profile.txt", help="file to append the report to")
    args = p.parse_args()
    world = args.world or torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(world, args, os.path.join(tmp, "rendezvous")), nprocs=world)


if __name__ == "__main__":
    main()
