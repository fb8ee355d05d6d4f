"""Run a function on every rank of a freshly spawned NCCL process group, one GPU per rank."""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, out_file, fn, args):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", rank))
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump(result, f)


def run_nccl(world: int, fn, *args):
    """Call ``fn(*args)`` on ``world`` NCCL ranks (rank ``r`` on ``cuda:r``); return what rank 0 returned."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pkl")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out_file, fn, args), nprocs=world)
        with open(out_file, "rb") as f:
            return pickle.load(f)
