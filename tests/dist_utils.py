"""Run a function on every rank of a freshly spawned process group, once per call.

Tests start one group per world size and run many cases inside it: spawning costs seconds, a case
costs milliseconds. The group comes from the ``env://`` variables that torchrun would set, because
DeepSpeed and Megatron-core read them too. ``backend="nccl"`` puts rank ``r`` on ``cuda:r``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, out_file: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    device_id = None
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)  # several ranks share few cores; oversubscribed threads only slow them down
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=device_id)
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump(result, f)


def run_distributed(world: int, fn, *args, backend: str = "gloo"):
    """Call ``fn(*args)`` (importable) on ``world`` spawned ranks; return what rank 0 returned."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pkl")
        mp.spawn(_worker, args=(world, free_port(), backend, out_file, fn, args), nprocs=world)
        with open(out_file, "rb") as f:
            return pickle.load(f)
