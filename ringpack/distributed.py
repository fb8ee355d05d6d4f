"""Process-group setup for the jobs ringpack runs itself (torchrun environment, or spawned local ranks)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True under a launcher that set the torch.distributed environment (torchrun and friends)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _use_cuda(world: int) -> bool:
    wanted = os.environ.get("RINGPACK_DEVICE", "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"RINGPACK_DEVICE must be auto, cpu or cuda, got {wanted!r}")
    if wanted == "cpu":
        return False
    return torch.cuda.is_available() and torch.cuda.device_count() >= min(world, 1)


def init_distributed(timeout_s: float = 300.0) -> None:
    """Initialise the default process group from torchrun's environment: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = _use_cuda(1)
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            world_size=world, rank=int(os.environ["RANK"]))


def init_spawned(local_rank: int, world: int, init_file: str, timeout_s: float = 300.0) -> None:
    """Initialise rank ``local_rank`` of ``world`` processes spawned on this machine (file rendezvous)."""
    cuda = _use_cuda(world) and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=local_rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def default_device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
