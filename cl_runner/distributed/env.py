"""torch.distributed's variables from a SLURM task's environment.

`torchrun` and `accelerate launch` give every process RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. A SLURM job step (`srun`, or Hydra's submitit launcher with
`hydra.launcher.tasks_per_node=8`) starts one process per task and gives it SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID and the node list instead. `init_from_slurm()`, called by
cl-run at the start of each Hydra job before the Accelerator is made, maps the one onto
the other so the tasks of one job form one torch.distributed job:

    RANK = SLURM_PROCID, WORLD_SIZE = tasks in the step, LOCAL_RANK = SLURM_LOCALID,
    LOCAL_WORLD_SIZE = tasks on this node, MASTER_ADDR = first host of the node list,
    MASTER_PORT = 15000 + job id mod 15000 (below Linux's ephemeral ports).

It does nothing when a launcher already set RANK/WORLD_SIZE/LOCAL_RANK (torchrun inside
an allocation), outside SLURM, or for a single task (SLURM_NTASKS=1: a plain
single-process run). A MASTER_ADDR or MASTER_PORT already set is kept.
CL_RUNNER_SLURM_ENV=0 turns the mapping off (e.g. a batch script started with
--ntasks=8 that runs cl-run directly rather than through srun: its one process would
otherwise wait for seven that never come).

submitit's own `JobEnvironment` reads these same variables; it is not needed here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Callable, Mapping, MutableMapping, Optional

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
PORT_BASE = 15000
PORT_SPAN = 15000  # ports 15000..29999: under the ephemeral range (32768+), above the well-known ones
SWITCH = "CL_RUNNER_SLURM_ENV"


class SlurmEnvError(ValueError):
    """A SLURM environment that cannot be turned into a torch.distributed job."""


def _split_top_level(nodelist: str) -> list[str]:
    """'a[1-2],b,c[3,5]' -> ['a[1-2]', 'b', 'c[3,5]'] (commas inside brackets kept)."""
    parts, current, depth = [], [], 0
    for ch in nodelist:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmEnvError(f"nested brackets in node list {nodelist!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"unbalanced ']' in node list {nodelist!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise SlurmEnvError(f"unbalanced '[' in node list {nodelist!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_group(group: str, nodelist: str) -> list[str]:
    """'node[01-03]' -> node01..node03; several brackets expand as a product, left first."""
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", group)
    if match is None:
        if "[" in group or "]" in group:
            raise SlurmEnvError(f"cannot read node group {group!r} in {nodelist!r}")
        return [group]
    prefix, body, rest = match.groups()
    tails = _expand_group(rest, nodelist)
    hosts = []
    for item in body.split(","):
        item = item.strip()
        bounds = item.split("-")
        if len(bounds) == 1 and item.isdigit():
            numbers = [item]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])  # node[08-10] keeps the zero padding: node08, node09, node10
            numbers = [str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise SlurmEnvError(f"cannot read range {item!r} in node list {nodelist!r}")
        hosts += [prefix + number + tail for number in numbers for tail in tails]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order:
    'node[01-03],other' -> ['node01', 'node02', 'node03', 'other'];
    'gpu[1,4-5]-ib' -> ['gpu1-ib', 'gpu4-ib', 'gpu5-ib']. SlurmEnvError on a form it cannot read."""
    hosts = [host for group in _split_top_level(nodelist) for host in _expand_group(group, nodelist)]
    if not hosts:
        raise SlurmEnvError(f"empty node list {nodelist!r}")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """expand_nodelist, or `scontrol show hostnames` for a form it cannot read (when scontrol is there)."""
    try:
        return expand_nodelist(nodelist)
    except SlurmEnvError:
        if shutil.which("scontrol") is None:
            raise
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60)
        hosts = done.stdout.split()
        if done.returncode != 0 or not hosts:
            raise SlurmEnvError(f"scontrol show hostnames {nodelist!r} failed: {done.stderr.strip()}") from None
        return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE's form, one entry per node: '8(x2),4' -> [8, 8, 4]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise SlurmEnvError(f"cannot read tasks per node {spec!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def master_port_for(job_id: str) -> int:
    """A rendezvous port from the job id: the same for every task of a job, different for
    jobs that share a node (ids closer than PORT_SPAN), never an ephemeral port."""
    digits = re.sub(r"\D", "", job_id or "")
    return PORT_BASE + (int(digits) if digits else 0) % PORT_SPAN


def _first(env: Mapping[str, str], *names: str) -> Optional[str]:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _integer(env: Mapping[str, str], name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SlurmEnvError(f"{name}={value!r} is not a number") from None


def slurm_to_torch_env(env: Mapping[str, str],
                       expand: Callable[[str], list[str]] = expand_nodelist) -> dict[str, str]:
    """The torch.distributed variables for the SLURM task described by `env` (pure: reads
    `env`, changes nothing), or {} when there is nothing to set: a launcher already set
    RANK/WORLD_SIZE/LOCAL_RANK, `env` is not a SLURM task, or the step has one task."""
    if any(name in env for name in LAUNCHER_VARIABLES):
        return {}
    procid = _first(env, "SLURM_PROCID")
    ntasks = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if procid is None or ntasks is None:
        return {}
    world = _integer(env, "SLURM_NTASKS", ntasks)
    if world <= 1:
        return {}
    rank = _integer(env, "SLURM_PROCID", procid)
    if not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is outside the job's {world} tasks")

    nodelist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = expand(nodelist) if nodelist else None
    local_world = None
    per_node = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node is not None:
        counts = parse_tasks_per_node(per_node)
        node = _integer(env, "SLURM_NODEID", _first(env, "SLURM_NODEID") or "0")
        if node < len(counts):
            local_world = counts[node]
    if local_world is None and _first(env, "SLURM_NTASKS_PER_NODE"):
        local_world = _integer(env, "SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS_PER_NODE"])
    if local_world is None:
        local_world = -(-world // len(hosts)) if hosts else world
    local_rank = _first(env, "SLURM_LOCALID")
    local = _integer(env, "SLURM_LOCALID", local_rank) if local_rank is not None else rank % local_world

    found = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
             "LOCAL_WORLD_SIZE": str(local_world)}
    if not _first(env, "MASTER_ADDR"):
        if not hosts:
            raise SlurmEnvError(f"SLURM task {rank} of {world} has no node list (SLURM_JOB_NODELIST) to find "
                                "rank 0's host; set MASTER_ADDR")
        found["MASTER_ADDR"] = hosts[0]
    if not _first(env, "MASTER_PORT"):
        found["MASTER_PORT"] = str(master_port_for(_first(env, "SLURM_JOB_ID") or ""))
    return found


def init_from_slurm(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Set torch.distributed's variables in `environ` (os.environ) from SLURM's, when this
    process is one of several SLURM tasks and no launcher set them; returns what was set."""
    environ = os.environ if environ is None else environ
    if environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    found = slurm_to_torch_env(environ, hostnames)
    environ.update(found)
    if found.get("RANK") == "0":
        addr = environ.get("MASTER_ADDR")
        port = environ.get("MASTER_PORT")
        print(f"[cl-run] SLURM job {environ.get('SLURM_JOB_ID', '?')}: {found['WORLD_SIZE']} processes "
              f"({found['LOCAL_WORLD_SIZE']} a node), rendezvous at {addr}:{port}", flush=True)
    return found
