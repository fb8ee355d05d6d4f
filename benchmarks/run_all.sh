#!/usr/bin/env bash
# GPU tests and benchmarks on a GPU machine, in stages that each fit a 10-minute call on one GPU:
#
#   OUT=dir benchmarks/run_all.sh tests    # the GPU tests, each file in its own pytest run (tests.log)
#   OUT=dir benchmarks/run_all.sh warmup   # the FA4 warmup test: new packings compile nothing after ringpack.warmup
#   OUT=dir benchmarks/run_all.sh bench    # tile classes per backend, each rank's compute, the fused merge
#   OUT=dir benchmarks/run_all.sh          # both, after building the CUDA extension
#   OUT=dir benchmarks/run_all.sh build    # only build the CUDA extension (csrc/) in place
#
# Writes into $OUT (default benchmarks/results/run): environment.txt, build.log, tests.log, tiles.{json,md},
# rank_compute.{json,md}, merge_kernels.{json,md}; with two or more GPUs also bench.{json,md} and plots (the ring
# over NCCL). With one GPU the ring runs as thread ranks in the tests, and each rank's compute of a 2-rank ring runs
# one rank at a time (benchmarks/rank_compute.py); ring efficiency itself needs 2 or more GPUs.
# FlashAttention-4 runs where flash-attn-4 is importable (its kernels compile on first use: tile_kernels.md's
# first-call column shows that cost); without a built extension the fused merge is Triton's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run}
STAGE=${1:-all}
(( $# )) && shift  # the rest goes to bench.py on machines of several GPUs
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
run_tests() {  # run_tests SECONDS PYTEST_ARGS...: one pytest run, its report appended to tests.log
  local limit=$1; shift
  echo "-- pytest $* (limit ${limit} s, at $(elapsed) s)" | tee -a "$OUT/tests.log"
  timeout "$limit" python3 -m pytest -q -rs -p no:cacheprovider --tb=short "$@" 2>&1 | tee -a "$OUT/tests.log" | tail -25
  echo "-- exit status ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
}
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
{
  echo "date: $(date -u +%FT%TZ)"; echo "gpus: $gpus"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl",
              ".".join(map(str, torch.cuda.nccl.version())), "cudnn", torch.backends.cudnn.version(),
              "triton", triton.__version__)'
  python3 -c 'import importlib.metadata as m; print("flash-attn-4", m.version("flash-attn-4"))' 2>/dev/null \
    || echo "flash-attn-4: not installed"
} | tee "$OUT/environment.txt"

if [[ $STAGE == all || $STAGE == build ]]; then
  echo "== build ($(date -u +%FT%TZ))"
  if MAX_JOBS=${MAX_JOBS:-16} RINGPACK_CUDA_ARCHS=${RINGPACK_CUDA_ARCHS:-90} python3 setup.py build_ext --inplace \
      >"$OUT/build.log" 2>&1; then
    echo "extension built: $(python3 -c 'from ringpack import _ext; print(_ext.available())') ($(elapsed) s)"
  else
    echo "extension build FAILED (see build.log); Triton's kernels or torch run instead"
  fi
fi

if [[ $STAGE == all || $STAGE == tests ]]; then
  echo "== GPU tests"
  ring=tests/gpu/test_gpu_ring.py
  threads=$ring::test_thread_ranks_one_gpu_real_kernels
  run_tests 60 tests/gpu/test_ext.py
  if (( gpus < 2 )); then
    # The ring as 2 thread ranks for every backend but flex, 3 for auto; FA4's first calls compile its kernels.
    run_tests 300 -s "$ring::test_one_gpu_every_backend" "$ring::test_auto_split_between_cudnn_and_flash" \
      "$threads[2-auto]" "$threads[2-torch_flash]" "$threads[2-cudnn]" "$threads[2-flash_attn_4]" \
      "$threads[3-auto]"
    run_tests 100 tests/gpu/test_compile.py  # about 71 s on an H200 (mostly compiling)
  else
    run_tests 90 tests/gpu/test_compile.py
    run_tests 400 -s tests/gpu/test_gpu_ring.py
  fi
fi

if [[ $STAGE == all || $STAGE == warmup ]]; then
  echo "== the FA4 warmup test (about 200 s on an H200, mostly compiling)"
  run_tests 300 -s tests/gpu/test_gpu_ring.py::test_fa4_new_packings_compile_nothing_after_warmup
fi

if [[ $STAGE == all || $STAGE == bench ]]; then
  echo "== benchmarks (at $(elapsed) s)"
  python3 benchmarks/merge_kernels.py --out "$OUT/merge_kernels.json"
  python3 benchmarks/tile_kernels.py --out "$OUT/tiles.json"
  # The rows the targets are stated on: one document, 2k-token documents and the long tail at 8k and 32k tokens per
  # rank, balanced, forward + backward.
  python3 benchmarks/rank_compute.py --strategy balanced --fwd-bwd-only --backend auto --backend torch_flash \
    --tokens-per-rank 8192 --tokens-per-rank 32768 --budget-s 240 --out "$OUT/rank_compute.json"
  if (( gpus >= 2 )); then
    python3 benchmarks/bench.py --out "$OUT" --budget-s 400 "$@"
  fi
fi
echo "== done in $(elapsed) s"
