#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA extension, run the GPU tests, run the benchmarks.
#
#   OUT=dir TOTAL_S=540 benchmarks/run_all.sh [extra `python -m ringpack bench` options]
#
# Writes into $OUT (default benchmarks/results): build.log, tests.log, bench.json, bench.md and PNG
# plots. Order: build, GPU tests (each test file in its own pytest run, so a crash or a timeout loses
# one file's report, not all), then the benchmarks with what is left of TOTAL_S; sections that do not
# fit are listed as skipped in bench.md. With one GPU the ring runs as thread ranks in the tests and the
# benchmarks measure the local kernels only (ring efficiency needs 2 or more GPUs).
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
if RINGPACK_CUDA_ARCHS=${RINGPACK_CUDA_ARCHS:-90} python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  echo "extension built: $(python3 -c 'from ringpack import _ext; print(_ext.available())') ($(elapsed) s)"
else
  echo "extension build FAILED (see build.log); the torch fallbacks run instead"
fi

echo "== GPU tests"
: >"$OUT/tests.log"
run_tests 60 tests/gpu/test_ext.py
run_tests 90 tests/gpu/test_compile.py
run_tests 240 -s tests/gpu/test_gpu_ring.py

sections=()
if (( gpus < 2 )); then sections=(--sections kernel --world 1); fi
budget=$(( TOTAL_S - $(elapsed) - 30 ))
echo "== benchmarks (budget ${budget} s, at $(elapsed) s)"
python3 -m ringpack bench --out "$OUT" --budget-s "$budget" "${sections[@]}" "$@"
echo "== done in $(elapsed) s"
