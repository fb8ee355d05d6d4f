"""``ringpack.gather``: every rank's uneven shard back into the global packed tensor, over gloo.

Shards of a plan are uneven in general (``dist.all_gather`` refuses them), so gather pads them to the longest and
cuts the padding off again; a slip there (padding kept, a rank's rows in another's place, ``dst`` read as a
global rank inside a subgroup) gives a tensor of the right shape with wrong rows. Every comparison is exact
(``torch.equal``): gather only moves values.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

import ringpack
from ringpack import gather, make_plan, shard
from ringpack.packing import lengths_to_cu_seqlens

LENGTHS = (0, 1, 7, 97, 31, 0, 13, 64)  # 213 tokens: no strategy splits them evenly over 2 or 3 ranks
MASKS = ((True, (-1, -1)), (False, (4, 2)), (True, (9, 0)))


def _pack(*shape, dtype=torch.float64) -> torch.Tensor:
    total = sum(LENGTHS)
    return torch.arange(total * max(1, torch.Size(shape).numel()), dtype=dtype).reshape(total, *shape)


def _gather_every_strategy() -> list[tuple[int, ...]]:
    """On every rank: gather to all and to each ``dst``, for every strategy and mask; returns the shard sizes."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = []
    for strategy in ringpack.STRATEGIES:
        for causal, window in MASKS:
            plan = make_plan(lengths_to_cu_seqlens(LENGTHS), world, strategy=strategy, causal=causal,
                             window_size=window)
            sizes.append(plan.num_tokens)
            for x in (_pack(2, 3), _pack(dtype=torch.int64)):  # [T, H, D] activations, [T] labels
                assert torch.equal(gather(shard(x, plan, rank), plan), x), (strategy, causal, window)
                for dst in range(world):
                    got = gather(shard(x, plan, rank), plan, dst=dst)
                    if rank == dst:
                        assert torch.equal(got, x), (strategy, causal, window, dst)
                    else:
                        assert got is None
    return sizes


def _at_two() -> tuple[list[tuple[int, ...]], list[str]]:
    return _gather_every_strategy(), _gather_refusals()


def _at_three() -> tuple[list[tuple[int, ...]], str]:
    return _gather_every_strategy(), _gather_in_subgroup()


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-rank gloo group for the tests below (spawning costs seconds, a gather microseconds)."""
    return run_distributed(2, _at_two)


@pytest.fixture(scope="module")
def three_ranks():
    return run_distributed(3, _at_three)


def test_gather_uneven_shards_every_strategy(two_ranks, three_ranks):
    """Every strategy's uneven shards come back as the global tensor, on every rank or only on ``dst``
    (asserted on every rank, for 2 and 3 ranks)."""
    for sizes in (two_ranks[0], three_ranks[0]):
        assert any(len(set(s)) > 1 for s in sizes)  # the shards really were uneven


def _gather_in_subgroup() -> str:
    """Ranks 1 and 2 of 3 gather over their own group to its rank 1 (global rank 2); rank 0 takes no part."""
    rank = dist.get_rank()
    group = dist.new_group([1, 2])  # collective: every rank creates it
    if rank == 0:
        return "idle"
    plan = make_plan(lengths_to_cu_seqlens(LENGTHS), 2, strategy="zigzag")
    x = _pack(2, 3)
    group_rank = dist.get_rank(group)
    got = gather(shard(x, plan, group_rank), plan, group=group, dst=1)
    assert (got is None) == (rank == 1)
    if rank == 2:
        assert torch.equal(got, x)
    assert torch.equal(gather(shard(x, plan, group_rank), plan, group=group), x)
    return "ok"


def test_gather_inside_a_subgroup_takes_dst_as_a_group_rank(three_ranks):
    """``dst`` counts ranks of ``group``: with it read as a global rank, rank 1 (not 2) would get the tensor."""
    assert three_ranks[1] == "idle"  # rank 0's answer: ranks 1 and 2 asserted theirs


def _gather_refusals() -> list[str]:
    rank = dist.get_rank()
    plan = make_plan(lengths_to_cu_seqlens(LENGTHS), 2)
    x = _pack(2, 3)
    messages = []
    local = shard(x, plan, rank).requires_grad_()
    for bad in (lambda: gather(local, plan), lambda: gather(x[:5], plan),
                lambda: gather(torch.zeros(3, 2, 3), make_plan([0, 9], 3)),
                lambda: gather(local.detach(), plan, dst=2)):
        with pytest.raises(ValueError) as err:
            bad()
        messages.append(str(err.value))
    with torch.no_grad():
        assert torch.equal(gather(local, plan), x)  # under no_grad a tensor that requires grad is fine
    return messages


def test_gather_refuses_what_it_cannot_do(two_ranks):
    """A tensor in an autograd graph (gather would cut it off silently), a shard of the wrong length, a plan for
    another world size and a dst outside the group raise a ValueError naming the problem on every rank."""
    messages = two_ranks[1]
    assert "not differentiable" in messages[0]
    assert "gather: tensor has 5 tokens along dim 0" in messages[1]
    assert "the process group has 2 ranks, the plan 3" in messages[2]
    assert "rank must be an integer in [0, 2), got 2" in messages[3]


def test_gather_without_a_process_group():
    """One rank and no process group: gather is unshard (a balanced plan reorders documents even then)."""
    plan = make_plan(lengths_to_cu_seqlens(LENGTHS), 1, strategy="balanced")
    x = _pack(2, 3)
    assert torch.equal(gather(shard(x, plan, 0), plan), x)
    with pytest.raises(ValueError, match="torch.distributed is not initialized, and the plan is for 2 ranks"):
        gather(x, make_plan(lengths_to_cu_seqlens(LENGTHS), 2))
