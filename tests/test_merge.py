"""The fp32/fp64 merge of partial (out, lse).

Catches: a merge that is not exact (splitting the keys of a row in two must give the same result
as attending to all of them, to float64 rounding: 1e-13); NaN from rows that have seen no key
(lse = -inf on one or both sides); NaN or Inf in inputs being hidden instead of propagated.
"""

import torch

from ringpack.merge import merge_


def _attend(q, k, v):
    s = torch.einsum("thd,shd->hts", q, k)
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("hts,shd->thd", torch.softmax(s, dim=-1), v), lse


def test_merge_of_split_keys_equals_attention_over_all_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(9, 3, 4, dtype=torch.float64), \
        torch.randn(9, 3, 4, dtype=torch.float64)
    want_out, want_lse = _attend(q, k, v)
    out, lse = torch.zeros(5, 3, 4, dtype=torch.float64), torch.full((3, 5), float("-inf"), dtype=torch.float64)
    for part in (slice(0, 2), slice(2, 7), slice(7, 9)):
        merge_(out, lse, *_attend(q, k[part], v[part]))
    assert (out - want_out).abs().max() < 1e-13
    assert (lse - want_lse).abs().max() < 1e-13


def test_rows_without_keys_never_make_nan():
    out = torch.zeros(2, 1, 3)
    lse = torch.full((1, 2), float("-inf"))
    part_out = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]])
    part_lse = torch.tensor([[0.5, float("-inf")]])
    merge_(out, lse, part_out, part_lse)
    assert torch.equal(out, part_out)
    assert lse[0, 0] == 0.5 and lse[0, 1] == float("-inf")
    merge_(out, lse, torch.zeros(2, 1, 3), torch.full((1, 2), float("-inf")))
    assert torch.equal(out, part_out) and not torch.isnan(lse).any()


def test_merge_into_row_slices_of_accumulators():
    """The ring merges into views (rows of a wave's span); strided lse views must work."""
    torch.manual_seed(1)
    out, lse = torch.zeros(6, 2, 3), torch.full((2, 6), float("-inf"))
    part_out, part_lse = torch.randn(3, 2, 3), torch.randn(2, 3)
    merge_(out[2:5], lse[:, 2:5], part_out, part_lse)
    assert torch.equal(out[2:5], part_out) and torch.equal(lse[:, 2:5], part_lse)
    assert (out[:2] == 0).all() and (lse[:, 5] == float("-inf")).all()


def test_nan_and_inf_inputs_propagate():
    out, lse = torch.ones(1, 1, 2), torch.zeros(1, 1)
    merge_(out, lse, torch.tensor([[[float("nan"), 1.0]]]), torch.zeros(1, 1))
    assert torch.isnan(out[0, 0, 0])
    out, lse = torch.ones(1, 1, 2), torch.zeros(1, 1)
    merge_(out, lse, torch.ones(1, 1, 2), torch.tensor([[float("inf")]]))
    assert not torch.isfinite(out).all() or not torch.isfinite(lse).all()
