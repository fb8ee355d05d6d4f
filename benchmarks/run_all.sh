#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA extension, run the GPU tests, run the benchmarks.
#
#   OUT=dir TOTAL_S=540 benchmarks/run_all.sh [extra `python benchmarks/bench.py` options]
#
# Writes into $OUT (default benchmarks/results): build.log, tests.log, bench.json, bench.md and PNG
# plots. Order: build, GPU tests (each test file in its own pytest run, so a crash or a timeout loses
# one file's report, not all), then the benchmarks with what is left of TOTAL_S; sections that do not
# fit are listed as skipped in bench.md. With one GPU the ring runs as thread ranks in the tests, and the
# benchmarks measure the local kernels, each tile of a 2-rank ring (benchmarks/tile_kernels.py) and each
# rank's compute of that ring, one rank at a time (benchmarks/rank_compute.py; ring efficiency itself needs
# 2 or more GPUs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
TOTAL_S=${TOTAL_S:-540}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
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
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl",
              ".".join(map(str, torch.cuda.nccl.version())), "cudnn", torch.backends.cudnn.version())'
} | tee "$OUT/environment.txt"

echo "== build ($(date -u +%FT%TZ))"
if MAX_JOBS=${MAX_JOBS:-16} RINGPACK_CUDA_ARCHS=${RINGPACK_CUDA_ARCHS:-90} python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  echo "extension built: $(python3 -c 'from ringpack import _ext; print(_ext.available())') ($(elapsed) s)"
else
  echo "extension build FAILED (see build.log); the torch fallbacks run instead"
fi

echo "== GPU tests"
: >"$OUT/tests.log"
run_tests 60 tests/gpu/test_ext.py
if (( gpus < 2 )); then
  # The ring as 2 thread ranks for every backend but flex, 3 for auto; flex's (slow to compile) at the end.
  ring=tests/gpu/test_gpu_ring.py
  threads=$ring::test_thread_ranks_one_gpu_real_kernels
  run_tests 200 -s "$ring::test_one_gpu_every_backend" "$ring::test_auto_split_between_cudnn_and_flash" \
    "$threads[2-auto]" "$threads[2-torch_flash]" "$threads[2-cudnn]" "$threads[3-auto]"
  run_tests 100 tests/gpu/test_compile.py  # three tests, about 71 s on an H200 (mostly compiling)
  budget=$(( TOTAL_S - $(elapsed) - 90 ))
  echo "== benchmarks (budget ${budget} s, at $(elapsed) s)"
  python3 benchmarks/bench.py --out "$OUT" --budget-s 30 --sections kernel --world 1 "$@"
  python3 benchmarks/tile_kernels.py --out "$OUT/tile_kernels.json"
  python3 benchmarks/rank_compute.py --out "$OUT/rank_compute.json" --budget-s $(( budget - 80 ))
  run_tests $(( TOTAL_S - $(elapsed) - 5 )) -s "$threads[2-flex]"
else
  run_tests 90 tests/gpu/test_compile.py
  run_tests 240 -s tests/gpu/test_gpu_ring.py
  budget=$(( TOTAL_S - $(elapsed) - 30 ))
  echo "== benchmarks (budget ${budget} s, at $(elapsed) s)"
  python3 benchmarks/bench.py --out "$OUT" --budget-s "$budget" "$@"
fi
echo "== done in $(elapsed) s"
