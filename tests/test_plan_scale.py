"""Steps built in bulk (documents cut alike shifted together, waves as tables) are the eager planner's steps.

These catch: a tile shifted by another document's rows (the bulk shift indexes documents, pairs and tiles through
three levels of columns); tiles of one wave out of document order after the sort by step and wave; received rows
counted from the wrong step's start; runs merged across two steps, or not merged where two documents' rows touch;
a group of documents cut alike that is not (zero-length documents, a length met once, whole and cut documents of
one length under ``balanced``); and a wave table whose tiles, hash or equality differ from the wave of the same
tiles made one by one (the kernels' layout caches key on waves). Everything is compared exactly: no tolerance.
"""

import random

import eager_plan
import pytest
from test_plan_lazy import _eager, _everything

import ringpack
from ringpack.schedule import Wave

MASKS = [(True, (-1, -1)), (False, (-1, -1)), (True, (3, -1)), (False, (2, 5)), (True, (0, 0)), (False, (-1, 0))]


def _random_pack(rng: random.Random) -> list[int]:
    """Mostly tiny documents (most zigzag chunks 0 or 1 token), some empty, a few long, repeats of one length."""
    lengths = [rng.choice((0, 1, 1, 2, 3, 5, 8, 13)) for _ in range(rng.randint(0, 30))]
    lengths += [rng.randint(20, 90) for _ in range(rng.randint(0, 3))] + [7] * rng.randint(0, 4)
    rng.shuffle(lengths)
    return lengths


@pytest.mark.parametrize("world", range(1, 10))
@pytest.mark.parametrize("strategy", ringpack.STRATEGIES)
def test_bulk_plan_equals_eager_planner_on_random_packs(strategy, world):
    rng = random.Random(world * 31 + len(strategy))
    for _ in range(4):
        cu = tuple(ringpack.lengths_to_cu_seqlens(_random_pack(rng)).tolist())
        for causal, window in MASKS:
            plan = ringpack.make_plan(cu, world, strategy=strategy, causal=causal, window_size=window)
            old = eager_plan.make_plan(cu, world, strategy, causal, window)
            ranks = list(range(world))[::-1]
            assert _everything(plan, ranks) == _eager(old, ranks), (cu, strategy, world, causal, window)


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (6, -1))])
def test_bulk_plan_equals_eager_planner_with_many_tiny_documents_over_many_ranks(causal, window):
    """The shape the bulk path is for: 400 documents of 0 to 50 tokens over 32 ranks (a 64-chunk zigzag cut leaves
    most chunks empty or one token), and a few long ones cut into every chunk."""
    rng = random.Random(7)
    lengths = [rng.randint(0, 50) for _ in range(400)] + [300, 65, 64]
    cu = tuple(ringpack.lengths_to_cu_seqlens(lengths).tolist())
    plan = ringpack.make_plan(cu, 32, strategy="zigzag", causal=causal, window_size=window)
    old = eager_plan.make_plan(cu, 32, "zigzag", causal, window)
    ranks = list(range(32))[::-1]
    assert _everything(plan, ranks) == _eager(old, ranks)
    assert [plan.work(r) for r in ranks] == [sum(t.pairs for step in old.steps[r] for t in step.tiles) for r in ranks]


def test_wave_table_is_its_tiles():
    """A wave read by columns, by tiles, hashed and compared is the wave made from the same tiles one by one."""
    cu = tuple(ringpack.lengths_to_cu_seqlens(list(range(1, 90, 7))).tolist())
    plan = ringpack.make_plan(cu, 5, strategy="zigzag", causal=True, window_size=(9, -1))
    waves = [w for r in range(5) for step in plan.steps[r] for w in step.waves]
    assert waves
    for wave in waves:
        again = Wave.of(wave.tiles)
        assert again == wave and hash(again) == hash(wave) and len(wave) == len(wave.tiles)
        for field in wave.tiles[0]._fields:
            assert wave.column(field).tolist() == [getattr(t, field) for t in wave.tiles]
    assert len({hash(w) for w in waves}) > 1
