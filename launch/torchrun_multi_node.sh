#!/usr/bin/env bash
# ringpack check across several machines via torchrun's c10d rendezvous. Run the same command on every node.
#
#   NNODES          number of nodes (required)
#   NPROC_PER_NODE  processes per node (default: the number of GPUs torch sees)
#   RDZV_ENDPOINT   host:port that every node can reach, usually the first node (required), e.g. node0:29400
#   RDZV_ID         an id shared by the nodes of one job (default: ringpack-check)
#
# Arguments go to `python -m ringpack check`, e.g.
#   NNODES=2 RDZV_ENDPOINT=node0:29400 launch/torchrun_multi_node.sh --dtype bfloat16 --tokens 131072
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port of a node every node can reach}"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-ringpack-check}" -m ringpack check "$@"
