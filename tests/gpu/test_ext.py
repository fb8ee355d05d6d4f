"""The fused kernels on the GPU, the CUDA extension's (built) and Triton's (no build), against their torch
fallbacks, and the extension's input checks.

The fused merge must agree with the torch merge to fp32 rounding (a few ulps of the largest value,
bound 1e-5 on O(1) data): a wrong stride, a dropped -inf guard or a swapped weight is O(1) off.
Skipped without CUDA, and each kernel without the built extension or without Triton.
"""

from __future__ import annotations

import pytest
import torch

from ringpack import _ext, _triton, merge

needs_ext = pytest.mark.skipif(not _ext.available(), reason="ringpack._C is not built")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MERGES = [pytest.param(_ext.merge_, id="ext", marks=needs_ext),
          pytest.param(_triton.merge_, id="triton",
                       marks=pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed"))]


def _torch_merge(out_acc, lse_acc, out, lse):
    """merge.merge_'s torch path, forced (CPU copies), moved back to the device."""
    a, la = out_acc.cpu(), lse_acc.cpu()
    merge.merge_(a, la, out.cpu(), lse.cpu())
    return a.to(out_acc.device), la.to(out_acc.device)


@pytest.mark.parametrize("fused", MERGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,heads,dim", [(1, 1, 8), (97, 4, 64), (1025, 8, 128), (33, 3, 100)])
def test_merge_matches_torch(fused, dtype, rows, heads, dim):
    """Row slices of accumulators and ``[:, a:b]`` lse views, -inf on either side or both."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    acc_full = torch.randn(rows + 10, heads, dim, device="cuda", generator=g)
    lse_full = torch.randn(heads, rows + 20, device="cuda", generator=g)
    out_acc, lse_acc = acc_full[5:5 + rows], lse_full[:, 7:7 + rows]
    out = torch.randn(rows, heads, dim, device="cuda", generator=g).to(dtype)
    lse = torch.randn(heads, rows, device="cuda", generator=g)
    lse_acc[0, : rows // 2] = float("-inf")
    lse[0, rows // 4:] = float("-inf")
    out_acc[: rows // 2, 0] = 0  # a row that has seen nothing holds 0
    want_out, want_lse = _torch_merge(out_acc.clone(), lse_acc.clone(), out, lse)
    assert fused(out_acc, lse_acc, out, lse)
    assert torch.equal(torch.isinf(lse_acc), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert (lse_acc[finite] - want_lse[finite]).abs().max() <= 1e-5
    assert (out_acc - want_out).abs().max() <= 1e-5
    assert torch.isfinite(out_acc).all()


@pytest.mark.parametrize("fused", MERGES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_into_16_bit_accumulator_rounds_once(fused, dtype):
    """A row's last merge into a 16-bit accumulator: bit for bit the fp32 accumulator's result, rounded."""
    g = torch.Generator(device="cuda").manual_seed(1)
    first, out = (torch.randn(300, 8, 128, device="cuda", generator=g).to(dtype) for _ in range(2))
    lse_first, lse = (torch.randn(8, 300, device="cuda", generator=g) for _ in range(2))
    lse_first[0, :50] = float("-inf")
    lse[1, 30:90] = float("-inf")
    acc32, lse32 = first.float(), lse_first.clone()
    assert fused(acc32, lse32, out, lse)
    acc16, lse16 = first.clone(), lse_first.clone()
    assert fused(acc16[:, :], lse16, out, lse)
    assert torch.equal(acc16, acc32.to(dtype)) and torch.equal(lse16, lse32)


@needs_ext
def test_merge_refuses_an_accumulator_of_another_16_bit_type():
    out, acc = torch.zeros(4, 2, 8, device="cuda", dtype=torch.bfloat16), torch.zeros(4, 2, 8, device="cuda").half()
    lse = torch.zeros(2, 4, device="cuda")
    with pytest.raises(ValueError, match="float32 or out's dtype"):
        _ext.merge_cuda(acc, lse, out, lse)
    assert not _triton.merge_(acc, lse, out, lse)


@needs_ext
def test_merge_checks_inputs():
    """Each broken constraint is named, not silently computed."""
    acc = torch.zeros(4, 2, 8, device="cuda")
    lse = torch.zeros(2, 4, device="cuda")
    with pytest.raises(ValueError, match="same shape"):
        _ext.merge_cuda(acc, lse, torch.zeros(3, 2, 8, device="cuda"), lse)
    with pytest.raises(ValueError, match="must be float32"):
        _ext.merge_cuda(acc.double(), lse, acc, lse)
    with pytest.raises(ValueError, match="unit stride"):
        _ext.merge_cuda(torch.zeros(4, 2, 16, device="cuda")[..., ::2], lse, acc, lse)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _ext.merge_cuda(acc.cpu(), lse, acc, lse)
    assert not _ext.merge_(acc.double(), lse.double(), acc, lse)  # fp64 takes the torch path


@needs_ext
@pytest.mark.parametrize("dtype,tail", [(torch.bfloat16, (8, 128)), (torch.float32, (3,)), (torch.uint8, (5,))])
def test_copy_runs_matches_slices(dtype, tail):
    """Gather/scatter of row runs in one launch equals one slice copy per run (aligned and unaligned rows)."""
    src = torch.arange(300 * int(torch.tensor(tail).prod()), device="cuda").reshape(300, *tail).to(dtype)
    runs = [(0, 1, 250), (5, 97, 10), (200, 100, 107), (150, 3, 207)]
    want = torch.zeros(300, *tail, dtype=dtype, device="cuda")
    for s, n, d in runs:
        want[d:d + n] = src[s:s + n]
    got = torch.zeros_like(want)
    _ext.copy_runs(got, src, runs)
    assert torch.equal(got, want)


@pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("dtype,tail", [(torch.bfloat16, (8, 128)), (torch.float32, (3,)), (torch.int64, (5,))])
def test_triton_gather_matches_cat(dtype, tail):
    src = torch.arange(300 * int(torch.tensor(tail).prod()), device="cuda").reshape(300, *tail).to(dtype)
    runs = [(250, 1), (5, 97), (200, 100), (150, 3), (5, 97)]
    got = _triton.gather_rows(src, runs, 298)
    assert torch.equal(got, torch.cat([src[a:a + n] for a, n in runs]))


@needs_ext
def test_copy_runs_checks_inputs():
    """Each broken constraint is named, not silently computed."""
    src = torch.zeros(10, 4, device="cuda")
    for dst, runs, match in ((src.half(), [(0, 1, 0)], "share a dtype"),
                             (torch.zeros(10, 5, device="cuda"), [(0, 1, 0)], "same shape after dim 0"),
                             (src, [(8, 5, 0)], "outside src rows")):
        with pytest.raises(ValueError, match=match):
            _ext.copy_runs(dst, src, runs)
