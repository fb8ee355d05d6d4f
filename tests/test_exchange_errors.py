"""Every rank of a ring gets ringpack's error, not gloo's abort: ranks that call it with different shapes or dtypes,
and a rank that comes back after its peer gave up on it.

Before: ranks that disagreed on head dim or dtype posted messages of different sizes; rank 0 got an error but
rank 1 was killed by gloo (``EnforceNotMet``, SIGABRT) with nothing to say why. A rank that stalled past the
timeout and came back met gloo's raw "Connection closed by peer". Each test starts 2 CPU (gloo) ranks and collects
what each rank raised; the bound on time is the timeout plus a margin for process start on a loaded machine.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from ringpack import distributed, make_plan, ring_attention, shard

TIMEOUT_S = 4.0


def _rank(rank: int, init_file: str, case: str, queue) -> None:
    torch.set_num_threads(1)
    distributed.init_spawned(rank, 2, init_file, device="cpu", timeout_s=TIMEOUT_S)
    plan = make_plan([0, 150, 170], 2, strategy="zigzag")
    head_dim = 16 if case == "head_dim" and rank == 1 else 8
    dtype = torch.float32 if case == "dtype" and rank == 1 else torch.float64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (shard(torch.randn(170, h, head_dim, generator=gen), plan, rank).to(dtype).requires_grad_()
               for h in (4, 2, 2))
    if case == "late" and rank == 1:
        real = dist.batch_isend_irecv

        def late(ops):  # the backward's first exchange comes after rank 0 gave up on it
            if late.calls == 1:
                time.sleep(TIMEOUT_S + 6)
            late.calls += 1
            return real(ops)

        late.calls = 0
        dist.batch_isend_irecv = late
    try:
        ring_attention(q, k, v, plan).sum().backward()
        queue.put((rank, "ok", ""))
    except (RuntimeError, ValueError) as e:
        queue.put((rank, type(e).__name__, str(e)))
    queue.close()
    queue.join_thread()
    os._exit(0)  # skip interpreter teardown, which could wait on a dead peer


def _run(case: str) -> dict[int, tuple[str, str]]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(tmp, "init"), case, queue)) for r in range(2)]
        for p in procs:
            p.start()
        reports = {}
        try:
            while len(reports) < 2:
                rank, kind, message = queue.get(timeout=TIMEOUT_S + 60)
                reports[rank] = (kind, message)
        finally:
            for p in procs:
                p.kill()
                p.join()
    return reports


@pytest.mark.parametrize("case, detail", [("head_dim", "rank 1: 4 heads, 2 kv heads, head_dim 16"),
                                          ("dtype", "rank 1: 4 heads, 2 kv heads, head_dim 8, torch.float32")])
def test_every_rank_names_the_disagreement(case, detail):
    reports = _run(case)
    for rank in (0, 1):
        kind, message = reports[rank]
        assert kind == "ValueError", (rank, kind, message)
        assert "ranks of the group call ring_attention with different shapes, dtypes or plans" in message
        assert "rank 0: 4 heads, 2 kv heads, head_dim 8, torch.float64" in message and detail in message


def test_a_rank_back_after_the_timeout_gets_ringpacks_error():
    reports = _run("late")
    for rank in (0, 1):
        kind, message = reports[rank]
        assert kind == "RuntimeError", (rank, kind, message)
        assert message.startswith(f"ringpack: ring exchange failed on rank {rank}"), message
