"""Shared pieces of the framework-integration tests: a 2-rank gloo job per test module, and comparisons.

The job is started once per module (spawning and importing a framework costs seconds; a check costs
milliseconds). The group comes from the ``env://`` variables that torchrun would set, because DeepSpeed
and Megatron-core read them too.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_file: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # the ranks share two cores; more threads only contend
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump(result, f)


def run_job(world: int, fn, *args):
    """Run ``fn(*args)`` on ``world`` spawned gloo ranks (``fn`` must be importable); return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pkl")
        mp.spawn(_worker, args=(world, _free_port(), out_file, fn, args), nprocs=world)
        with open(out_file, "rb") as f:
            return pickle.load(f)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in float64 (Frobenius norms); inf when one side is missing."""
    if got is None or want is None:
        return float("inf")
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-30))


def grad_errors(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-parameter relative error of ``model``'s gradients against ``reference`` (name -> gradient)."""
    grads = dict((n, p.grad) for n, p in model.named_parameters())
    if set(grads) != set(reference):
        raise AssertionError(f"parameter names differ: {sorted(set(grads) ^ set(reference))}")
    return {n: rel_err(grads[n], reference[n]) for n in reference}


def sum_grads(model: torch.nn.Module, group=None) -> None:
    """All-reduce (SUM) every parameter gradient over ``group``: the ranks' shares add up to the full gradient."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def max_over_ranks(errors: dict[str, float], group=None) -> dict[str, float]:
    """The largest value of every entry over the ranks of ``group`` (NaN counts as +inf)."""
    names = sorted(errors)
    t = torch.tensor([errors[n] if errors[n] == errors[n] else float("inf") for n in names], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(names, t.tolist()))
