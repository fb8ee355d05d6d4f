"""``backends.varlen.varlen_groups`` lays a wave out as varlen calls from the wave's table in bulk; here it is held to
the tile-by-tile definition (below) on the waves of many plans, windows and strategies, and on waves whose keys come
out of order (gathered calls).

A call's sequences are the tiles of one window in query order, with the rows between them (no keys), the keys
skipped between them when keys come in order (no rows), and the rows left to the end of the wave's query hull."""

from __future__ import annotations

import random

import pytest

import ringpack
from ringpack.backends.varlen import VarlenGroup, varlen_groups
from ringpack.schedule import Wave, tile


def tile_by_tile(wave: Wave) -> tuple[VarlenGroup, ...]:
    by_window: dict = {}
    for t in wave.tiles:
        by_window.setdefault((t.left, t.right), []).append(t)
    out = []
    for tiles in by_window.values():
        tiles = sorted(tiles, key=lambda t: t.q_start)
        in_order = all(a.k_start + a.k_len <= b.k_start for a, b in zip(tiles, tiles[1:]))
        q_lens, k_lens, q_pos, k_pos = [], [], wave.q_span[0], tiles[0].k_start
        for t in tiles:
            if t.q_start > q_pos:
                q_lens.append(t.q_start - q_pos)
                k_lens.append(0)
            if in_order and t.k_start > k_pos:
                q_lens.append(0)
                k_lens.append(t.k_start - k_pos)
            q_lens.append(t.q_len)
            k_lens.append(t.k_len)
            q_pos, k_pos = t.q_start + t.q_len, t.k_start + t.k_len
        if wave.q_span[1] > q_pos:
            q_lens.append(wave.q_span[1] - q_pos)
            k_lens.append(0)
        runs = None if in_order else tuple((t.k_start - wave.k_span[0], t.k_len) for t in tiles)
        out.append(VarlenGroup(tiles[0].left, tiles[0].right, tuple(q_lens), tuple(k_lens),
                               tiles[0].k_start - wave.k_span[0], runs))
    return tuple(out)


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (9, -1)), (False, (6, 4))])
def test_groups_of_plan_waves_are_the_tile_by_tile_layout(causal, window):
    rng = random.Random(1)
    waves = 0
    for _ in range(40):
        lengths = [rng.choice((0, 1, 3, 8, 30, 77, 200)) for _ in range(rng.randint(1, 9))]
        plan = ringpack.make_plan(ringpack.lengths_to_cu_seqlens(lengths), rng.randint(1, 6),
                                  strategy=rng.choice(ringpack.STRATEGIES), causal=causal, window_size=window)
        for steps in plan.steps:
            for step in steps:
                for wave in step.waves:
                    assert varlen_groups(wave) == tile_by_tile(wave), wave.tiles
                    waves += 1
    assert waves > 200


def test_groups_with_keys_out_of_order_and_several_windows():
    """Tiles of one window whose keys go back (a gathered call) next to another window's, in shuffled order."""
    rng = random.Random(2)
    for _ in range(200):
        tiles, q = [], rng.randint(0, 5)
        for _ in range(rng.randint(1, 12)):
            q_len, k_len = rng.randint(1, 6), rng.randint(1, 6)
            full = rng.random() < 0.5
            lo, hi = (1 - q_len, k_len - 1) if full else (k_len - q_len - 1, k_len - q_len)
            lo, hi = max(lo, 1 - q_len), min(hi, k_len - 1)
            tiles.append(tile(q, q_len, rng.randint(0, 20), k_len, lo, hi))
            q += q_len + rng.choice((0, 0, 3))
        rng.shuffle(tiles)
        wave = Wave.of(tuple(tiles))
        assert varlen_groups(wave) == tile_by_tile(wave)
