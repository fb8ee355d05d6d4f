#!/usr/bin/env bash
# ringpack check with the DeepSpeed launcher (pip install deepspeed). The launcher sets RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which ringpack reads as it does under torchrun. --no_local_rank
# keeps it from appending --local_rank=N to the check's arguments.
#
#   NUM_GPUS     processes per node, one per GPU (default: all GPUs; 2 CPU processes on a machine without GPUs,
#                where the launcher itself would start only one)
#   HOSTFILE     DeepSpeed hostfile for several nodes, lines like "node0 slots=8"; the launcher reaches the
#                other nodes over ssh (pdsh) and runs the same command there (default: this machine only)
#   MASTER_ADDR  address of the first node (default: the first host of HOSTFILE, or localhost)
#   MASTER_PORT  rendezvous port (default 29500)
#
# Arguments go to `python -m ringpack check`, e.g.
#   HOSTFILE=hosts launch/deepspeed.sh --dtype bfloat16 --tokens 65536
set -euo pipefail
if [ -z "${NUM_GPUS:-}" ] && [ "$(python -c 'import torch; print(torch.cuda.device_count())')" = 0 ]; then
    NUM_GPUS=2
fi
exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --master_port "${MASTER_PORT:-29500}" \
    --module --no_local_rank ringpack check "$@"
