"""Which tile shapes survive cuDNN's dense attention (forward + backward) through ringpack's cudnn backend.

    python benchmarks/probe_cudnn_tiles.py LENGTH CAUSAL HEADS KV_HEADS   # one shape; prints "ok" or dies

Run each shape in its own process: a failing shape may kill the process (segmentation fault).
"""

from __future__ import annotations

import sys

import torch

from ringpack.backends.cudnn import CudnnBackend
from ringpack.plan import make_plan


def main(length: int, causal: bool, heads: int, kv_heads: int, head_dim: int = 64) -> None:
    plan = make_plan([0, length], 1, causal=causal)
    (wave,) = plan.steps[0][0].waves
    g = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(length, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "ab")
    k, v = (torch.randn(length, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "ab")
    b = CudnnBackend()
    ((_, out, lse),) = b.forward(q, k, v, wave, scale=head_dim ** -0.5, softcap=0.0)
    torch.cuda.synchronize()
    print(f"fwd ok {length} causal={causal} {heads}/{kv_heads}", flush=True)
    ((_, _, dq, dk, dv),) = b.backward(dout, q, k, v, out, lse.float(), None, wave, scale=head_dim ** -0.5, softcap=0.0)
    torch.cuda.synchronize()
    print(f"bwd ok {length} causal={causal} {heads}/{kv_heads} finite={bool(dq.isfinite().all())}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]))
