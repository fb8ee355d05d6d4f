"""The torch_flash and cudnn backends' host logic, checked exactly on the CPU with float64 kernel emulations.

The kernels are replaced by float64 emulations of their documented contracts (``emulation.py``); what
is tested is ringpack's side: trimming bands to windows, cutting waves into varlen calls, gathering
overlapping keys, combining calls, scattering key gradients, the lse-gradient shift, and ``auto``'s
per-tile split. Any slip there is an O(1) error, so float64 results must match the float64 reference
to 1e-10 (the merge is exact; only rounding remains).
"""

from __future__ import annotations

import pytest
import torch
from emulation import (
    MASKS,
    MIXES,
    ThreadRing,
    check_release_refusals,
    check_ring,
    cudnn_bwd,
    cudnn_fwd,
    flash_attn_varlen_bwd,
    flash_attn_varlen_fwd,
    flash_bwd,
    flash_fwd,
    ring_in_threads,
)

from ringpack.backends.auto import AutoBackend, Rule
from ringpack.backends.cudnn import CudnnBackend
from ringpack.backends.torch_flash import TorchFlashBackend
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import make_plan


def _flash(fwd=flash_fwd, bwd=flash_bwd):
    return TorchFlashBackend(fwd, bwd)


def _cudnn(fwd=cudnn_fwd, bwd=cudnn_bwd):
    return CudnnBackend(fwd, bwd)


def _auto(min_dense_pairs: int, *backends):
    """auto over emulated kernels, with dense tiles of at least ``min_dense_pairs`` cells given to cudnn."""
    return AutoBackend(list(backends) or [_cudnn(), _flash()], rules=(Rule("cudnn", "dense",
                                                                             min_area=min_dense_pairs),))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", ["balanced", "zigzag", "contiguous"])
@pytest.mark.parametrize("causal,window", MASKS)
def test_torch_flash_layout_exact(world, strategy, causal, window):
    """Catches a wrong band -> (left, right) mapping, a gap row computed, a lost or doubled key run."""
    for lengths, (h, hk) in zip(MIXES, ((4, 2), (4, 1))):
        check_ring(_flash(), lengths, world, strategy, causal, window, h, hk)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("strategy", ["balanced", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_dense_tiles_exact(world, strategy, causal):
    """Catches cuDNN's top-left causal used on a non-square tile, and a wrong per-tile placement."""
    check_ring(_cudnn(), (211, 64, 12), world, strategy, causal, (-1, -1))  # no 1 x 1 tile


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["balanced", "zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_batches_equal_tiles_exact(world, strategy, causal):
    """Equal documents run as one [B, H, S, D] call: catches a batch laid out across documents, not along them."""
    check_ring(_cudnn(), (40,) * 5 + (17, 40, 40, 9), world, strategy, causal, (-1, -1), tol=1e-10)


def test_cudnn_one_call_per_run_of_equal_tiles():
    """Five equal documents, a shorter one, two equal again: three calls forward and three backward."""
    calls = []
    b = _cudnn(lambda q, *a, **kw: calls.append(("fwd", q.shape[0])) or cudnn_fwd(q, *a, **kw),
               lambda dout, *a, **kw: calls.append(("bwd", dout.shape[0])) or cudnn_bwd(dout, *a, **kw))
    check_ring(b, (40,) * 5 + (17, 40, 40), 1, "contiguous", True, (-1, -1))
    assert calls == [("fwd", 5), ("fwd", 1), ("fwd", 2), ("bwd", 5), ("bwd", 1), ("bwd", 2)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_auto_split_exact(world, causal):
    """auto sends big dense tiles to cudnn and the rest to torch_flash in one wave: the combine must be exact."""
    auto = _auto(30 * 30)
    check_ring(auto, (211, 13, 97, 1, 40), world, "balanced", causal, (-1, -1))


def test_lse_gradient_off():
    """Without an lse gradient the backward must not shift ``out`` (catches a None dlse mishandled)."""
    check_ring(_flash(), (97, 31), 2, "balanced", True, (-1, -1), lse_grad=False)


def test_cudnn_rejects_band_tile():
    """A windowed tile named for cudnn must raise, never run with the wrong (top-left) mask."""
    plan = make_plan([0, 50], 1, causal=True, window_size=(5, -1))
    q = torch.zeros(50, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="neither full nor square causal"):
        list(_cudnn().forward(q, q, q, plan.steps[0][0].waves[0], scale=1.0, softcap=0.0))


def _flex_eager():
    from torch.nn.attention.flex_attention import flex_attention

    from ringpack.backends.flex import FlexBackend
    return FlexBackend(flex_attention)  # the unfused eager path: same mask and lse logic, no compiler needed


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("strategy", ["balanced", "contiguous"])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (6, 4))])
def test_flex_block_mask_exact(world, strategy, causal, window):
    """Catches a wrong row bound in flex's mask (forward: flex has no CPU backward; the GPU tests cover it).

    Flex returns its lse through float32 even for float64 inputs, and the merge weights come from the
    lse, so the bound is float32's (1e-5 on values of a few units); a mask error is O(1).
    """
    check_ring(_flex_eager(), (0, 1, 7, 97, 31, 0, 13, 64), world, strategy, causal, window, backward=False,
           tol=1e-5)


def test_flex_block_tables_cover_every_visible_block():
    """Blocks marked full must be fully visible; every block with a visible pair must be marked (full or partial)."""
    from ringpack.backends.flex import BLOCK, block_tables, row_bounds
    plan = make_plan(lengths_to_cu_seqlens((300, 5, 700)), 2, causal=True, window_size=(200, -1))
    for rank_steps in plan.steps:
        for step in rank_steps:
            for wave in step.waves:
                lo, hi = row_bounds(wave)
                n_k = wave.k_span[1] - wave.k_span[0]
                kv = torch.arange(n_k)
                visible = (kv[None] >= lo[:, None]) & (kv[None] <= hi[:, None])
                count, idx, full_count, full_idx = block_tables(lo, hi, n_k)
                nq, nk = -(-lo.shape[0] // BLOCK), -(-n_k // BLOCK)
                pad = torch.zeros(nq * BLOCK, nk * BLOCK, dtype=torch.bool)
                pad[:visible.shape[0], :n_k] = visible
                blocks = pad.view(nq, BLOCK, nk, BLOCK)
                for i in range(nq):
                    marked = set(idx[0, 0, i, :count[0, 0, i]].tolist())
                    full = set(full_idx[0, 0, i, :full_count[0, 0, i]].tolist())
                    assert not marked & full
                    for j in range(nk):
                        if blocks[i, :, j].any():
                            assert j in marked | full, (i, j)
                        if j in full:
                            assert blocks[i, :, j].all(), (i, j)


def test_trimmed_tile_window_is_the_band():
    """Every band, trimmed at plan time, is exactly its band as a bottom-right (left, right) window, with its
    pairs counted: the kernels read the window and never re-derive it (catches a window off by the trim)."""
    import random

    from ringpack.schedule import band_tile
    rng = random.Random(0)
    for _ in range(2000):
        q_len, k_len = rng.randint(1, 12), rng.randint(1, 12)
        lo = rng.randint(-14, 12)
        hi = rng.randint(lo, 14)
        d = torch.arange(k_len)[None] - torch.arange(q_len)[:, None]
        band = (d >= lo) & (d <= hi)
        kt = band_tile(3, q_len, 5, k_len, lo, hi)
        if not band.any():
            assert kt is None
            continue
        got = torch.zeros(q_len, k_len, dtype=torch.bool)
        shift = kt.k_len - kt.q_len
        dd = torch.arange(kt.k_len)[None] - torch.arange(kt.q_len)[:, None]
        win = torch.ones(kt.q_len, kt.k_len, dtype=torch.bool)
        if kt.left >= 0:
            win &= dd >= shift - kt.left
        if kt.right >= 0:
            win &= dd <= shift + kt.right
        got[kt.q_start - 3:kt.q_start - 3 + kt.q_len, kt.k_start - 5:kt.k_start - 5 + kt.k_len] = win
        assert torch.equal(got, band), (q_len, k_len, lo, hi, kt)
        assert kt.pairs == int(band.sum())


@pytest.mark.parametrize("strategy", ["contiguous", "zigzag", "balanced"])
def test_torch_flash_window_with_more_queries_than_keys(strategy):
    """What the real kernel caught on an H200: a causal window where many queries of a cut document meet few
    keys of the rank before. FA2 reads the unbounded right side as ``max_k``, which hid keys from the first
    rows (out error 0.3 relative); the backend now bounds that side itself."""
    check_ring(_flash(), (300, 40), 2, strategy, True, (100, -1))
    check_ring(_flash(), (300, 40, 7), 3, strategy, True, (100, -1))


def test_cudnn_rejects_one_by_one_tile():
    """cuDNN's backward raises on s_q = s_kv = 1 (measured on an H200): a 1-token document named for cudnn must
    get ringpack's ValueError up front, and auto must never hand it such a tile."""
    plan = make_plan([0, 1], 1, causal=True)
    q = torch.zeros(1, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="1 query x 1 key"):
        list(_cudnn().forward(q, q, q, plan.steps[0][0].waves[0], scale=1.0, softcap=0.0))
    tile = plan.steps[0][0].waves[0].tiles[0]
    assert not _cudnn().runs_tile(tile) and _auto(0).backend_for(tile).name == "torch_flash"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cudnn_key_grads_become_contiguous_rows_bit_for_bit(dtype):
    """A result in [B, Hk, S, D] storage becomes rows in one copy of 8-byte words with the same bits; results already
    laid out as rows stay views."""
    from ringpack.backends.cudnn import _as_NHD, _rows
    for batch in (1, 3):
        x = torch.randn(batch, 2, 40, 16, dtype=torch.float64).to(dtype)  # [B, Hk, S, D] contiguous
        got = _as_NHD(x)
        assert got.is_contiguous() and torch.equal(got, x.transpose(1, 2).reshape(-1, 2, 16))
        rows = torch.randn(batch * 40, 2, 16).to(dtype)  # laid out as rows, like the inputs
        assert _as_NHD(rows.unflatten(0, (batch, 40)).transpose(1, 2)).data_ptr() == rows.data_ptr()
    odd = torch.randn(2, 40, 5, dtype=torch.float64).to(dtype).transpose(0, 1)  # a last dim of 5: no 8-byte words
    assert torch.equal(_rows(odd), odd.contiguous())
    rows = torch.randn(40, 2, 16).to(dtype)
    assert _rows(rows) is rows


def test_flex_declines_softcap_with_its_reason():
    from ringpack.backends import AttnSpec
    from ringpack.backends.flex import FlexBackend
    spec = AttnSpec("cuda", torch.bfloat16, 64, 8, 2, True, False, True, False)
    assert any("softcap" in why for why in FlexBackend().not_supported_reasons(spec))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("world,strategy", [(2, "zigzag"), (2, "balanced"), (3, "zigzag")])
def test_round_once_accumulation_is_bitwise_fp32(monkeypatch, backend, world, strategy):
    """Query and key rows with at most two partial results accumulate in bf16, and such keys' dK/dV travel back
    in bf16: the bits must equal an fp32 accumulator's.

    The reference kernel returns fp32 gradients, which a bf16 accumulator would round twice (catches a ring
    that ignores ``EXACT_16BIT_GRADS``); auto over the 16-bit kernels takes the bf16 path. At world 3 every
    key has three partials: a key depth counted short would round twice there."""
    from ringpack import accumulate
    from ringpack.backends.reference import ReferenceBackend

    def bf16(op, n_grads):  # a 16-bit kernel: float64 inside, 16-bit out/dq/dk/dv and fp32 lse outside
        def run(*args, **kwargs):
            args = [a.double() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            res = list(op(*args, **kwargs))
            if n_grads:
                return tuple(r.bfloat16() for r in res)
            return (res[0].bfloat16(), res[1].float(), *res[2:])
        return run

    impl = ReferenceBackend()
    if backend == "auto":
        cudnn, flash = _cudnn(bf16(cudnn_fwd, 0), bf16(cudnn_bwd, 3)), _flash(bf16(flash_fwd, 0), bf16(flash_bwd, 3))
        impl = _auto(30 * 30, cudnn, flash, ReferenceBackend())  # as select_backend orders them on a GPU
        assert impl.backends == [cudnn, flash], "auto keeps a backend that can never get a tile"
    cu = lengths_to_cu_seqlens((97, 31, 64, 5, 40))
    plan = make_plan(cu, world, strategy=strategy)
    g = torch.Generator().manual_seed(world)
    total = int(cu[-1])
    q, dout = (torch.randn(total, 4, 16, generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(total, 2, 16, generator=g).bfloat16() for _ in range(2))
    dlse = torch.randn(4, total, generator=g)
    returned = []  # dtypes of the dK/dV messages (shifts back, s < 0)
    shift = ThreadRing.shift

    def recording(self, send, s, recv_shape, dtype, device):
        if s < 0:
            returned.append(dtype)
        return shift(self, send, s, recv_shape, dtype, device)

    monkeypatch.setattr(ThreadRing, "shift", recording)
    got = {}
    for depth in (0, accumulate.ROUND_ONCE_DEPTH):
        monkeypatch.setattr(accumulate, "ROUND_ONCE_DEPTH", depth)
        returned.clear()
        got[depth] = ring_in_threads(plan, impl, q, k, v, dout, dlse, scale=0.25)
    assert max(plan.query_depth) == max(plan.key_depth) == world
    # two partials per key: 16-bit messages (half the bytes) from 16-bit kernels; three: fp32
    assert set(returned) == {torch.bfloat16 if world == 2 and backend == "auto" else torch.float32}
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got[2], got[0]):
        assert torch.equal(a, b), f"{name} differs from the fp32 accumulator's"


def _flash_attn():
    from ringpack.backends.flash_attn import FlashAttnBackend
    return FlashAttnBackend(flash_attn_varlen_fwd, flash_attn_varlen_bwd)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["balanced", "zigzag", "contiguous"])
@pytest.mark.parametrize("causal,window", MASKS)
def test_flash_attn_layout_exact(world, strategy, causal, window):
    """flash_attn through float64 emulations of flash-attn's registered ops, with and without softcap: catches
    arguments passed in the wrong positions of the op schema, a softcap lost on its way to the kernel (forward or
    backward), and dq/dk/dv buffers the op is not given to write into."""
    for lengths, (h, hk), softcap in zip(MIXES, ((4, 2), (4, 1)), (0.0, 5.0)):
        check_ring(_flash_attn(), lengths, world, strategy, causal, window, h, hk, softcap=softcap)


def test_flash_attn_window_with_more_queries_than_keys():
    """The FA2 host-side window normalisation lives in flash-attn's kernels too (see the torch_flash test)."""
    check_ring(_flash_attn(), (300, 40, 7), 3, "contiguous", True, (100, -1), softcap=2.0)


def test_flash_attn_takes_softcap_that_torch_flash_declines(monkeypatch):
    """With CUDA and the ops present, flash_attn accepts a softcap request; torch_flash and cudnn decline it."""
    from ringpack.backends import AttnSpec
    from ringpack.backends.cudnn import CudnnBackend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = AttnSpec("cuda", torch.bfloat16, 128, 8, 2, True, True, True, True)
    assert _flash_attn().not_supported_reasons(spec) == []
    assert any("softcap" in why for why in TorchFlashBackend().not_supported_reasons(spec))
    assert any("softcap" in why for why in CudnnBackend().not_supported_reasons(spec))


def test_flash_attn_declines_missing_or_unsupported_package(monkeypatch):
    """Not installed, a release outside the pinned range, or an op whose schema changed: each is a reason
    naming what was found and what is supported, never a call with shifted arguments."""
    from ringpack.backends import flash_attn
    check_release_refusals(monkeypatch, flash_attn.find_ops, "flash-attn", "flash", flash_attn.SUPPORTED,
                           ("2.6.3", "3.0.0b1", "2.10.1"))

    @torch.library.custom_op("ringpack_test::varlen_fwd_moved", mutates_args=())
    def moved(q: torch.Tensor, k: torch.Tensor, softmax_scale: float, cu_seqlens_q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    why = flash_attn._schema_problem(torch.ops.ringpack_test.varlen_fwd_moved, flash_attn.FWD_ARGS)
    assert "takes (q, k, softmax_scale, cu_seqlens_q)" in why and "cu_seqlens_q, cu_seqlens_k" in why


def test_flash_attn_is_not_imported_for_cpu_requests(monkeypatch):
    """A CPU request must not import flash-attn (slow, and a broken build would fail a CPU job)."""
    from ringpack.backends import AttnSpec, flash_attn
    calls = []
    monkeypatch.setattr(flash_attn, "load_ops", lambda: calls.append(1) or (None, None, "x"))
    spec = AttnSpec("cpu", torch.float64, 16, 4, 2, True, False, False, False)
    assert flash_attn.FlashAttnBackend().not_supported_reasons(spec) and not calls


def test_flex_calls_never_overlap_across_threads():
    """Ranks as threads of one process (the one-GPU harness) must not enter the compiled flex call at once:
    dynamo's first trace is not thread-safe and raised "using FX to symbolically trace a dynamo-optimized
    function" on an H200 when two thread ranks traced together."""
    import threading
    import time

    from torch.nn.attention.flex_attention import flex_attention
    inside, overlaps = [0], []

    def compiled(*args, **kwargs):
        inside[0] += 1
        overlaps.append(inside[0] > 1)
        time.sleep(0.02)
        try:
            return flex_attention(*args, **kwargs)
        finally:
            inside[0] -= 1

    from ringpack.backends.flex import FlexBackend
    b = FlexBackend(compiled)
    plan = make_plan([0, 40], 1, causal=True)
    q = torch.randn(40, 2, 16)
    def run():
        list(b.forward(q, q, q, plan.steps[0][0].waves[0], scale=0.25, softcap=0.0))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 4 and not any(overlaps)
