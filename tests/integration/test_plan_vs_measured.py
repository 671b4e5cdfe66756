"""The memory plan (`cl-run dry_run=true`) against measured peaks, on a CPU: seq_ft,
svd_orthogonal, EWC and OPCM on a LLaMA-shaped tiny_llama widened to 3.3M parameters
(13 MB of fp32 weights, so the tensors stand out from the process's own memory), one
process, run in-process by scripts/profile_strategy.py (peak RSS above the floor the
process held before the run was built). The strategy state the plan counts is the state
the run holds, byte for byte; the plan's total is within 20% of the measured peak.
Two FSDP processes: scripts/bench_memory.py --worlds 2 (slow)."""
from __future__ import annotations

import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_memory  # noqa: E402
import profile_strategy  # noqa: E402

MODEL = ["model=tiny_llama", "model.architecture_config.hidden_size=256",
         "model.architecture_config.intermediate_size=688", "model.architecture_config.num_hidden_layers=4"]
RUN = [*profile_strategy.RUN, *MODEL, "trainer.steps_per_task=2", "trainer.batch_size=4", "task_stream.train_size=16",
       "task_stream.max_test_per_task=2", "task_stream.order=[increment,decrement]"]
STRATEGIES = {"seq_ft": ["strategy=seq_ft"], "ewc": ["strategy=ewc"], "opcm": ["strategy=opcm"],
              "svd_orthogonal": ["strategy=svd_orthogonal", "strategy.rank.mode=ratio"]}


# Run in a fresh process: inside the suite the heap that earlier tests left behind moved the
# peaks by several MB (EWC measured at 0.79 of its plan there, 0.87 alone).
MEASURE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import profile_strategy
run, strategies, workdir = json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
# Freed tensors go back to the system: the peak RSS then counts live memory, not the
# blocks glibc's heap keeps after them.
if not profile_strategy.mmap_large_allocations(64 * 1024):
    print(json.dumps(None)); raise SystemExit
profile_strategy.profile_run("warmup", [*run, "strategy=seq_ft", "trainer.steps_per_task=1"], workdir)
print(json.dumps({name: profile_strategy.profile_run(name, [*run, *extra], workdir) for name, extra in strategies.items()}))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    import json
    import os
    import subprocess

    workdir = str(tmp_path_factory.mktemp("plan_vs_measured"))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(REPO / "scripts"), json.dumps(RUN), json.dumps(STRATEGIES),
                           workdir], cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result is None:
        pytest.skip("needs glibc's mallopt")
    return result


def plan(name: str):
    return bench_memory.plan_for(["logger=none", *RUN, *STRATEGIES[name]], 1, "none")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_plan_counts_the_strategy_state_the_run_holds(measured, name):
    assert plan(name).bytes_of("strategy state") == measured[name]["strategy_state_bytes"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_plan_total_is_within_20_percent_of_the_measured_peak(measured, name):
    run = measured[name]
    above_floor = run["peak_bytes"] - run["floor_bytes"]
    check = bench_memory.compare_plan(plan(name).per_rank_total, above_floor, bench_memory.not_counted(plan(name)))
    assert check["plan_within"], (name, check["plan_ratio"])
