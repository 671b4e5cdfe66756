"""evaluation.monitor: tasks scored at every row of R (row 0 included) but never trained,
reported beside R (metrics.json, monitor.csv, the summary, the tracker, cl-report), kept
across a resume; bad entries fail early with one line."""
from __future__ import annotations

import json

import pytest

from cl_runner.errors import ConfigError
from cl_runner.config.validate import validate
from tests.helpers import compose, run_cl, run_until_crash

# Two short tasks of the tiny GPT-2 and one never-trained task beside them: seconds.
TINY = ["task_stream.order=[increment,decrement]", "task_stream.train_size=64", "task_stream.test_size=8",
        "trainer.steps_per_task=4", "trainer.batch_size=8", "evaluation.monitor=[complement]"]


def test_monitor_row_is_scored_at_every_row_and_never_trained(tmp_path):
    from cl_runner.training.loop import ContinualLoop

    trained: list[str] = []
    original = ContinualLoop._train_task

    def spy(self, t, task, resume_payload=None):
        trained.append(task.name)
        return original(self, t, task, resume_payload)

    ContinualLoop._train_task = spy
    try:
        metrics, run_dir = run_cl(TINY, tmp_path)
    finally:
        ContinualLoop._train_task = original
    assert trained == ["increment", "decrement"]
    assert metrics["tasks"] == ["increment", "decrement"]  # not a column of R
    assert metrics["monitor_tasks"] == ["complement"]
    rows = metrics["monitor"]
    assert len(rows) == len(metrics["R"]) == 3 and all(len(r) == 1 and 0 <= r[0] <= 1 for r in rows)
    assert metrics["monitor_change"]["complement"] == pytest.approx(rows[-1][0] - rows[0][0])
    lines = (run_dir / "monitor.csv").read_text().splitlines()
    assert lines[0] == "tasks_learned,after,complement" and len(lines) == 4
    for t in range(3):  # predictions of the monitor task after every row, row 0 included
        records = [json.loads(x) for x in (run_dir / "predictions" / f"monitor_1_after_{t}.jsonl").read_text().splitlines()]
        assert len(records) == 8 and {r["task"] for r in records} == {"complement"}
    assert (run_dir / "predictions" / "task_2_after_2.jsonl").is_file()


def test_summary_tracker_and_report_show_the_monitor(tmp_path, capsys, monkeypatch):
    from cl_runner.reporting import tracking
    from cl_runner.reporting.report import load_run, main as report_main

    logged: list[tuple[int, dict]] = []
    summaries: list[dict] = []

    class Recorder(tracking.Tracker):
        def log_eval(self, tasks_learned, values):
            logged.append((tasks_learned, dict(values)))

        def summary(self, values):
            summaries.append(dict(values))

    import cl_runner.training.run as run  # where the run makes its tracker

    monkeypatch.setattr(run, "make_tracker", lambda *a, **k: Recorder())
    metrics, run_dir = run_cl(TINY, tmp_path)
    out = capsys.readouterr().out
    assert "monitor (never trained) before training: complement=" in out
    assert "monitor (never trained)" in out and "change" in out.split("monitor (never trained)")[-1]
    assert [t for t, _ in logged] == [0, 1, 2]
    assert all("monitor/complement/score" in v for _, v in logged)
    assert summaries[-1]["monitor_change/complement"] == pytest.approx(metrics["monitor_change"]["complement"])

    run = load_run(run_dir / "metrics.json")
    first, last = metrics["monitor"][0][0], metrics["monitor"][-1][0]
    assert run.monitor == {"complement": (first, last)}
    assert run.monitor_change == pytest.approx(last - first)
    assert report_main([str(run_dir), "--out", str(tmp_path / "report")]) == 0
    shown = capsys.readouterr().out
    assert f"monitor (never trained): {run_dir.name} complement {first:.3f} -> {last:.3f}" in shown
    assert report_main([str(run_dir), "--out", str(tmp_path / "report"), "--format", "csv"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[:2]
    assert header.endswith(",monitor_change") and row.split(",")[-1] != ""


def test_resume_keeps_the_monitor_rows(tmp_path, monkeypatch):
    from cl_runner.checkpoints.files import load_latest_checkpoint

    out = tmp_path / "run"
    run_until_crash([*TINY, f"output_dir={out}"], tmp_path, stop_at_step=6, monkeypatch=monkeypatch)
    _, payload = load_latest_checkpoint(out / "checkpoints")  # saved after task 1
    assert [row[0] is not None for row in payload["progress"].monitor] == [True, True, False]
    resumed, _ = run_cl([f"resume={out}"], tmp_path)
    (tmp_path / "fresh").mkdir()
    fresh, _ = run_cl(TINY, tmp_path / "fresh")
    assert resumed["monitor"] == fresh["monitor"] and resumed["R"] == fresh["R"]


@pytest.mark.parametrize("monitor, message", [
    ("[increment]", r"evaluation\.monitor: increment is also a task of the stream.*never trained"),
    ("[complement,complement]", r"evaluation\.monitor lists complement twice"),
    ("[5]", r"evaluation\.monitor\[0\] is 5"),
])
def test_bad_monitor_entries_fail_at_validation(monitor, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose(["task_stream.order=[increment,decrement]", f"evaluation.monitor={monitor}"]))
    assert "\n" not in str(err.value)


def test_monitor_name_also_in_an_olora_stream_is_refused_case_blind(cl_benchmark_dir):
    with pytest.raises(ConfigError, match=r"sst-2 is also a task of the stream"):
        validate(compose(["task_stream=cl_benchmark", f"task_stream.data_dir={cl_benchmark_dir}",
                          "task_stream.order=[SST-2,agnews]", "evaluation.monitor=[sst-2]"]))


def test_olora_monitor_task_is_built_like_the_streams_tasks(cl_benchmark_dir):
    from cl_runner.streams.build import build_monitor

    cfg = validate(compose(["task_stream=cl_benchmark", f"task_stream.data_dir={cl_benchmark_dir}",
                            "task_stream.order=[agnews]", "task_stream.max_test_per_task=5",
                            "evaluation.monitor=[SST-2]"]))
    [task] = build_monitor(cfg.evaluation.monitor, cfg.task_stream, "causal", 0, ["agnews"])
    assert task.name == "sst-2" and len(task.test) == 5 and task.scorer == "exact_match_normalized"
    assert task.test[0].prompt.startswith("Task:SC\nDataset:SST-2\n")
