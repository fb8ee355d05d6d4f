"""Tokens moved by a plan: this rank's shard of a global packed tensor, the global tensor from every shard, and
the gather of uneven shards over a process group. The only module that moves tokens between layouts.

Legend: ``x_T...`` a global packed tensor (``T`` tokens, documents concatenated along dim 0); ``x_N...`` one
rank's shard (``N = plan.num_tokens[rank]`` tokens in the plan's local order). Shards are uneven in general
(nothing is padded), which is why ``torch.distributed.all_gather`` cannot take them directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ringpack import _ext, _triton
from ringpack.plan import Plan, check_rank
from ringpack.schedule import prefix_sums


def shard(x: torch.Tensor, plan: Plan, rank: int) -> torch.Tensor:
    """This rank's tokens of a global packed tensor ``[T, ...]``, in the plan's local order."""
    check_rank(rank, plan.world_size)
    _check_tokens("shard: tensor", x, plan.total_tokens, "the plan has")
    runs = plan.ranges[rank]
    if len(runs) == 1:
        return x[runs[0][0]:runs[0][0] + runs[0][1]]
    # One gather kernel instead of a copy per run (packs have thousands of runs): the extension's when it was
    # built, else Triton's; torch's cat where neither runs (the CPU, autograd).
    if _ext.gathers(x):
        out = x.new_empty((plan.num_tokens[rank], *x.shape[1:]))
        at = prefix_sums(n for _, n in runs)
        _ext.copy_runs(out, x, [(a, n, d) for (a, n), d in zip(runs, at)])
        return out
    gathered = _triton.gather_rows(x, runs, plan.num_tokens[rank]) if x.is_cuda else None
    if gathered is not None:
        return gathered
    return torch.cat([x[a:a + n] for a, n in runs]) if runs else x[:0]


def unshard(parts: Sequence[torch.Tensor], plan: Plan) -> torch.Tensor:
    """Reassemble every rank's shard (``parts[r]`` from rank ``r``) into the global ``[T, ...]`` tensor."""
    if len(parts) != plan.world_size:
        raise ValueError(f"unshard: got {len(parts)} parts, the plan has world_size {plan.world_size}")
    pieces = []
    for r, part in enumerate(parts):
        _check_tokens(f"unshard: part {r}", part, plan.num_tokens[r], f"the plan gives rank {r}")
        local = 0
        for a, n in plan.ranges[r]:
            pieces.append((a, part[local:local + n]))
            local += n
    pieces.sort(key=lambda p: p[0])
    if not pieces:
        return parts[0][:0] if parts else torch.zeros(0)
    return torch.cat([p for _, p in pieces])


def gather(x_local: torch.Tensor, plan: Plan, *, group: dist.ProcessGroup | None = None,
           dst: int | None = None) -> torch.Tensor | None:
    """The global ``[T, ...]`` tensor from every rank's shard ``[N, ...]``: on every rank, or only on group rank
    ``dst`` (None elsewhere). All ranks of ``group`` call it. Shards are padded to the longest for the exchange.

    For outputs to inspect or evaluate (logits, hidden states); not differentiable, so a tensor that requires
    grad under grad mode is refused rather than cut off from its graph.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if plan.world_size != 1:
            raise ValueError(f"gather: torch.distributed is not initialized, and the plan is for {plan.world_size} "
                             "ranks; initialise the process group first (ringpack.distributed.init_distributed)")
        return unshard([x_local], plan)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world != plan.world_size:
        raise ValueError(f"gather: the process group has {world} ranks, the plan {plan.world_size}")
    if dst is not None:
        check_rank(dst, world)
    if x_local.requires_grad and torch.is_grad_enabled():
        raise ValueError("gather is not differentiable; call it under torch.no_grad() or on x.detach()")
    _check_tokens("gather: tensor", x_local, plan.num_tokens[rank], f"the plan gives rank {rank}")
    padded = x_local.new_zeros((max(plan.num_tokens), *x_local.shape[1:]))
    padded[:x_local.shape[0]] = x_local
    parts = [torch.empty_like(padded) for _ in range(world)] if dst in (None, rank) else None
    if dst is None:
        dist.all_gather(parts, padded, group=group)
    else:
        dist.gather(padded, parts, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
        if rank != dst:
            return None
    return unshard([p[:n] for p, n in zip(parts, plan.num_tokens)], plan)


def _check_tokens(what: str, x: torch.Tensor, tokens: int, whose: str) -> None:
    """A ValueError unless ``x`` is a tensor with ``tokens`` rows along dim 0, saying what was probably meant."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a tensor [tokens, ...], got {type(x).__name__}")
    if x.dim() >= 1 and x.shape[0] == tokens:
        return
    got = x.shape[0] if x.dim() else "no"
    hint = ""
    if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == tokens:
        hint = "; this looks like a [1, T, ...] batch: packed tensors have the tokens along dim 0, pass x[0]"
    raise ValueError(f"{what} has {got} tokens along dim 0, {whose} {tokens} (shape {tuple(x.shape)}){hint}")
