"""``ringpack.warmup`` runs every class of tile a mask can produce, at every size kernels specialise on, so that no
packing compiles a kernel later.

A kernel that compiles per tile class (FlashAttention-4: mask kind and window sides; flex) would otherwise compile in
the first batch that holds a new class, mid-training. The classes here are what such kernels specialise on: full,
plain causal, and a band bounded on the left, on the right, or both; and FA4 also specialises on a call that fits one
block of rows or keys (counting the rows and keys between a call's tiles), and on calls of more than 256 sequences
(seen on an H200: a warmup without these left kernels to compile, the last one a causal call of one block of keys
and many of rows). Checked against the tiles of many random packings, strategies
and world sizes of the same mask (the GPU test counts FA4's compiled kernels directly).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import ringpack
from ringpack.backends.reference import ReferenceBackend
from ringpack.backends.varlen import varlen_groups


def tile_class(tile) -> tuple[bool, bool, bool]:
    return tile.left >= 0, tile.right >= 0, (tile.left, tile.right) == (-1, 0)


class Recording(ReferenceBackend):
    """Records, per varlen call a wave makes, its tile class, whether its longest sequences of rows and of keys fit
    one 128-block (rows or keys between its tiles count: they are sequences of the call), and > 256 sequences."""

    def __init__(self):
        self.classes, self.calls = set(), set()

    def forward(self, q, k, v, wave, **kw):
        for group in varlen_groups(wave):
            kind = tile_class(next(t for t in wave.tiles if (t.left, t.right) == (group.left, group.right)))
            self.classes.add(kind)
            self.calls.add((kind, group.max_q <= 128, group.max_k <= 128, len(group.q_lens) > 256))
        return iter(())  # what is run is all this test asks (the reference kernel's numbers have their own tests)

    def backward(self, *args, **kw):
        return iter(())


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
    for kind in recording.classes:  # every class in calls of one block or many, of rows and of keys, few or many
        for call in itertools.product([kind], (False, True), (False, True), (False, True)):
            assert call in recording.calls, call


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (7, -1)), (False, (5, 3)),
                                            (False, (-1, 4)), (False, (4, -1))])
def test_mask_classes_are_what_the_band_allows(causal, window):
    """A bounded left side needs a window's left edge; a bounded right side a causal mask or a right edge."""
    from ringpack.warmup import mask_classes
    classes = mask_classes(causal, window)
    assert all(left <= (window[0] >= 0) and (right < 0 or causal or window[1] >= 0) for left, right in classes)
    assert len(classes) == (2 if window[0] >= 0 else 1) * (3 if causal or window[1] >= 0 else 1)


def test_warmup_refuses_bad_arguments():
    with pytest.raises(ValueError, match="heads \\(4\\) must be a multiple of kv_heads \\(3\\)"):
        ringpack.warmup(heads=4, kv_heads=3, head_dim=8, device="cpu")
    with pytest.raises(ValueError, match="causal must be True or False"):
        ringpack.warmup(heads=4, kv_heads=2, head_dim=8, causal="yes", device="cpu")
