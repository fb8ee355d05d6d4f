"""Process-group setup from whatever launched this process, and a cheap check that every rank has the same plan.

Launchers understood by ``init_distributed`` (first match wins):

- ``env``: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (torchrun, the DeepSpeed launcher);
- ``mpi``: Open MPI's ``mpirun`` (or any MPI: ``PMI_SIZE``/``PMIX_RANK``), through mpi4py; rank 0 picks a free
  port and broadcasts it with its host name;
- ``slurm``: an ``srun`` step (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``); the master is the
  first host of the step's node list, the port ``MASTER_PORT`` or one derived from the job id.

``MASTER_ADDR`` and ``MASTER_PORT``, when set, override what the ``mpi`` and ``slurm`` paths pick.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringpack.plan import Plan
from ringpack.validation import integer, real

LAUNCHERS = ("auto", "env", "mpi", "slurm")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelGroups:
    """What ``init_distributed`` set up for this rank."""

    rank: int  # global rank
    world_size: int
    local_rank: int  # rank on this node; picks the GPU (GPU 0 when the launcher shows each rank one GPU)
    device: torch.device  # where this rank computes: its GPU under NCCL, else the CPU
    launcher: str  # "env", "mpi" or "slurm": where rank and world came from
    cp_group: dist.ProcessGroup  # this rank's context-parallel group: ``cp_size`` consecutive ranks
    cp_rank: int
    cp_size: int
    dp_group: dist.ProcessGroup | None  # ranks with the same cp_rank, one per CP group; None when cp_size == world
    dp_rank: int
    dp_size: int


@dataclass(frozen=True)
class _World:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def detect_launcher() -> str | None:
    """The launcher whose environment this process runs in (``env``, ``mpi``, ``slurm``), or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return "slurm"
    if "PMI_SIZE" in env or "PMIX_RANK" in env:
        return "mpi"
    return None


def launched() -> bool:
    """True under a launcher that started every rank: torchrun (and friends), mpirun, or an srun step."""
    return detect_launcher() is not None


def _env_int(name: str, default: int | None = None, *, minimum: int = 0) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set; the launcher should have set it")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"environment variable {name} must be an integer >= {minimum}, got {value!r}")
    return number


def _from_env() -> _World:
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set (RANK and WORLD_SIZE are): "
                             "launch with torchrun or the DeepSpeed launcher, or set it")
    return _World(_env_int("RANK"), _env_int("WORLD_SIZE", minimum=1), _env_int("LOCAL_RANK", 0),
                  os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _from_mpi() -> _World:
    try:
        from mpi4py import MPI
    except ImportError:
        raise ValueError("launched by MPI but mpi4py is not installed: pip install mpi4py "
                         "(it must match the MPI that launched this job)") from None
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = local.Get_rank()
    local.Free()
    master: tuple[str, int] | str | None = None
    if rank == 0:
        try:
            master = (os.environ.get("MASTER_ADDR", socket.gethostname()),
                      _env_int("MASTER_PORT") if "MASTER_PORT" in os.environ else _free_port())
        except ValueError as e:
            master = str(e)  # every rank must hear of it: MPI's broadcast would wait forever
    master = comm.bcast(master, root=0)
    if isinstance(master, str):
        raise ValueError(f"rank 0: {master}")
    return _World(rank, comm.Get_size(), local_rank, *master)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    head = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    host = re.sub(r"\[([^\],\-]*)[^\]]*\]", r"\1", head)
    if not host:
        raise ValueError(f"cannot read a host name from SLURM node list {nodelist!r}")
    return host


def _slurm_master() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") \
        or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_STEP_NODELIST, SLURM_JOB_NODELIST and SLURM_NODELIST are all unset; "
                         "set MASTER_ADDR to the first node's address")
    if shutil.which("scontrol"):
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=False).stdout.split()
        if hosts:
            return hosts[0]
    return first_host(nodelist)


def _from_slurm() -> _World:
    addr = os.environ.get("MASTER_ADDR") or _slurm_master()
    # Every rank must agree on the port without talking: take it from the job id unless set.
    if "MASTER_PORT" in os.environ:
        port = _env_int("MASTER_PORT")
    else:
        port = 20000 + _env_int("SLURM_JOB_ID") % 20000
    return _World(_env_int("SLURM_PROCID"), _env_int("SLURM_STEP_NUM_TASKS", minimum=1), _env_int("SLURM_LOCALID"),
                  addr, port)


def _use_cuda(device: str) -> bool:
    wanted = os.environ.get("RINGPACK_DEVICE", "auto") if device == "auto" else device
    if wanted not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {wanted!r}")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no GPU")
    return wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())


MAX_TIMEOUT_S = 10 ** 9  # about 30 years; timedelta (and the C++ side) overflow not far above


def _timeout(timeout_s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=real("timeout_s (seconds)", timeout_s, positive=True, maximum=MAX_TIMEOUT_S))


def init_distributed(*, cp_size: int | None = None, launcher: str = "auto", device: str = "auto",
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelGroups:
    """Initialise the default process group from the launcher's environment and build the parallel groups.

    Args:
        cp_size: ranks per context-parallel group (default: the whole world); must divide the world size.
            CP groups are blocks of consecutive ranks (one node's GPUs when ``cp_size`` is the GPUs per node).
        launcher: ``"auto"`` (detect) or one of ``env``, ``mpi``, ``slurm``.
        device: ``"auto"`` (NCCL on GPUs when torch sees one, else gloo on CPU; ``RINGPACK_DEVICE`` overrides),
            ``"cuda"`` or ``"cpu"``. Under NCCL the rank's GPU is ``local_rank``.
        timeout_s: a collective or ring exchange that waits longer than this fails (gloo raises; NCCL's
            watchdog aborts the process) instead of hanging.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    source = detect_launcher() if launcher == "auto" else launcher
    if source is None:
        raise ValueError("no launcher environment found (torchrun/DeepSpeed: RANK, WORLD_SIZE; mpirun: "
                         "OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK; srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS)")
    timeout = _timeout(timeout_s)
    world = {"env": _from_env, "mpi": _from_mpi, "slurm": _from_slurm}[source]()
    cp_size = world.world_size if cp_size is None else integer("cp_size", cp_size, minimum=1)
    if world.world_size % cp_size:
        raise ValueError(f"cp_size must be a positive divisor of the world size {world.world_size}, got {cp_size}")
    if world.rank >= world.world_size:
        raise ValueError(f"rank {world.rank} from the {source} launcher is not below its world size {world.world_size}")
    cuda = _use_cuda(device)
    if cuda:
        gpus = torch.cuda.device_count()
        # One visible GPU: the launcher bound one GPU per task (e.g. srun --gpus-per-task=1).
        gpu = 0 if gpus == 1 else world.local_rank
        if gpu >= gpus:
            raise ValueError(f"local rank {world.local_rank} has no GPU: this node has {gpus}; "
                             "start at most that many ranks per node")
        torch.cuda.set_device(gpu)
    # device_id makes NCCL build its communicator now, so a first point-to-point call needs no collective.
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{world.master_addr}:{world.master_port}",
                            rank=world.rank, world_size=world.world_size, timeout=timeout,
                            device_id=torch.device("cuda", gpu) if cuda else None)
    return _groups(world, source, cp_size, torch.device("cuda", gpu) if cuda else torch.device("cpu"))


def group_layout(world_size: int, cp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Global ranks of every context-parallel group (blocks of ``cp_size`` consecutive ranks, one node's GPUs
    when ``cp_size`` is the GPUs per node) and of every data-parallel group (the ranks with the same CP rank)."""
    cp = [list(range(first, first + cp_size)) for first in range(0, world_size, cp_size)]
    dp = [list(range(offset, world_size, cp_size)) for offset in range(cp_size)]
    return cp, dp


def _own_group(layout: list[list[int]], rank: int) -> dist.ProcessGroup:
    """Create every group of ``layout`` (new_group is collective: all ranks, same order); return ``rank``'s."""
    own = None
    for ranks in layout:
        group = dist.new_group(ranks)
        if rank in ranks:
            own = group
    return own


def _groups(world: _World, source: str, cp_size: int, device: torch.device) -> ParallelGroups:
    n, rank = world.world_size, world.rank
    if cp_size == n:
        cp_group, dp_group = dist.group.WORLD, None
    else:
        cp_group, dp_group = (_own_group(layout, rank) for layout in group_layout(n, cp_size))
    return ParallelGroups(rank=rank, world_size=n, local_rank=world.local_rank, device=device, launcher=source,
                          cp_group=cp_group, cp_rank=rank % cp_size, cp_size=cp_size, dp_group=dp_group,
                          dp_rank=rank // cp_size, dp_size=n // cp_size)


def init_spawned(local_rank: int, world: int, init_file: str, *, device: str = "auto",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise rank ``local_rank`` of ``world`` processes spawned on this machine (file rendezvous)."""
    cuda = _use_cuda(device)
    if cuda and torch.cuda.device_count() < world:
        if device == "cuda":
            raise ValueError(f"device 'cuda' needs {world} GPUs, found {torch.cuda.device_count()}")
        cuda = False
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=local_rank,
                            world_size=world, timeout=_timeout(timeout_s))


def default_device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def plan_fingerprint(plan: Plan) -> int:
    """A 63-bit hash of everything that defines ``plan`` (boundaries, world size, strategy, mask)."""
    key = repr((plan.cu_seqlens, plan.world_size, plan.strategy, plan.causal, plan.window_size)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def verify_plan(plan: Plan, group: dist.ProcessGroup | None = None) -> None:
    """Raise a ValueError on every rank of ``group`` unless all of them hold the same plan.

    One all-gather of four integers per rank. Ranks given different ``cu_seqlens`` would otherwise
    post mismatched ring messages: wrong results, or a hang until the timeout.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    device = default_device()
    mine = torch.tensor([plan_fingerprint(plan), plan.total_tokens, len(plan.cu_seqlens) - 1, plan.world_size],
                        dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    rows = [tuple(t.tolist()) for t in everyone]
    if len(set(rows)) == 1:
        return
    variants: dict[tuple, list[int]] = {}
    for group_rank, row in enumerate(rows):
        variants.setdefault(row, []).append(group_rank)
    detail = "; ".join(f"ranks {', '.join(map(str, ranks))}: fingerprint {fp:016x}, {tokens} tokens, {docs} documents, "
                       f"world_size {world}" for (fp, tokens, docs, world), ranks in variants.items())
    raise ValueError(f"ranks of the context-parallel group hold different plans (every rank must pass the same "
                     f"global cu_seqlens, strategy, causal and window_size to make_plan): {detail}")
