"""Real multi-process runs whose processes someone else starts: two torchrun "nodes", and SLURM's tasks.

Both on one CPU machine (gloo, localhost rendezvous), with the ``nodes`` case of ``distributed_worker.py`` (the
``learn`` workload of ``tests/test_distributed.py`` on ``Trainer(devices=..., num_nodes=...)``): every run must reach
the single-node run's accuracy bar, end with bitwise-identical replicas and claim every epoch's batches exactly once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LEARN_EPOCHS, assert_identical_replicas
from tests.test_distributed import WORKER, _results

TIMEOUT_S = 300  # all processes of one run together
EPOCHS, EPOCH_BATCHES = LEARN_EPOCHS, 45  # the `learn` workload: epochs of 45 batches (all ranks together)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 120)]


def _free_port() -> int:
    """A port the OS has just handed out (bound to port 0), free for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """This process's environment without what a launcher or scheduler would have set for *it*: the test may itself
    run under torchrun or inside a SLURM job, and the processes it starts must only see what the test gives them."""
    launcher_keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                     "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK")
    return {key: value for key, value in os.environ.items()
            if key not in launcher_keys and not key.startswith(("SLURM_", "TORCHELASTIC_"))} | {"PYTHONUNBUFFERED": "1"}


def _run_all(commands: list[tuple[list[str], dict[str, str]]], out: Path) -> list[subprocess.Popen[bytes]]:
    """Starts every (command, environment) as a process of its own (own session, output to files in ``out``) and
    waits until all have exited; a process that fails, or the deadline, ends the others (their process groups)."""
    out.mkdir(parents=True, exist_ok=True)
    processes = []
    for index, (command, env) in enumerate(commands):
        with open(out / f"stdout{index}.txt", "wb") as stdout, open(out / f"stderr{index}.txt", "wb") as stderr:
            processes.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=out,
                                              start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while running := [process for process in processes if process.poll() is None]:
            if any(process.returncode not in (None, 0) for process in processes):
                deadline = min(deadline, time.monotonic() + 30)  # the others fail or return soon after
            if time.monotonic() > deadline:
                break
            try:  # wakes as soon as this one exits; a second at most, to notice another's failure
                running[0].wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
    finally:  # whatever is left of each process's group: the torchrun agent and its worker alike
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return processes


def _output(out: Path, processes: list[subprocess.Popen[bytes]]) -> str:
    """Every process's exit code and the tail of its stdout and stderr, for an assertion message."""
    parts = []
    for index, process in enumerate(processes):
        stdout = (out / f"stdout{index}.txt").read_text(errors="replace")[-2000:]
        stderr = (out / f"stderr{index}.txt").read_text(errors="replace")[-4000:]
        parts.append(f"--- process {index} (exit code {process.returncode}) stdout:\n{stdout}\n--- stderr:\n{stderr}")
    return "\n".join(parts)


def _ok(out: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    # returncode -9: killed at the deadline (TIMEOUT_S) or 30 s after another process failed
    assert all(process.returncode == 0 for process in processes), _output(out, processes)


def _trained_like_one_node(first: dict[str, Any], second: dict[str, Any]) -> None:
    """What test_distributed.py's `learn` tests assert of the single-node run, plus each claim exactly once."""
    # the single-node run's bar: 0.95 within a few epochs, and the final replica accurate
    assert max(first["val_accuracy"]) >= 0.95 and first["accuracy"] >= 0.9, first["val_accuracy"]
    assert first["accuracy"] == second["accuracy"] and first["val_accuracy"] == second["val_accuracy"]
    assert_identical_replicas(first, second)
    assert len(first["claimed"]) == len(second["claimed"]) == EPOCHS
    for epoch, (mine, theirs) in enumerate(zip(first["claimed"], second["claimed"])):
        assert sorted(mine + theirs) == list(range(EPOCH_BATCHES)), f"epoch {epoch}: every batch exactly once"
    assert first["batches"] + second["batches"] == EPOCHS * EPOCH_BATCHES
    assert first["batches"] > 0 and second["batches"] > 0
    assert first["global_step"] == second["global_step"] == EPOCHS * EPOCH_BATCHES  # all ranks' batches
    assert first["world_size"] == second["world_size"] == 2


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_torchrun_nodes_train_like_one(tmp_path: Path, rendezvous: str) -> None:
    """Two torchrun agents ("nodes" of one process each, `Trainer(devices=1, num_nodes=2)`) meet at a localhost
    rendezvous: static (``--node_rank`` with ``--master_addr/--master_port``) or c10d (``--rdzv_endpoint``, where
    the rendezvous assigns the node ranks)."""
    port = _free_port()
    commands = []
    for node_rank in (0, 1):
        if rendezvous == "static":
            where = ["--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        else:
            where = ["--rdzv_backend", "c10d", "--rdzv_id", "pdasgd-multinode", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *where,
                   str(WORKER), "nodes", str(tmp_path), "1", "2"]
        commands.append((command, _clean_env()))
    processes = _run_all(commands, tmp_path / "logs")
    _ok(tmp_path / "logs", processes)
    first, second = _results(tmp_path, "nodes")
    assert first["cluster_environment"] == second["cluster_environment"] == "TorchElasticEnvironment"
    assert first["num_nodes"] == second["num_nodes"] == 2
    assert {first["node_rank"], second["node_rank"]} == {0, 1}  # one process per node
    assert first["local_rank"] == second["local_rank"] == 0
    if rendezvous == "static":  # --node_rank decides the global rank
        assert (first["node_rank"], second["node_rank"]) == (0, 1)
    _trained_like_one_node(first, second)


def test_slurm_tasks_train_like_one_node(tmp_path: Path) -> None:
    """Two processes with the environment `srun` gives the tasks of `sbatch --nodes 1 --ntasks-per-node 2`: Lightning
    picks its SLURMEnvironment, each task is one rank (Lightning starts no process of its own) and the main address
    comes from SLURM's node list."""
    port = _free_port()
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pdasgd-multinode",  # not "bash"/"interactive"
             "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_NNODES": "1",
             "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
             "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_GTIDS": "0,1", "MASTER_PORT": str(port)}  # MASTER_PORT: what a job script exports
    commands = []
    for task in (0, 1):
        env = _clean_env() | slurm | {"SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)}
        commands.append(([sys.executable, str(WORKER), "nodes", str(tmp_path), "2", "1"], env))
    processes = _run_all(commands, tmp_path / "logs")
    _ok(tmp_path / "logs", processes)
    first, second = _results(tmp_path, "nodes")
    assert first["cluster_environment"] == second["cluster_environment"] == "SLURMEnvironment"
    assert [first["pid"], second["pid"]] == [process.pid for process in processes]  # task R is rank R
    assert first["main_address"] == second["main_address"] == "127.0.0.1"  # from SLURM_NODELIST (no MASTER_ADDR)
    assert first["main_port"] == second["main_port"] == port
    assert (first["node_rank"], first["local_rank"], second["node_rank"], second["local_rank"]) == (0, 0, 0, 1)
    assert first["num_nodes"] == second["num_nodes"] == 1
    _trained_like_one_node(first, second)
