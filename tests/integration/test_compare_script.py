"""scripts/compare_strategies.py: runs each strategy once, skips finished runs, writes the
comparison (markdown with each R matrix, CSV, plot)."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from tests.helpers import REPO

TINY = ["task_stream.train_size=300", "task_stream.test_size=20", "trainer.steps_per_task=20",
        "trainer.batch_size=16", "trainer.checkpoint_every_steps=0"]


def compare(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "compare_strategies.py"), "--preset", "none",
                           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow  # two real runs and three reports; the report itself is tested in tests/unit/test_seed_report.py
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

    # A later batch beside it: its own folder, and a section of the top report, replaced when rewritten.
    for _ in range(2):
        later = compare(tmp_path, "--report-only", "--section", "later")
        assert later.returncode == 0, later.stderr[-3000:]
    top = (tmp_path / "out" / "comparison.md").read_text()
    assert top.startswith(md.rstrip("\n"))  # the earlier report stays as it was
    assert top.count("<!-- section later:") == 1 and top.count("<!-- end of section later -->") == 1
    assert "[later/](later/comparison.md)" in top and "--report-only --section later" in top
    assert (tmp_path / "out" / "later" / "comparison.md").read_text().count("| after \\ task |") == 2


@pytest.mark.slow  # four real runs; the seed statistics are unit-tested in tests/unit/test_seed_report.py
def test_compare_over_seeds_groups_them_and_subtracts_seq_ft(tmp_path):
    done = compare(tmp_path, "--only", "seq_ft", "rewarm_replay", "--seeds", "0", "1", "--", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "rewarm_replay_s0", "rewarm_replay_s1", "seq_ft_s0", "seq_ft_s1"]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "(seeds 0, 1)" in md and "## seq_ft_s1: `(defaults)`" in md
    assert "| seq_ft | tiny_gpt2 | 2 (0,1) |" in md
    assert "difference from seq_ft, paired by seed" in md
    rows = {r["strategy"]: r for r in csv.DictReader((tmp_path / "out" / "comparison_seeds.csv").open())}
    assert rows["seq_ft"]["n_seeds"] == "2" and rows["seq_ft"]["ACC_interval"] == "t"
    assert [r["n_pairs"] for s, r in rows.items() if s != "seq_ft"] == ["2"]
    assert (tmp_path / "out" / "forgetting_curves.png").stat().st_size > 0

    # A later call adds a seed to the same runs; --report-only rewrites the report from all of them.
    more = compare(tmp_path, "--only", "seq_ft", "--seeds", "2", "--", *TINY)
    assert more.returncode == 0, more.stderr[-3000:]
    report = compare(tmp_path, "--report-only")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "[compare]" not in report.stdout.replace("[compare] wrote", "")  # nothing ran
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "(seeds 0, 1, 2)" in md and "| seq_ft | tiny_gpt2 | 3 (0,1,2) |" in md
    assert "cost relative to seq_ft" in md and "| rewarm_replay | tiny_gpt2 | 2 (0,1) |" in md
