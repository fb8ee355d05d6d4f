"""Run a function on every rank of a freshly spawned CPU (gloo) process group, once per call.

Tests start one group per world size and run many cases inside it: spawning costs seconds,
a case costs milliseconds.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, out_file, fn, args):
    torch.set_num_threads(1)  # several ranks share few cores; oversubscribed threads only slow them down
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "wb") as f:
            pickle.dump(result, f)


def run_distributed(world: int, fn, *args):
    """Call ``fn(*args)`` on ``world`` gloo ranks; return what rank 0 returned."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pkl")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out_file, fn, args), nprocs=world)
        with open(out_file, "rb") as f:
            return pickle.load(f)
