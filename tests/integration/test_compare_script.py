"""scripts/compare_strategies.py: runs each strategy once, skips finished runs, writes the
comparison (markdown with each R matrix, CSV, plot)."""
from __future__ import annotations

import csv
import subprocess
import sys

from tests.conftest import REPO

TINY = ["task_stream.train_size=300", "task_stream.test_size=20", "trainer.steps_per_task=20",
        "trainer.batch_size=16", "trainer.checkpoint_every_steps=0"]


def compare(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "compare_strategies.py"), "--preset", "none",
                           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def test_compare_runs_each_strategy_once_and_writes_the_comparison(tmp_path):
    first = compare(tmp_path, "--only", "seq_ft", "rewarm_replay", "--", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "## seq_ft" in md and "## rewarm_replay: `strategy=rewarm_replay`" in md
    assert md.count("| after \\ task |") == 2
    rows = list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))
    assert len(rows) == 2
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0

    again = compare(tmp_path, "--only", "seq_ft", "--", *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "seq_ft: done before, skipped" in again.stdout
