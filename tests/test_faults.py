"""Faults: a rank that dies or stalls mid-ring, and ranks that hold different plans, must make the others
fail with a clear error within the timeout — never hang.

Each test starts 2 CPU (gloo) ranks with a timeout of a few seconds; rank 1 misbehaves on its second ring
exchange (inside the backward pass) and rank 0 reports what it raised and when. The time bound is the
timeout plus a margin for process start on a loaded 2-core machine.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ringpack import distributed, make_plan, ring_attention, shard
from ringpack.packing import lengths_to_cu_seqlens

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 4.0
MARGIN_S = 20.0


def _misbehave_on_second_exchange(fault: str) -> None:
    real = dist.batch_isend_irecv
    calls = []

    def patched(ops):
        calls.append(len(ops))
        if len(calls) == 2:
            if fault == "die":
                os._exit(3)
            time.sleep(600)  # stalled: alive, holding its sockets, never posting the exchange
        return real(ops)

    dist.batch_isend_irecv = patched


def _rank(rank: int, init_file: str, fault: str, lengths: list[tuple[int, ...]], queue) -> None:
    torch.set_num_threads(1)
    distributed.init_spawned(rank, 2, init_file, device="cpu", timeout_s=TIMEOUT_S)
    plan = make_plan(lengths_to_cu_seqlens(lengths[rank]), 2, strategy="zigzag", causal=False)
    if rank == 1 and fault != "none":
        _misbehave_on_second_exchange(fault)
    gen = torch.Generator().manual_seed(0)
    total = plan.total_tokens
    q, k, v = (shard(torch.randn(total, 2, 8, generator=gen, dtype=torch.float64), plan, rank).requires_grad_()
               for _ in range(3))
    start = time.monotonic()
    try:
        distributed.verify_plan(plan)
        ring_attention(q, k, v, plan, causal=False).sum().backward()
        queue.put((rank, "ok", "", time.monotonic() - start))
    except (RuntimeError, ValueError) as e:
        queue.put((rank, type(e).__name__, str(e), time.monotonic() - start))
    queue.close()
    queue.join_thread()  # the report is written before the hard exit below
    os._exit(0)  # skip interpreter teardown, which could wait on a dead peer


def _run(fault: str, lengths: list[tuple[int, ...]]) -> dict[int, tuple[str, str, float]]:
    """Start both ranks; return what each rank that finished reported, by rank."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(tmp, "init"), fault, lengths, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        reports = {}
        try:
            wanted = 1 if fault != "none" else 2
            while len(reports) < wanted:
                rank, kind, message, seconds = queue.get(timeout=TIMEOUT_S + 60)
                reports[rank] = (kind, message, seconds)
        finally:
            for p in procs:
                p.kill()
                p.join()
    return reports


def test_dead_rank_makes_the_other_raise():
    """A neighbour that died mid-ring must surface on rank 0 as an error naming the ring exchange, within the
    timeout: a hang here would hold a whole cluster job until its wall-clock limit. (A stalled neighbour is
    the test below, through the check under torchrun.)"""
    reports = _run("die", [(150, 20)] * 2)
    kind, message, seconds = reports[0]
    assert kind == "RuntimeError"
    assert "ring exchange failed on rank 0" in message
    assert seconds < TIMEOUT_S + MARGIN_S


def test_ranks_with_different_plans_are_named():
    """Ranks given different cu_seqlens must all raise a ValueError naming which ranks disagree, before any
    mismatched message is posted (which would give wrong results or a hang)."""
    reports = _run("none", [(150, 20), (150, 21)])
    for rank in (0, 1):
        kind, message, _ = reports[rank]
        assert kind == "ValueError"
        assert "hold different plans" in message
        assert "ranks 0: " in message and "170 tokens" in message
        assert "ranks 1: " in message and "171 tokens" in message


STALLING_CHECK = """
import os, sys
sys.path.insert(0, {tests!r})
from test_faults import _misbehave_on_second_exchange
from ringpack.__main__ import main
if os.environ["RANK"] == "1":
    _misbehave_on_second_exchange("stall")
sys.exit(main(sys.argv[1:]))
"""


def test_check_under_torchrun_fails_cleanly_when_a_rank_stalls(tmp_path):
    """``check --timeout`` under torchrun: a rank that stalls mid-ring (alive, never posting its exchange) must
    turn into a one-line error on the others and a non-zero exit within about the timeout, not a job that
    waits forever (torchrun itself never times out a silent rank)."""
    script = tmp_path / "stalling_check.py"
    script.write_text(STALLING_CHECK.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), "check", "--timeout", str(TIMEOUT_S), "--strategy", "zigzag", "--no-causal",
                          "--window=-1,-1", "--lengths", "150,20"],
                         capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert run.returncode != 0
    assert "ringpack check: rank 0 failed: ringpack: ring exchange failed on rank 0" in run.stderr
    assert time.monotonic() - start < TIMEOUT_S + 2 * MARGIN_S
