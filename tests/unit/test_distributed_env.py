"""SLURM tasks become one torch.distributed job: the variable mapping on hand-made SLURM
environments, node-list expansion, and the submitit launcher config (one task per GPU)
as composed and as written into the sbatch script."""
from __future__ import annotations

import os

import pytest

from cl_runner.distributed.env import (PORT_BASE, PORT_SPAN, SlurmEnvError, expand_nodelist, init_from_slurm,
                                       master_port_for, parse_tasks_per_node, slurm_to_torch_env)
from tests.helpers import REPO

# Task 11 of a 2-node x 8-task job, as srun (submitit) starts it.
TWO_NODES = {
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_NTASKS_PER_NODE": "8",
}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03],other", ["node01", "node02", "node03", "other"]),
    ("localhost", ["localhost"]),
    ("127.0.0.1", ["127.0.0.1"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("a[1,3-4],b[7]", ["a1", "a3", "a4", "b7"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("gpu[1,4]-ib,login", ["gpu1-ib", "gpu4-ib", "login"]),
    ("x.example.org,y.example.org", ["x.example.org", "y.example.org"]),
])
def test_node_lists_expand_in_order(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "node[a-b]", "node[3-1]", "node[[1]]", ""])
def test_unreadable_node_lists_are_refused_by_name(bad):
    with pytest.raises(SlurmEnvError):
        expand_nodelist(bad)


def test_tasks_per_node_form():
    assert parse_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert parse_tasks_per_node("2") == [2]
    with pytest.raises(SlurmEnvError):
        parse_tasks_per_node("8x2")


def test_port_comes_from_the_job_id_in_a_safe_range():
    assert master_port_for("4242") == master_port_for("4242") == PORT_BASE + 4242
    assert master_port_for("4242") != master_port_for("4243")
    for job_id in ("0", "1", "14999", "15000", "99999999", "123_4", ""):
        assert PORT_BASE <= master_port_for(job_id) < PORT_BASE + PORT_SPAN < 32768  # below ephemeral ports


def test_a_task_of_a_two_node_job_gets_its_rank_and_the_first_node_as_master():
    assert slurm_to_torch_env(TWO_NODES) == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(PORT_BASE + 4242)}


def test_rank_zero_on_one_node_and_the_older_variable_names():
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_NODELIST": "localhost"}
    assert slurm_to_torch_env(env) == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                                       "MASTER_ADDR": "localhost", "MASTER_PORT": str(PORT_BASE + 77)}


def test_the_step_wins_over_the_allocation():
    """srun inside a bigger allocation: the step's task count, node list and layout."""
    env = {**TWO_NODES, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu08", "SLURM_STEP_TASKS_PER_NODE": "4"}
    found = slurm_to_torch_env(env)
    assert (found["WORLD_SIZE"], found["LOCAL_WORLD_SIZE"], found["MASTER_ADDR"]) == ("4", "4", "gpu08")


def test_uneven_nodes_and_missing_local_id():
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "3,2"}
    found = slurm_to_torch_env(env)
    assert found["LOCAL_WORLD_SIZE"] == "2" and found["LOCAL_RANK"] == str(4 % 2)
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert slurm_to_torch_env(env)["LOCAL_WORLD_SIZE"] == "4"  # no layout given: tasks / nodes


def test_existing_master_address_and_port_are_kept():
    found = slurm_to_torch_env({**TWO_NODES, "MASTER_PORT": "29555", "MASTER_ADDR": "10.0.0.1"})
    assert "MASTER_PORT" not in found and "MASTER_ADDR" not in found
    assert slurm_to_torch_env({**TWO_NODES, "MASTER_PORT": "29555"})["MASTER_ADDR"] == "gpu07"


@pytest.mark.parametrize("env", [
    {},  # not SLURM
    {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODELIST": "n1"},
    {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n1"},  # salloc shell: no task of a step
    {**TWO_NODES, "RANK": "0"},  # torchrun inside the allocation already set them
    {**TWO_NODES, "WORLD_SIZE": "8"},
    {**TWO_NODES, "LOCAL_RANK": "0"},
], ids=["no_slurm", "one_task", "no_procid", "rank_set", "world_set", "local_rank_set"])
def test_nothing_to_do_leaves_a_single_process_or_the_launcher_alone(env):
    assert slurm_to_torch_env(env) == {}
    copy = dict(env)
    assert init_from_slurm(copy) == {} and copy == env


def test_inconsistent_environments_fail_naming_the_variable():
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID=16"):
        slurm_to_torch_env({**TWO_NODES, "SLURM_PROCID": "16"})
    with pytest.raises(SlurmEnvError, match="MASTER_ADDR"):
        slurm_to_torch_env({k: v for k, v in TWO_NODES.items() if k != "SLURM_JOB_NODELIST"})


def test_init_sets_the_variables_and_can_be_switched_off(capsys):
    env = {**TWO_NODES, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    assert init_from_slurm(env)["RANK"] == "0"
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "16", "gpu07")
    assert "[cl-run] SLURM job 4242: 16 processes (8 a node), rendezvous at gpu07:" in capsys.readouterr().out
    off = {**TWO_NODES, "CL_RUNNER_SLURM_ENV": "0"}
    assert init_from_slurm(off) == {} and "RANK" not in off


# --- the launcher config --------------------------------------------------------------

def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra.job.name} etc. resolve as in a run
    return cfg


SWEEP_8x2 = ["launcher=submitit_slurm", "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=8",
             "hydra.launcher.nodes=2"]


def test_slurm_launcher_composes_with_one_task_per_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = compose_with_hydra(SWEEP_8x2).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.cpus_per_task >= 1 and launcher.timeout_min > 0 and launcher.partition is None

    default = compose_with_hydra(["launcher=submitit_slurm"]).hydra.launcher
    assert (default.nodes, default.tasks_per_node, default.gpus_per_node) == (1, 1, 1)
    assert default.mem_gb is None and default.mem_per_gpu  # memory grows with the GPUs
    follows = compose_with_hydra(["launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4"]).hydra.launcher
    assert follows.tasks_per_node == 4, "tasks_per_node follows gpus_per_node unless set"


def test_the_sbatch_script_asks_for_the_nodes_tasks_and_gpus(tmp_path, monkeypatch):
    """The Hydra launcher, instantiated from the composed config, writes the sbatch
    script the cluster would get (submission itself stubbed out; a fake `srun` on PATH)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra.utils import instantiate

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    cfg = compose_with_hydra(SWEEP_8x2 + ["hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    scripts = []

    def map_array(executor, fn, *args):
        scripts.append(executor._executor._make_submission_file_text("python -m submitit.core._submit x", "0"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    (script,) = scripts
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                 "--partition=gpu", "--time=720", "--mem-per-gpu=64G"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "--mem=" not in script
    assert "srun --unbuffered" in script  # one process per task, each running the Hydra job


def test_the_readme_slurm_recipe_composes_and_validates():
    """docs/scale.md's 2 nodes x 8 GPUs FSDP + bf16 sweep, one of its configs (trace_paper brings
    trainer=finetune, which must take trainer.sharding too)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from omegaconf import open_dict

    from cl_runner.config.validate import validate

    cfg = compose_with_hydra([
        "launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8", "hydra.launcher.mem_per_gpu=120G",
        "hydra.launcher.timeout_min=1440", "experiment=trace_paper", "task_stream.data_dir=/data/TRACE",
        "model=llama2_7b_chat", "trainer.sharding=fsdp", "trainer.precision=bf16", "trainer.batch_size=4",
        "strategy=svd_orthogonal", "seed=1"])
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    with open_dict(cfg):
        del cfg["hydra"]
    run = validate(cfg)
    assert (run.trainer.sharding, run.trainer.precision, run.model.name) == ("fsdp", "bf16", "llama2_7b_chat")
