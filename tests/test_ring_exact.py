"""Ring attention in float64 against the single-process float64 reference, world sizes 1 to 4.

Catches any error in the plan (a missing or doubled pair), the band masks at document offsets,
the merge, the KV ring (a block used at the wrong step), the dK/dV return trip, the use of final
(out, lse) in the backward, GQA/MQA head grouping, and the lse gradient. The merge is exact, so
the only difference is float64 rounding (~1e-15); the bound 1e-10 leaves room for sums over a few
hundred keys and nothing more.
"""

import itertools

import pytest
from dist_utils import run_distributed

from ringpack import STRATEGIES
from ringpack.checking import Case, default_cases, run_case

MIXES = {
    "zero-one-primes": (0, 1, 2, 3, 5, 7, 0, 11, 13, 17, 0),
    "one-long": (127, 3, 1, 5),
    "many-tiny": (2,) * 24 + (1,) * 5 + (3,),
    "prime-doc": (61,),
}
MASKS = {
    "causal": (True, (-1, -1)),
    "full": (False, (-1, -1)),
    "causal-w5": (True, (5, -1)),
    "full-w5": (False, (5, -1)),
    "causal-w4,2": (True, (4, 2)),
    "full-w3,6": (False, (3, 6)),
}
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (6, 1)}


def _cases():
    cases = {}
    for strategy, (mask_i, mask) in itertools.product(STRATEGIES, enumerate(MASKS)):
        causal, window = MASKS[mask]
        for mix_i, mix in enumerate(MIXES):
            head = list(HEADS)[(mask_i + mix_i) % len(HEADS)]  # every (mask, heads) and (mix, heads) pair occurs
            h, hk = HEADS[head]
            name = f"{strategy}-{mask}-{mix}-{head}"
            cases[name] = Case(lengths=MIXES[mix], strategy=strategy, causal=causal, window_size=window,
                               heads=h, kv_heads=hk, head_dim=8, name=name)
    cases["softcap"] = Case(lengths=(40, 9, 1), softcap=3.0, heads=4, kv_heads=2, head_dim=8, name="softcap")
    return cases


CASES = _cases()


def _run_all(cases):
    return {name: run_case(case, seed=i) for i, (name, case) in enumerate(cases.items())}


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"world{w}")
def results(request):
    return request.param, run_distributed(request.param, _run_all, CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_ring_matches_reference(results, name):
    world, by_name = results
    result = by_name[name]
    for tensor, err in result.errors.items():
        assert err <= 1e-10, f"world {world} {name}: max |{tensor} - reference| = {err:.3e}"
    assert set(result.errors) == {"out", "lse", "dq", "dk", "dv"}


def _default_suite():
    return {case.label: run_case(case, single_device=False).errors for case in default_cases(8)}


def test_eight_ranks_run_the_check_suite_exactly():
    """Eight ranks, more than the cores CI has: every strategy, mask and head layout of ``check``'s suite.

    Catches what only a longer ring shows: exchanges shifted by up to 7 ranks, documents cut into 16
    zigzag chunks (most of them empty or one token long), windows reaching past several ranks."""
    by_label = run_distributed(8, _default_suite)
    assert len(by_label) == len(default_cases(8))
    for label, errors in by_label.items():
        assert max(errors.values()) <= 1e-10, f"world 8 {label}: {errors}"
