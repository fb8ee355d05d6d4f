"""``ringpack.warmup`` runs every class of tile a mask can produce, at every size kernels specialise on, so that no
packing compiles a kernel later.

A kernel that compiles per tile class (FlashAttention-4: mask kind and window sides; flex) would otherwise compile in
the first batch that holds a new class, mid-training. The classes here are what such kernels specialise on: full,
plain causal, and a band bounded on the left, on the right, or both; and FA4 also specialises on a call that fits one
block of rows or keys, and on calls of more than 256 sequences (seen on an H200: a warmup without these left kernels
to compile). Checked against the tiles of many random packings, strategies and world sizes of the same mask (the GPU
test counts FA4's compiled kernels directly).
"""

from __future__ import annotations

import random

import pytest
import torch

import ringpack
from ringpack.backends.reference import ReferenceBackend


def tile_class(tile) -> tuple[bool, bool, bool]:
    return tile.left >= 0, tile.right >= 0, (tile.left, tile.right) == (-1, 0)


class Recording(ReferenceBackend):
    def __init__(self):
        self.classes, self.calls = set(), set()

    def forward(self, q, k, v, wave, **kw):
        self.classes.update(tile_class(t) for t in wave.tiles)
        one_block_q, one_block_k = max(t.q_len for t in wave.tiles) <= 64, max(t.k_len for t in wave.tiles) <= 128
        self.calls.update((tile_class(t), one_block_q, one_block_k, len(wave.tiles) > 256) for t in wave.tiles)
        return super().forward(q, k, v, wave, **kw)


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (7, -1)), (False, (5, 3)),
                                            (True, (0, -1)), (False, (-1, 4))])
def test_warmup_runs_every_tile_class_of_the_mask(causal, window):
    recording = Recording()
    seconds = ringpack.warmup(heads=4, kv_heads=2, head_dim=8, dtype=torch.float64, causal=causal,
                              window_size=window, lse_grad=True, backend=recording, device="cpu")
    assert seconds >= 0
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        lengths = [rng.choice((0, 1, 2, 5, 17, 64, 300)) for _ in range(rng.randint(1, 6))]
        cu = ringpack.lengths_to_cu_seqlens(lengths)
        plan = ringpack.make_plan(cu, rng.randint(1, 5), strategy=rng.choice(ringpack.STRATEGIES), causal=causal,
                                  window_size=window)
        seen.update(tile_class(t) for steps in plan.steps for step in steps for t in step.tiles)
    assert seen <= recording.classes, f"classes no warmup ran: {seen - recording.classes}"
    for kind in recording.classes:  # each class alone in one block and in many, and in a call of many sequences
        assert (kind, False, False, False) in recording.calls and (kind, True, True, True) in recording.calls, kind


def test_warmup_refuses_bad_arguments():
    with pytest.raises(ValueError, match="heads \\(4\\) must be a multiple of kv_heads \\(3\\)"):
        ringpack.warmup(heads=4, kv_heads=3, head_dim=8, device="cpu")
    with pytest.raises(ValueError, match="causal must be True or False"):
        ringpack.warmup(heads=4, kv_heads=2, head_dim=8, causal="yes", device="cpu")
