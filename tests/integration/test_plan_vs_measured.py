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


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    workdir = str(tmp_path_factory.mktemp("plan_vs_measured"))
    # Freed tensors go back to the system: the peak RSS then counts live memory, not the
    # blocks glibc's heap keeps after them. (Process-wide; harmless for later tests.)
    if not profile_strategy.mmap_large_allocations(64 * 1024):
        pytest.skip("needs glibc's mallopt")
    profile_strategy.profile_run("warmup", [*RUN, "strategy=seq_ft", "trainer.steps_per_task=1"], workdir)
    return {name: profile_strategy.profile_run(name, [*RUN, *extra], workdir) for name, extra in STRATEGIES.items()}


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
