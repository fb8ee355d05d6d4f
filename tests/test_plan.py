"""Plan invariants, checked by brute force against the mask rule of DESIGN.md.

These catch: a token owned twice or not at all; a visible (query, key) pair computed twice (double
counted in the merge) or never (missing from the softmax); a band mis-shifted at a document offset;
a scheduled tile with nothing visible (a wasted kernel call); waves whose tiles share query rows.
All comparisons are exact integer counts, so there is no tolerance.
"""

from collections import Counter

import pytest
import torch

import ringpack
from ringpack.mask import band, band_pairs, clipped_band

MIXES = {
    "zero-one-primes": (0, 1, 2, 3, 5, 7, 0, 11, 13, 17),
    "one-long": (127, 3, 1, 5),
    "many-tiny": (2,) * 30 + (1,) * 5,
    "one-prime-doc": (61,),
    "fewer-tokens-than-chunks": (1, 0, 2),
    "empty": (),
    "all-empty": (0, 0),
}
MASKS = [(True, (-1, -1)), (False, (-1, -1)), (True, (4, -1)), (False, (4, -1)), (True, (3, 2)), (False, (5, 2)),
         (False, (0, 0)), (True, (0, -1))]


def _visible_pairs(cu, causal, window):
    """Every visible (query, key) pair of the global pack, straight from the rule."""
    left, right = window
    pairs = set()
    for start, stop in zip(cu[:-1], cu[1:]):
        for i in range(stop - start):
            for j in range(stop - start):
                if causal and j > i:
                    continue
                if left >= 0 and j < i - left:
                    continue
                if right >= 0 and j > i + right:
                    continue
                pairs.add((start + i, start + j))
    return pairs


def _global_index(plan, rank):
    return [t for a, n in plan.ranges[rank] for t in range(a, a + n)]


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("strategy", ringpack.STRATEGIES)
def test_every_token_once_and_every_visible_pair_once(mix, world, strategy):
    cu = ringpack.lengths_to_cu_seqlens(MIXES[mix]).tolist()
    for causal, window in MASKS:
        _check_invariants(ringpack.make_plan(cu, world, strategy=strategy, causal=causal, window_size=window), cu)


@pytest.mark.parametrize("mix", ["zero-one-primes", "one-long", "many-tiny"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_plan_with_layout_keeps_ownership_and_schedules_its_own_mask(mix, world):
    """A model alternating windowed and global layers shares one token layout between two masks.

    Catches a layout plan whose tiles still follow the layout's mask (pairs missing or doubled) or whose
    ownership drifts from the layout (the hidden states of the two kinds of layer would disagree)."""
    cu = ringpack.lengths_to_cu_seqlens(MIXES[mix]).tolist()
    layout = ringpack.make_plan(cu, world, causal=True, window_size=(4, -1))
    for causal, window in MASKS:
        plan = ringpack.make_plan(cu, world, causal=causal, window_size=window, layout=layout)
        assert plan.ranges == layout.ranges
        assert (plan.causal, plan.window_size) == (causal, window)
        _check_invariants(plan, cu)


def test_layout_of_another_batch_is_refused():
    """The error says what differs: the message once printed the same strategy, world and document count on
    both sides when only a boundary moved."""
    layout = ringpack.make_plan([0, 5, 9], 2)
    with pytest.raises(ValueError, match="another batch: document 0 ends at token 5 there and at 4 here"):
        ringpack.make_plan([0, 4, 9], 2, layout=layout)
    with pytest.raises(ValueError, match="another batch: 2 documents of 9 tokens there, 1 documents of 9 tokens"):
        ringpack.make_plan([0, 9], 2, layout=layout)
    with pytest.raises(ValueError, match="layout was made with strategy 'balanced' over 2 ranks, this plan asks "
                                         "'zigzag' over 2"):
        ringpack.make_plan([0, 5, 9], 2, strategy="zigzag", layout=layout)
    with pytest.raises(ValueError, match="layout must be a ringpack.Plan"):
        ringpack.make_plan([0, 5, 9], 2, layout=layout.ranges)


def _check_invariants(plan, cu):
    world, causal, window = plan.world_size, plan.causal, plan.window_size
    owned = Counter(t for r in range(world) for t in _global_index(plan, r))
    assert sorted(owned) == list(range(cu[-1])) and set(owned.values()) <= {1}
    computed = Counter()
    key_reads, query_waves = Counter(), Counter()  # global token -> tiles reading it as a key / waves covering it
    for r in range(world):
        q_index = _global_index(plan, r)
        for s, step in enumerate(plan.steps[r]):
            assert step.source == (r - s) % world
            k_index = _global_index(plan, step.source)
            if s > 0:  # key rows index the received buffer: the source's runs, in order
                k_index = [k_index[x] for a, n in step.recv_runs for x in range(a, a + n)]
                read = {x for t in step.tiles for x in range(t.k_start, t.k_start + t.k_len)}
                assert read == set(range(len(k_index))), "a received row is never read (wasted bytes)"
                assert plan.send_runs(step.source, s) == step.recv_runs
            for wave in step.waves:
                rows = [x for t in wave.tiles for x in range(t.q_start, t.q_start + t.q_len)]
                assert len(rows) == len(set(rows)), "tiles of one wave share query rows"
                query_waves.update(q_index[x] for x in rows)
                key_reads.update(k_index[x] for t in wave.tiles for x in range(t.k_start, t.k_start + t.k_len))
                for t in wave.tiles:
                    tile_pairs = [(q_index[t.q_start + a], k_index[t.k_start + b])
                                  for a in range(t.q_len) for b in range(t.k_len) if t.lo <= b - a <= t.hi]
                    assert len(tile_pairs) == t.pairs > 0, "tile pair count wrong or tile has nothing visible"
                    rows = {a for a in range(t.q_len) for b in range(t.k_len) if t.lo <= b - a <= t.hi}
                    keys = {b for a in range(t.q_len) for b in range(t.k_len) if t.lo <= b - a <= t.hi}
                    assert len(rows) == t.q_len and len(keys) == t.k_len, "tile not trimmed to what it sees"
                    computed.update(tile_pairs)
    assert all(plan.send_tokens[r][0] == 0 for r in range(world))
    assert set(computed.values()) <= {1}, "a visible pair is computed more than once"
    assert set(computed) == _visible_pairs(cu, causal, window)
    assert sum(plan.work(r) for r in range(world)) == len(computed)
    for r in range(world):  # the depths that decide where 16-bit accumulation is exact (ring.ROUND_ONCE_DEPTH)
        assert plan.query_depth[r] == max((query_waves[t] for t in _global_index(plan, r)), default=0)
        assert plan.key_depth[r] == max((key_reads[t] for t in _global_index(plan, r)), default=0)


def test_key_depth_counts_tiles_not_waves():
    """One wave's tiles may read the same keys (here a window over a non-causal document cut across 4 ranks):
    each is a separate dK/dV partial, so a key depth counted in waves would under-count and round twice."""
    plan = ringpack.make_plan(ringpack.lengths_to_cu_seqlens([3, 1, 97, 7]), 4, strategy="balanced", causal=False)
    tiles = [(t.k_start, t.k_len) for t in plan.steps[0][0].waves[0].tiles]
    assert len(tiles) > len(set(tiles)), "the example lost its tiles that share keys"
    waves_on_rank0_keys = sum(len(step.waves) for steps in plan.steps for step in steps if step.source == 0)
    assert plan.key_depth[0] > waves_on_rank0_keys  # more partials than any count of waves could give


def test_band_pairs_matches_brute_force():
    inf = float("inf")
    for q_len in range(0, 6):
        for k_len in range(0, 6):
            for lo in (-inf, -7, -3, -1, 0, 2, 5):
                for hi in (-4, -1, 0, 1, 3, 8, inf):
                    brute = sum(1 for a in range(q_len) for b in range(k_len) if lo <= b - a <= hi)
                    assert band_pairs(q_len, k_len, lo, hi) == brute, (q_len, k_len, lo, hi)


def test_clipped_band_is_the_band_clipped_to_the_rectangle():
    """The planner asks ``clipped_band`` (ints) for every segment pair; it must be ``band`` (with its infinities)
    clipped to the pair's rectangle, and None exactly when no pair of the rectangle is visible."""
    for causal, window in MASKS + [(False, (-1, 3)), (True, (0, 0))]:
        for q_offset in range(0, 9, 2):
            for k_offset in range(0, 9, 3):
                for q_len in (1, 2, 5):
                    for k_len in (1, 3, 4):
                        lo, hi = band(q_offset, k_offset, causal, window)
                        lo, hi = max(lo, 1 - q_len), min(hi, k_len - 1)
                        want = (int(lo), int(hi)) if lo <= hi else None
                        assert clipped_band(q_offset, q_len, k_offset, k_len, causal, window) == want
                        visible = band_pairs(q_len, k_len, *band(q_offset, k_offset, causal, window))
                        assert (want is None) == (visible == 0)


@pytest.mark.parametrize("strategy", ringpack.STRATEGIES)
def test_shard_unshard_round_trip_and_local_layout(strategy):
    cu = ringpack.lengths_to_cu_seqlens(MIXES["zero-one-primes"])
    x = torch.randn(int(cu[-1]), 3, 2)
    for world in (1, 2, 3, 5):
        plan = ringpack.make_plan(cu, world, strategy=strategy)
        parts = [ringpack.shard(x, plan, r) for r in range(world)]
        assert [p.shape[0] for p in parts] == list(plan.num_tokens)
        assert torch.equal(ringpack.unshard(parts, plan), x)
        positions = ringpack.cu_seqlens_to_position_ids(cu)
        for r in range(world):
            assert torch.equal(plan.position_ids(r), ringpack.shard(positions, plan, r))
            assert plan.local_cu_seqlens(r)[-1] == plan.num_tokens[r]


def test_shard_through_the_gather_kernel_path(monkeypatch):
    """``shard`` on CUDA gathers all runs in one ``copy_runs`` launch; its run table (source, length,
    destination) is built here and checked on the CPU through the same call (the extension's slice fallback).
    Catches destination offsets that drift from the plan's local order."""
    from ringpack import _ext
    monkeypatch.setattr(_ext, "gathers", lambda x: True)
    cu = ringpack.lengths_to_cu_seqlens(MIXES["zero-one-primes"])
    x = torch.arange(int(cu[-1]) * 3).reshape(-1, 3)
    for strategy in ringpack.STRATEGIES:
        plan = ringpack.make_plan(cu, 3, strategy=strategy)
        for r in range(3):
            want = torch.cat([x[a:a + n] for a, n in plan.ranges[r]]) if plan.ranges[r] else x[:0]
            assert torch.equal(ringpack.shard(x, plan, r), want)


def test_zigzag_cuts_every_document_into_two_world_chunks_without_padding():
    """Zigzag: rank r owns chunks r and 2P-1-r of every document, whatever its length."""
    plan = ringpack.make_plan([0, 10, 13], 2, strategy="zigzag")
    # doc 0 (10 tokens): chunks [0,2) [2,5) [5,7) [7,10); doc 1 (3 tokens): chunks [10,10) [10,11) [11,12) [12,13)
    assert plan.ranges[0] == ((0, 2), (7, 3), (12, 1))
    assert plan.ranges[1] == ((2, 5), (10, 2))


def test_contiguous_cuts_near_equal_token_ranges():
    plan = ringpack.make_plan([0, 3, 10, 11], 3, strategy="contiguous")
    assert plan.ranges == (((0, 3),), ((3, 4),), ((7, 4),))


def test_plan_is_deterministic_and_frozen():
    a = ringpack.make_plan([0, 5, 90, 91], 3)
    b = ringpack.make_plan(torch.tensor([0, 5, 90, 91], dtype=torch.int32), 3)
    assert a == b
    with pytest.raises(AttributeError):
        a.world_size = 2


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0.0, 3.0]), "integer"),
    ([0, 2.5], "integers"),
    (torch.tensor([[0, 3]]), "1-D"),
    ([1, 4], "start at 0"),
    ([0, 5, 3], "non-decreasing"),
    ([], "at least one"),
])
def test_bad_cu_seqlens_raise_value_error(cu, message):
    with pytest.raises(ValueError, match=message):
        ringpack.make_plan(cu, 2)


def test_bad_plan_arguments_raise_value_error():
    with pytest.raises(ValueError, match="world_size"):
        ringpack.make_plan([0, 4], 0)
    with pytest.raises(ValueError, match="unknown strategy 'ring'; supported: balanced, zigzag, contiguous"):
        ringpack.make_plan([0, 4], 2, strategy="ring")
    with pytest.raises(ValueError, match="window_size left must be an integer >= -1"):
        ringpack.make_plan([0, 4], 2, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size must be a pair"):
        ringpack.make_plan([0, 4], 2, window_size=(3,))
    plan = ringpack.make_plan([0, 4], 2)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        ringpack.shard(torch.zeros(4), plan, 2)
    with pytest.raises(ValueError, match="tensor has 5 tokens along dim 0, the plan has 4"):
        ringpack.shard(torch.zeros(5), plan, 0)
    with pytest.raises(ValueError, match="got 1 parts"):
        ringpack.unshard([torch.zeros(2)], plan)
    with pytest.raises(ValueError, match="part 1 has 3 tokens"):
        ringpack.unshard([torch.zeros(2), torch.zeros(3)], plan)


@pytest.mark.parametrize("strategy", ["balanced", "zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_layout_over_documents_cut_further(strategy, world):
    """Chunked attention cuts every document at its chunk boundaries and must keep the hidden states' sharding: a
    layout over coarser boundaries gives the same tokens on the same ranks in the same order, and the finer plan is
    correct (every pair of the cut documents computed once). Boundaries that are not a refinement are refused."""
    cu = (0, 40, 41, 137, 137, 200)
    layout = ringpack.make_plan(cu, world, strategy=strategy)
    fine = tuple(sorted(set(cu) | {16, 32, 57, 73, 89, 105, 121, 153, 169, 185}))
    plan = ringpack.make_plan(fine, world, strategy=strategy, window_size=(5, -1), layout=layout)
    assert plan.ranges == layout.ranges and plan.num_tokens == layout.num_tokens
    _check_invariants(plan, fine)
    again = ringpack.make_plan(fine + (200,), world, strategy=strategy, layout=plan)  # a refined layout refined
    assert again.ranges == layout.ranges
    with pytest.raises(ValueError, match="another batch"):
        ringpack.make_plan((0, 30, 200), world, strategy=strategy, layout=layout)
