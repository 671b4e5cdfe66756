"""Two SLURM tasks make one distributed run: two `python -m cl_runner.cli` processes
started as srun/submitit would start them (SLURM_PROCID 0/1 of SLURM_NTASKS=2 on one
node, no torchrun variables) become one gloo job: one run folder, world size 2, with and
without FSDP sharding."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

TINY = ["logger=none", "model=tiny_llama", "trainer.steps_per_task=3", "task_stream.train_size=64",
        "task_stream.test_size=10", "task_stream.order=[increment,decrement]", "trainer.progress_bar=false",
        "trainer.batch_size=8"]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_tasks(overrides: list[str], cwd, ntasks: int = 2) -> list[subprocess.CompletedProcess]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARIABLES}
    base.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SLURM_JOB_ID": "31337",
                 "SLURM_NTASKS": str(ntasks), "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port())})
    procs = []
    for rank in range(ntasks):
        env = {**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "cl_runner.cli", *overrides], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


# The mapping is the same with and without sharding; the unsharded job is in make test-all.
@pytest.mark.parametrize("sharding", [pytest.param("none", marks=pytest.mark.slow), "fsdp"])
def test_two_slurm_tasks_make_one_distributed_run(sharding, tmp_path):
    run_dir = tmp_path / "run"
    done = slurm_tasks(TINY + [f"trainer.sharding={sharding}", f"output_dir={run_dir}"], tmp_path)
    for rank, proc in enumerate(done):
        assert proc.returncode == 0, (rank, proc.stderr[-4000:])
    out = "".join(proc.stdout for proc in done)
    assert out.count("[cl-run] run folder:") == 1, "only rank 0 reports and makes the folder"
    assert out.count("[cl-run] SLURM job 31337: 2 processes (2 a node), rendezvous at 127.0.0.1:") == 1
    assert not (tmp_path / "results").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 2
    assert metrics["distributed"]["sharding"] == sharding
    assert metrics["tasks"] == ["increment", "decrement"]
    assert len(metrics["R"]) == 3 and all(len(row) == 2 for row in metrics["R"])  # before training + after each task


@pytest.mark.slow  # the two-task cases above go through the same SLURM set-up
def test_one_slurm_task_stays_a_single_process(tmp_path):
    run_dir = tmp_path / "run"
    (proc,) = slurm_tasks(TINY + [f"output_dir={run_dir}"], tmp_path, ntasks=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SLURM job" not in proc.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["distributed"]["world_size"] == 1
