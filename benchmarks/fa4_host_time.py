"""Host time of one FlashAttention-4 varlen call as ringpack issues it, and with more of its arguments given.

Where a ring step is short, the host's time to issue a kernel call can set the pace. This measures the time
``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd`` take to return (the median of 30 calls, the
device idle at the start of each) for the first varlen call of rank 0 of a 2-rank ``balanced`` plan of the long-tail
mix, then cProfile's tables of 20 calls of each::

    python benchmarks/fa4_host_time.py 8192 > fa4_host_time.txt     # tokens per rank; on a GPU with flash-attn-4
"""

from __future__ import annotations

import cProfile
import io
import math
import pstats
import sys
import time

import mixes
import torch
from flash_attn.cute import interface as fa4

from ringpack.backends.varlen import call_keys, cu_seqlens_on, varlen_groups
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import make_plan


def host_ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e3 * sorted(times)[n // 2]


def main(tokens_per_rank: int) -> None:
    dev = torch.device("cuda")
    plan = make_plan(lengths_to_cu_seqlens(mixes.long_tail(2 * tokens_per_rank, seed=0)), 2)
    n, heads, kv_heads, dim = plan.num_tokens[0], 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(n, heads, dim, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(n, kv_heads, dim, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    group = varlen_groups(plan.steps[0][0].waves[0])[0]
    cu_q, cu_k = cu_seqlens_on(group, dev)
    k, v = call_keys(k, group), call_keys(v, group)
    common = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=group.max_q,
                  max_seqlen_k=group.max_k, softmax_scale=1 / math.sqrt(dim), causal=False, softcap=0.0,
                  window_size_left=None, window_size_right=0)
    print(f"rank 0 of 2, long tail, {tokens_per_rank} tokens per rank: {len(group.q_lens)} sequences, max_q "
          f"{group.max_q}, max_k {group.max_k}; heads {heads}/{kv_heads}, head dim {dim}, bf16")
    out, lse = fa4._flash_attn_fwd(**common, return_lse=True)[:2]
    dout = torch.randn_like(q)
    bwd_args = dict(common, out=out, dout=dout, lse=lse, dq=None, dk=None, dv=None, dlse=None)
    calls = {
        "forward": lambda: fa4._flash_attn_fwd(**common, return_lse=True),
        "forward, out and lse given": lambda: fa4._flash_attn_fwd(
            **common, return_lse=True, out=torch.empty_like(q), lse=torch.empty(heads, n, device=dev)),
        "forward, pack_gqa=False": lambda: fa4._flash_attn_fwd(**common, return_lse=True, pack_gqa=False),
        "backward": lambda: fa4._flash_attn_bwd(**bwd_args),
        "backward, dq/dk/dv given": lambda: fa4._flash_attn_bwd(
            **dict(bwd_args, dq=torch.empty_like(q), dk=torch.empty_like(k), dv=torch.empty_like(v))),
    }
    for name, fn in calls.items():
        print(f"{name}: host {host_ms(fn):.3f} ms per call")
    for name in ("forward", "backward"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            calls[name]()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(f"\n## cProfile, {name} x 20\n{text.getvalue()}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)
