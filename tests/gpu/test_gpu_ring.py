"""The ring on GPUs (1 and 2, NCCL) with the real kernels, judged as DESIGN.md says for 16-bit inputs.

Each case's ring error against the float64 reference must be within 1.5x of the error of the same
backend run on the whole batch on one GPU (``checking.run_case``'s judgement, norm-wise). A wrong tile,
a lost window, a top-left/bottom-right mix-up or a broken merge gives O(1) errors, far past that bound;
kernel rounding alone stays well within it. Skipped without CUDA (2-GPU cases without 2 GPUs).

With one GPU, 2 and 3 ranks also run as threads of one process (``emulation.ThreadRing``): the ring's
own forward and backward loops and the real kernels, with only NCCL replaced by in-order mailboxes.
"""

from __future__ import annotations

import sys
import traceback

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from emulation import ring_in_threads

from ringpack import STRATEGIES, checking
from ringpack.backends import AttnSpec, select_backend
from ringpack.checking import Case, reference_attention, run_case
from ringpack.merge import accumulation_dtype
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import make_plan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MIX = (1000, 1, 7, 333, 0, 1500, 64)  # long, empty and one-token documents, odd lengths
ONE_DOC = (2048,)
CUDNN_MIX = (1000, 64, 333, 0, 384, 384, 384, 1536)  # no 1 x 1 tile at 1-3 ranks (cuDNN rejects it); a batch
MASKS = ((True, (-1, -1)), (False, (-1, -1)), (True, (256, -1)), (False, (100, 50)))
SHAPE = {"heads": 8, "kv_heads": 2, "head_dim": 64}


def gpu_cases() -> list[Case]:
    cases = []
    for strategy in STRATEGIES:
        for causal, window in MASKS:
            for dtype in ("bfloat16", "float16"):
                cases.append(Case(MIX, strategy, causal, window, dtype=dtype, backend="auto", **SHAPE))
            cases.append(Case(MIX, strategy, causal, window, dtype="bfloat16", backend="torch_flash", **SHAPE))
            for dtype in ("bfloat16", "float16"):
                cases.append(Case(MIX, strategy, causal, window, dtype=dtype, backend="flash_attn_4", **SHAPE))
        for dtype in ("bfloat16", "float16"):
            cases.append(Case(ONE_DOC, strategy, True, (-1, -1), dtype=dtype, backend="auto", **SHAPE))
        for causal in (True, False):
            cases.append(Case(CUDNN_MIX, strategy, causal, (-1, -1), dtype="bfloat16", backend="cudnn", **SHAPE))
        for causal, window in ((True, (-1, -1)), (False, (100, 50))):
            cases.append(Case(MIX, strategy, causal, window, dtype="bfloat16", backend="flex", **SHAPE))
    # softcap: FlashAttention-4 takes it where installed (auto gives it to it), else auto runs the reference kernel
    cases.append(Case(MIX, "balanced", True, (-1, -1), dtype="bfloat16", backend="auto", softcap=30.0, **SHAPE))
    for strategy in STRATEGIES:
        cases.append(Case(MIX, strategy, True, (256, -1), dtype="bfloat16", backend="flash_attn_4", softcap=30.0,
                          **SHAPE))
    # FlashAttention-4 runs where flash-attn-4 is installed on a Hopper or Blackwell GPU; its cases are left out
    # elsewhere (test_fa4_... below skips and says why)
    cases = [c for c in cases if c.backend != "flash_attn_4" or _fa4_available()]
    return sorted(cases, key=lambda c: c.backend == "cudnn")  # stable; cudnn last


def _fa4_available() -> bool:
    from ringpack.backends.flash_attn_4 import FlashAttn4Backend
    spec = AttnSpec("cuda", torch.bfloat16, SHAPE["head_dim"], SHAPE["heads"], SHAPE["kv_heads"], True, True, True,
                    True)
    return torch.cuda.is_available() and not FlashAttn4Backend().not_supported_reasons(spec)


def _run(cases: list[Case]) -> list[tuple[str, str, dict, dict]]:
    device = f"cuda:{dist.get_rank()}" if dist.is_initialized() else "cuda"
    out = []
    for case in cases:
        label = f"{case.backend}: {case.label}"
        try:
            r = run_case(case, device=device)
        except Exception as e:
            if dist.is_initialized():
                # The other rank may be inside a collective of this case: carrying on would hang both until
                # the NCCL timeout and lose this error. Print it now and fail the whole run.
                print(f"rank {dist.get_rank()}: {label} raised", file=sys.stderr, flush=True)
                traceback.print_exc()
                raise
            out.append((label, f"raised {type(e).__name__}: {e}", {}, {}))  # one GPU: report, go on
            continue
        out.append((label, r.reason, r.errors, r.kernel_errors))
    return out


def _assert_all_ok(results) -> None:
    failed = [f"{label}: {reason} (ring {errors}, one GPU {kernel})" for label, reason, errors, kernel in results
              if reason]
    assert not failed, "\n".join(failed)


@needs_cuda
def test_one_gpu_every_backend():
    """One rank: the backends' wave logic on real kernels (every mask, both dtypes, GQA)."""
    _assert_all_ok(_run([c for c in gpu_cases() if c.strategy == "balanced"]))


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend", ["auto", "torch_flash", "cudnn", "flex"])
def test_two_gpus_nccl_every_strategy(backend):
    """Two ranks over NCCL: every strategy, mask and dtype, forward and backward."""
    _assert_all_ok(run_distributed(2, _run, [c for c in gpu_cases() if c.backend == backend], backend="nccl"))


@needs_cuda
def test_auto_split_between_cudnn_and_flash():
    """auto with cuDNN taking every dense tile of 300 x 300 pairs or more and torch_flash the rest of the same
    waves."""
    from ringpack.backends.auto import AutoBackend, Rule
    from ringpack.backends.cudnn import CudnnBackend
    from ringpack.backends.torch_flash import TorchFlashBackend
    auto = AutoBackend([CudnnBackend(), TorchFlashBackend()], rules=(Rule("cudnn", "dense", min_area=300 * 300),))
    cases = [Case(MIX, s, c, (-1, -1), dtype=d, backend=auto, **SHAPE)
             for s in ("balanced", "contiguous") for c in (True, False) for d in ("bfloat16", "float16")]
    _assert_all_ok(_run(cases))


def threaded_case(case: Case, world: int, device: str) -> checking.Result:
    """``case`` on ``world`` thread ranks of one device, judged like ``run_case`` (float64 reference and the
    same backend on the whole batch on one device)."""
    cu = lengths_to_cu_seqlens(case.lengths)
    q, k, v, dout, dlse = checking._inputs(case, cu, 0)
    ref = checking._grads(lambda q_, k_, v_: reference_attention(q_, k_, v_, cu, causal=case.causal,
                                                                 window_size=case.window_size, softcap=case.softcap),
                          q, k, v, dout, dlse)
    dtype = getattr(torch, case.dtype)
    spec = AttnSpec(device_type=torch.device(device).type, dtype=dtype, head_dim=case.head_dim, num_heads=case.heads,
                    num_kv_heads=case.kv_heads, causal=case.causal, window=case.window_size != (-1, -1),
                    softcap=case.softcap > 0, lse_grad=True)
    plan = make_plan(cu, world, strategy=case.strategy, causal=case.causal, window_size=case.window_size)
    got = ring_in_threads(plan, select_backend(case.backend, spec), *(t.to(device, dtype) for t in (q, k, v, dout)),
                          dlse.to(device, accumulation_dtype(dtype)), scale=case.head_dim ** -0.5,
                          softcap=case.softcap)
    stats = [checking._compare(g, w) for g, w in zip(got, ref)]
    names = checking.GRAD_NAMES
    result = checking.Result(case, errors={n: s[0] for n, s in zip(names, stats)},
                             rel_errors={n: checking._relative(s[1], s[2]) for n, s in zip(names, stats)},
                             nonfinite={n: s[3] for n, s in zip(names, stats)},
                             hidden={n: s[4] for n, s in zip(names, stats)},
                             leaked={n: s[5] for n, s in zip(names, stats)})
    result.kernel_errors, result.kernel_rel_errors = checking._single_device_errors(
        case, q, k, v, dout, dlse, cu, ref, torch.device(device), dtype)
    result.reason = checking._judge(result)
    result.ok = not result.reason
    return result


@pytest.mark.parametrize("world", [2, 3])
def test_thread_ranks_float64_cpu(world):
    """The thread harness itself: float64 on the CPU must match the reference to 1e-10, as over gloo.
    Catches a harness that would let the GPU variant below pass vacuously."""
    for strategy in STRATEGIES:
        for causal, window in ((True, (-1, -1)), (False, (6, 4))):
            r = threaded_case(Case((0, 1, 7, 97, 31, 0, 13, 64), strategy, causal, window), world, "cpu")
            assert r.ok, f"{strategy} causal={causal} window={window}: {r.reason}"


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "torch_flash", "flex", "cudnn", "flash_attn_4"])
@pytest.mark.parametrize("world", [2, 3])
def test_thread_ranks_one_gpu_real_kernels(world, backend):
    """2 and 3 ranks as threads on one GPU, every strategy, mask and dtype, forward and backward."""
    if backend == "flash_attn_4" and not _fa4_available():
        pytest.skip("flash-attn-4 is not installed or this GPU is not Hopper/Blackwell")
    failed = []
    for case in gpu_cases():
        if case.backend != backend:
            continue
        try:
            r = threaded_case(case, world, "cuda")
        except Exception as e:
            failed.append(f"{case.label}: raised {type(e).__name__}: {e}")
            continue
        print(f"world {world} {backend}: {case.label:<48} ratio {r.error_ratio:5.2f}  {r.reason or 'ok'}", flush=True)
        if r.reason:
            failed.append(f"{case.label}: {r.reason} (ratio {r.error_ratio:.2f})")
    assert not failed, "\n".join(failed)


def _fa4_compiled() -> set:
    """The kernels FlashAttention-4 has compiled in this process (every cache of its interface module)."""
    from flash_attn.cute import interface
    return {(name, key) for name, fn in vars(interface).items()
            if hasattr(getattr(fn, "compile_cache", None), "cache") for key in fn.compile_cache.cache}


@needs_cuda
def test_fa4_new_packings_compile_nothing_after_warmup():
    """``ringpack.warmup`` compiles every kernel class of a configuration: packings it never saw (other documents,
    other strategies and world sizes, cut diagonals, windows) then run without compiling (FA4 compiles 3-6 s per
    class). Prints the warmup's time, the first-call cost a user pays before step 1."""
    import random

    import ringpack
    from ringpack.backends.flash_attn_4 import FlashAttn4Backend
    for causal, window in ((True, (-1, -1)), (True, (300, -1))):
        spec = AttnSpec("cuda", torch.bfloat16, 64, 8, 2, causal, window != (-1, -1), False, True)
        if FlashAttn4Backend().not_supported_reasons(spec):
            pytest.skip(f"flash_attn_4: {FlashAttn4Backend().not_supported_reasons(spec)}")
        seconds = ringpack.warmup(heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16, causal=causal,
                                  window_size=window, lse_grad=True, backend="flash_attn_4")
        before = _fa4_compiled()
        rng = random.Random(0)
        for _ in range(6):
            lengths = [rng.choice((1, 7, 130, 900, 2500)) for _ in range(rng.randint(1, 8))]
            case = Case(tuple(lengths), rng.choice(STRATEGIES), causal, window, dtype="bfloat16",
                        backend="flash_attn_4", **SHAPE)
            result = threaded_case(case, rng.randint(1, 3), "cuda")
            assert result.ok, result.reason
        new = _fa4_compiled() - before
        print(f"fa4 warmup causal={causal} window={window}: {seconds:.1f} s, {len(before)} kernels; compiled after "
              f"it: {sorted(map(str, new)) or 'none'}", flush=True)
        assert not new, f"new packings compiled kernels the warmup did not: {sorted(new)}"
