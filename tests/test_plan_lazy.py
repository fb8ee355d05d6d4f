"""Plans built per rank on first access are the plans of the eager planner (``eager_plan``, the code before).

These catch: a cell shared by two documents that are not cut alike (wrong tiles or rows for one of them); a
step's tiles or received rows shifted by the wrong document offset; waves grouped differently from one pass over
the whole step; a rank's sends that disagree with what its targets receive; a depth that depends on which rank
was read first; a ``balanced`` search that prunes a try the old search would have kept; and plans whose lazily
computed parts tear or differ when ranks read one plan from several threads at once. Everything is compared
exactly, so there is no tolerance.
"""

import sys
import threading

import eager_plan
import pytest
from mixes import MIXES as GENERATED
from mixes import n_docs
from test_plan import MASKS, MIXES

import ringpack
from ringpack import partition
from ringpack.partition import CostModel

CASES = {**{name: list(lengths) for name, lengths in MIXES.items()},
         "long-tail-4k": GENERATED["long-tail"](4096, seed=3),
         "crumbs-3k": GENERATED["giant-plus-crumbs"](3000, seed=1),
         "docs-300": n_docs(2000, 300, seed=2),
         "equal-16": [64] * 16}


def _everything(plan, ranks):
    """What every consumer reads of ``plan``, ranks visited in the order given."""
    out = {}
    for r in ranks:
        out[r] = (plan.ranges[r], plan.segments[r], tuple(plan.steps[r]),
                  tuple(plan.send_runs(r, s) for s in range(plan.world_size)), plan.busy_steps(r),
                  plan.send_tokens[r], plan.query_depth[r], plan.key_depth[r],
                  tuple(plan.key_depth_capped(r, cap) for cap in (1, 2, 3, 5)))
    return out


def _eager(old, ranks):
    return {r: (old.ranges[r], old.segments[r], old.steps[r], tuple(old.send_runs(r, s) for s in range(len(ranks))),
                old.busy[r], old.send_tokens[r], old.query_depth[r], old.key_depth[r],
                tuple(min(old.key_depth[r], cap) for cap in (1, 2, 3, 5)))
            for r in ranks}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("strategy", ringpack.STRATEGIES)
@pytest.mark.parametrize("mix", sorted(CASES))
def test_lazy_plan_equals_eager_planner(mix, strategy, world):
    cu = tuple(ringpack.lengths_to_cu_seqlens(CASES[mix]).tolist())
    masks = MASKS if len(CASES[mix]) < 100 else MASKS[:3]
    for causal, window in masks:
        plan = ringpack.make_plan(cu, world, strategy=strategy, causal=causal, window_size=window)
        old = eager_plan.make_plan(cu, world, strategy, causal, window)
        ranks = list(range(world))[::-1]  # a rank's schedule must not depend on which rank was read before it
        assert _everything(plan, ranks) == _eager(old, ranks), (mix, strategy, world, causal, window)
        assert plan.num_tokens == tuple(sum(n for _, n in r) for r in old.ranges)


@pytest.mark.parametrize("strategy", ringpack.STRATEGIES)
def test_layout_plan_equals_eager_planner_on_the_layout_runs(strategy):
    """A plan made with ``layout=`` schedules its own mask over the layout's ownership, as the old planner did."""
    cu = tuple(ringpack.lengths_to_cu_seqlens(CASES["long-tail-4k"]).tolist())
    layout = ringpack.make_plan(cu, 4, strategy=strategy, causal=True, window_size=(64, -1))
    for causal, window in MASKS[:5]:
        plan = ringpack.make_plan(cu, 4, strategy=strategy, causal=causal, window_size=window, layout=layout)
        old = eager_plan.make_plan(cu, 4, strategy, causal, window, runs=[list(r) for r in layout.ranges])
        assert _everything(plan, range(4)) == _eager(old, range(4))


@pytest.mark.parametrize("world", [8, 64])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (4096, -1))])
def test_balanced_owns_what_the_old_search_owned(world, causal, window):
    """The search prunes tries that can no longer win and grows the cut documents' loads incrementally: the
    documents it keeps whole, cuts and places must be exactly the old search's (2000 and 20k documents)."""
    for lengths in (n_docs(1 << 18, 2000, seed=5), GENERATED["long-tail"](1 << 19), n_docs(1 << 18, 20_000)):
        cu = tuple(ringpack.lengths_to_cu_seqlens(lengths).tolist())
        old = eager_plan.balanced(cu, world, causal, window)
        plan = ringpack.make_plan(cu, world, causal=causal, window_size=window)
        assert plan.ranges == eager_plan.ranges(cu, old)


@pytest.mark.parametrize("targets", [(1.10, 1.005), (1.005, 1.10), (1.0, 1.0), (1.5, 1.5)])
def test_balanced_search_keeps_the_old_rule_under_other_targets(targets):
    """With unequal targets an earlier try over one of them can have the lower worse ratio than the first try under
    both (the old search then kept the earlier one), and with unreachable targets every try is over: the pruned
    search must place those tries in full and pick what the old one picked."""
    cost = CostModel(target_imbalance=targets[0], target_token_imbalance=targets[1])
    for lengths in (n_docs(1 << 16, 700, seed=7), GENERATED["giant-plus-crumbs"](1 << 16, seed=2)):
        cu = tuple(ringpack.lengths_to_cu_seqlens(lengths).tolist())
        for world in (3, 8, 32):
            old = eager_plan.ranges(cu, eager_plan.balanced(cu, world, True, (-1, -1), cost=cost))
            new = partition.balanced(cu, world, True, (-1, -1), cost=cost)
            assert tuple(tuple(_runs(cu, new.segments(r))) for r in range(world)) == old, (targets, world)


def _runs(cu, segments):
    """Maximal (global start, length) runs of ``Owners.segments``, as ``Plan.ranges`` has them."""
    out: list[list[int]] = []
    for doc, offset, length in segments:
        start = cu[doc] + offset
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length])
    return [(a, n) for a, n in out]


def test_wide_ring_with_few_tokens_keeps_only_busy_steps():
    """10 tokens over 4096 ranks: a rank's steps read as 4096 steps, but only those with tiles are stored, and
    every rank's pairs add up to the mask's (a plan of this size once held 16M steps)."""
    lengths = [3, 0, 4, 3]
    cu = ringpack.lengths_to_cu_seqlens(lengths).tolist()
    visible = sum(n * (n + 1) // 2 for n in lengths)
    for strategy in ringpack.STRATEGIES:
        plan = ringpack.make_plan(cu, 4096, strategy=strategy)
        assert sum(plan.work(r) for r in range(4096)) == visible
        holder = max(range(4096), key=plan.num_tokens.__getitem__)
        steps = plan.steps[holder]
        assert len(steps) == 4096 and len(steps.computing()) <= 10
        assert [step.source for step in steps[:3]] == [holder, (holder - 1) % 4096, (holder - 2) % 4096]
        assert all(not step.waves for s, step in enumerate(steps) if s not in steps.computing())
        small = ringpack.make_plan(cu, 16, strategy=strategy)
        assert _everything(small, range(16)) == _eager(eager_plan.make_plan(tuple(cu), 16, strategy, True, (-1, -1)),
                                                       range(16))


def _read_from_threads(plan, world):
    """``_everything`` of ``plan`` read by ``world`` threads at once, each starting at its own rank."""
    start, got, errors = threading.Barrier(world), {}, []

    def read(rank):
        try:
            start.wait()
            got[rank] = _everything(plan, [(rank + i) % world for i in range(world)])
        except Exception as e:  # surfaced below, with the thread's rank
            errors.append((rank, e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=read, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    return got


def test_threads_reading_one_fresh_plan_agree():
    """Ranks as threads of one process read one plan at once (the test harness does): every thread must see the
    values a single reader sees, never a half-built step or a depth from a partly walked column."""
    cu = ringpack.lengths_to_cu_seqlens(CASES["long-tail-4k"]).tolist()
    for strategy in ringpack.STRATEGIES:
        want = _everything(ringpack.make_plan(cu, 8, strategy=strategy), range(8))
        got = _read_from_threads(ringpack.make_plan(cu, 8, strategy=strategy), 8)
        assert all(got[r] == want for r in range(8))


def test_plan_equality_follows_ownership_and_mask():
    """Plans compare by what decides every schedule (pack, ranks, strategy, mask, ownership), without building any."""
    cu = ringpack.lengths_to_cu_seqlens(CASES["long-tail-4k"]).tolist()
    a, b = ringpack.make_plan(cu, 4), ringpack.make_plan(cu, 4)
    assert a == b and hash(a) == hash(b)
    assert a != ringpack.make_plan(cu, 4, window_size=(8, -1))
    assert a != ringpack.make_plan(cu, 4, causal=False)
    own = ringpack.make_plan(cu, 4, window_size=(8, -1))
    for layout in (a, ringpack.make_plan(cu, 4, causal=False)):  # the same mask over another plan's ownership
        shared = ringpack.make_plan(cu, 4, window_size=(8, -1), layout=layout)
        assert (shared == own) == (shared.ranges == own.ranges)
