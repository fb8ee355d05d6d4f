"""Shared pieces of the framework-integration tests: gradient and loss comparisons across ranks.

Each test module starts one 2-rank gloo job (``dist_utils.run_distributed``) and checks many things in it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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


def expect_value_error(fn) -> str:
    """The message of the ValueError ``fn()`` raises, or "" when it raises none."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""
