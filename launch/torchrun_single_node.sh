#!/usr/bin/env bash
# ringpack check on one machine, one process per GPU (or 2 CPU processes without GPUs), via torchrun.
#
#   NPROC   processes to start (default: the number of GPUs torch sees, or 2 without any)
#
# Arguments go to `python -m ringpack check`, e.g.
#   launch/torchrun_single_node.sh --dtype bfloat16 --tokens 65536 --json check.json
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec torchrun --standalone --nproc-per-node "$NPROC" -m ringpack check "$@"
