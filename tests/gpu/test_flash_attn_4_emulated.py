"""The flash_attn_4 backend's host side, checked exactly on the CPU with float64 emulations of FlashAttention-4's
two entry points (``emulation.fa4_fwd``/``fa4_bwd``: its varlen contract as measured on an H200, lse -inf for rows
that see no key, ``None`` for an unbounded window side, the lse gradient taken natively, dk/dv the kernel allocates
holding garbage where no query reads a key).

Any slip in ringpack's side (a window side passed as -1, the lse gradient dropped, a key buffer not zeroed, a
gathered key run misplaced) is an O(1) error or a NaN, so float64 results must match the float64 reference to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from emulation import MASKS, MIXES, check_release_refusals, check_ring, fa4_bwd, fa4_fwd

from ringpack.backends import AttnSpec, flash_attn_4
from ringpack.backends.flash_attn_4 import FlashAttn4Backend


def _fa4(fwd=fa4_fwd, bwd=fa4_bwd):
    return FlashAttn4Backend(fwd, bwd)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["balanced", "zigzag", "contiguous"])
@pytest.mark.parametrize("causal,window", MASKS)
def test_flash_attn_4_through_the_ring_exact(world, strategy, causal, window):
    """Every strategy and mask at world 1-3, GQA and MQA, with the lse gradient, with and without softcap."""
    for lengths, (h, hk), softcap in zip(MIXES, ((4, 2), (4, 1)), (0.0, 5.0)):
        check_ring(_fa4(), lengths, world, strategy, causal, window, h, hk, softcap=softcap)


def test_window_with_more_queries_than_keys():
    """The shape that caught FA2's window rewriting: FA4 takes the raw window, nothing to work around."""
    check_ring(_fa4(), (300, 40, 7), 3, "contiguous", True, (100, -1), softcap=2.0)


@pytest.mark.parametrize("mutation", ["minus_one_side", "no_dlse", "unzeroed_keys"])
def test_mutations_fail(monkeypatch, mutation):
    """The emulation and the checks catch each of these slips of the backend (so the exact tests above mean it)."""
    if mutation == "minus_one_side":  # -1 passed for an unbounded side: FA4 would read it as a bound
        monkeypatch.setattr(flash_attn_4, "_side", lambda w: w)
        lengths, mask = (97, 31, 64), (True, (9, -1))
    elif mutation == "no_dlse":
        def bwd(*args, **kwargs):
            return fa4_bwd(*args, **{**kwargs, "dlse": None})
        backend, lengths, mask = _fa4(bwd=bwd), (97, 31, 64), (True, (-1, -1))
    else:  # dk/dv left to the kernel where a call has keys no query reads
        monkeypatch.setattr(flash_attn_4, "_key_grads", lambda k, v, g: (None, None))
        lengths, mask = (0, 1, 7, 97, 31, 0, 13, 64), (False, (6, 4))
    backend = backend if mutation == "no_dlse" else _fa4()
    with pytest.raises((AssertionError, RuntimeError)):  # a wrong result, or a rank thread's assertion
        for world in (2, 3):
            check_ring(backend, lengths, world, "zigzag", *mask)


def test_declines_missing_or_unsupported_package(monkeypatch):
    """Not installed, a release outside the pinned range, or a function without the keywords ringpack passes: each
    is a reason naming what was found and what is supported, never a call with other arguments."""
    check_release_refusals(monkeypatch, flash_attn_4.find_kernels, "flash-attn-4", "fa4", flash_attn_4.SUPPORTED,
                           ("4.0.0b20", "4.1.0", "3.0.0"))

    def moved(q, k, v, cu_seqlens_q=None, softmax_scale=None):
        return q

    why = flash_attn_4._signature_problem(moved, flash_attn_4.FWD_KEYWORDS)
    assert "takes (q, k, v, cu_seqlens_q, softmax_scale)" in why and "missing cu_seqlens_k" in why


def test_not_looked_up_for_cpu_requests(monkeypatch):
    """A CPU request must not import the CuTe DSL (slow; a broken install would fail a CPU job)."""
    calls = []
    monkeypatch.setattr(flash_attn_4, "load_kernels", lambda: calls.append(1) or (None, None, "x"))
    spec = AttnSpec("cpu", torch.float64, 16, 4, 2, True, False, False, False)
    assert FlashAttn4Backend().not_supported_reasons(spec) and not calls


def test_torch_flash_declines_when_torch_routes_its_kernels_to_another_implementation(monkeypatch):
    """``torch.nn.attention.activate_flash_attention_impl("FA4")`` swaps aten's FA2 kernels for FA4 behind the same
    op names (on torch 2.11 it then fails with "too many values to unpack"): torch_flash must decline with a reason
    that says so, and auto then runs without it."""
    from ringpack.backends.torch_flash import TorchFlashBackend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.attention, "current_flash_attention_impl", lambda: "FA4", raising=False)
    spec = AttnSpec("cuda", torch.bfloat16, 128, 8, 2, True, False, False, False)
    why = TorchFlashBackend().not_supported_reasons(spec)
    assert any("activate_flash_attention_impl('FA4')" in w and "flash_attn_4" in w for w in why)


def test_auto_rules_follow_the_measured_classes():
    """With FlashAttention-4 there it takes every tile (it measured faster than cuDNN on every class); without it,
    cuDNN takes every dense tile from 2048 x 2048 and FA2 the rest. (A rule table keyed to the wrong general backend
    would send dense tiles to cuDNN next to FA4, or 32k causal squares to FA2 without it.)"""
    from emulation import cudnn_bwd, cudnn_fwd, flash_bwd, flash_fwd

    from ringpack.backends.auto import AutoBackend
    from ringpack.backends.cudnn import CudnnBackend
    from ringpack.backends.torch_flash import TorchFlashBackend
    from ringpack.schedule import band_tile
    cudnn, flash = CudnnBackend(cudnn_fwd, cudnn_bwd), TorchFlashBackend(flash_fwd, flash_bwd)
    with_fa4, without = AutoBackend([cudnn, _fa4(), flash]), AutoBackend([cudnn, flash])
    causal_32k, causal_8k = band_tile(0, 32768, 0, 32768, -10 ** 9, 0), band_tile(0, 8192, 0, 8192, -10 ** 9, 0)
    full = band_tile(0, 4096, 0, 8192, -10 ** 9, 10 ** 9)
    window = band_tile(0, 8192, 0, 8192, -4096, 0)
    small = band_tile(0, 512, 0, 512, -10 ** 9, 0)
    assert [with_fa4.backend_for(t).name for t in (causal_32k, causal_8k, full, window, small)] == [
        "flash_attn_4"] * 5
    assert [without.backend_for(t).name for t in (causal_32k, causal_8k, full, window, small)] == [
        "cudnn", "cudnn", "cudnn", "torch_flash", "torch_flash"]
    assert [b.name for b in with_fa4.backends] == ["flash_attn_4"], "cuDNN and FA2 next to FA4 can get no tile"
