"""Plots write readable PNGs; cl-report finds runs, compares them and writes CSV + PNG."""
import csv
import io
import json
import shutil

import pytest

from cl_runner.evaluation.metrics import summarize
from cl_runner.reporting.plots import plot_accuracy_matrix, plot_forgetting_curves, plot_run_comparison
from cl_runner.reporting.report import format_bytes, format_duration, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["reverse", "sort", "increment"]
R_SEQ = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.9, 0.0], [0.1, 0.3, 1.0]]
R_MT = [[0.0, 0.0, 0.0], [1.0, 0.9, 1.0], [1.0, 0.9, 1.0], [1.0, 0.9, 1.0]]


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


# --- plots ----------------------------------------------------------------------------


def test_plot_accuracy_matrix(tmp_path):
    out = plot_accuracy_matrix(R_SEQ, TASKS, tmp_path / "sub" / "R.png", title="seq_ft")
    assert out == tmp_path / "sub" / "R.png" and _is_png(out)


def test_plots_handle_a_run_in_progress_and_15_tasks(tmp_path):
    T = 15
    names = [f"task{j}" for j in range(T)]
    R = [[0.5] * T] + [[0.7] * T for _ in range(4)] + [[None] * T for _ in range(T - 4)]
    assert _is_png(plot_accuracy_matrix(R, names, tmp_path / "R.png"))
    assert _is_png(plot_forgetting_curves(R, names, tmp_path / "curves.png"))


def test_plot_forgetting_curves(tmp_path):
    assert _is_png(plot_forgetting_curves(R_SEQ, TASKS, tmp_path / "curves.png"))


def test_plot_checks_task_names(tmp_path):
    with pytest.raises(ValueError, match="2 names but R has T = 3"):
        plot_accuracy_matrix(R_SEQ, TASKS[:2], tmp_path / "R.png")


def test_plot_run_comparison(tmp_path):
    runs = {
        "seq_ft": summarize(R_SEQ, TASKS),
        "multitask": summarize(R_MT, TASKS),
        "one task": summarize([[0.2], [0.8]], ["x"]),  # BWT and F are None: drawn as n/a
    }
    assert _is_png(plot_run_comparison(runs, tmp_path / "cmp.png"))
    with pytest.raises(ValueError, match="at least one run"):
        plot_run_comparison({}, tmp_path / "none.png")


# --- cl-report ------------------------------------------------------------------------


def _write_run(folder, run_id, strategy, R, stream="synthetic", model="tiny-gpt2", wall=34.2, memory=512 * 2**20,
               tasks=TASKS, environment=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"strategy: {strategy}\n")
    metrics = summarize(R, tasks)
    metrics.update(
        run_id=run_id, strategy=strategy, task_stream=stream, model=model, tasks=tasks, R=R,
        wall_time_s=wall, peak_memory_bytes=memory, strategy_extra_bytes=0,
    )
    if environment is not None:
        metrics["environment"] = environment
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def two_runs(tmp_path):
    root = tmp_path / "runs"
    # seq_ft: ACC = (0.1 + 0.3 + 1.0) / 3 = 0.467, BWT = ((0.1-1) + (0.3-0.9)) / 2 = -0.75
    _write_run(root / "2024-01-01_seq", "seq-s0", "seq_ft", R_SEQ)
    # multitask: ACC = (1 + 0.9 + 1) / 3 = 0.967 -> the reference; gap of seq_ft = -0.5
    _write_run(root / "2024-01-01_mt", "mt-s0", "multitask", R_MT, wall=4000.0, memory=3 * 2**30)
    return root


def test_report_table(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(two_runs), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "== synthetic: reverse, sort, increment (2 runs) =="
    header = lines[1].split()
    assert header == ["run", "model", "stream", "strategy", "ACC", "gap", "BWT", "FWT", "F", "LA", "time", "memory"]
    mt_row, seq_row = lines[3].split(), lines[4].split()  # sorted by ACC, best first
    assert mt_row[:6] == ["mt-s0", "tiny-gpt2", "synthetic", "multitask", "0.967", "ref"]
    assert mt_row[-3:] == ["1h06m", "3.00", "GiB"]
    assert seq_row[:8] == ["seq-s0", "tiny-gpt2", "synthetic", "seq_ft", "0.467", "-0.500", "-0.750", "+0.000"]
    assert seq_row[8:11] == ["0.750", "0.967", "34.2s"]
    # aligned columns: numbers are right-aligned under their header
    acc_end = lines[1].index(" ACC") + len(" ACC")
    assert lines[3][acc_end - 5 : acc_end] == "0.967" and lines[4][acc_end - 5 : acc_end] == "0.467"
    assert "ref = multitask upper bound" in text and "mt-s0" in text


def test_report_csv_and_png(two_runs, tmp_path):
    out = tmp_path / "report"
    assert main([str(two_runs), "--out", str(out)]) == 0
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["mt-s0", "seq-s0"]
    seq = rows[1]
    assert seq["strategy"] == "seq_ft" and seq["stream"] == "synthetic"
    assert float(seq["ACC"]) == pytest.approx(1.4 / 3)
    assert float(seq["gap_to_multitask"]) == pytest.approx(1.4 / 3 - 2.9 / 3)
    assert seq["reference_run"] == "mt-s0"
    assert float(seq["BWT"]) == pytest.approx(-0.75)
    assert seq["peak_memory_bytes"] == str(512 * 2**20)
    assert seq["num_tasks"] == "3"
    assert rows[0]["gap_to_multitask"] == "0.0"
    assert _is_png(out / "comparison.png")


def test_report_defaults_out_to_first_path(two_runs):
    assert main([str(two_runs)]) == 0
    assert (two_runs / "comparison.csv").exists() and _is_png(two_runs / "comparison.png")


def test_report_markdown_and_csv_formats(two_runs, tmp_path, capsys):
    assert main([str(two_runs), "--out", str(tmp_path), "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "### synthetic: reverse, sort, increment (2 runs)" in text
    assert "| mt-s0 | tiny-gpt2 | synthetic | multitask | 0.967 | ref |" in text
    assert main([str(two_runs), "--out", str(tmp_path), "--format", "csv"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("stream,model,strategy,run,ACC")
    assert printed.strip() == (tmp_path / "comparison.csv").read_text().strip()


def test_report_sort_and_groups(two_runs, tmp_path, capsys):
    _write_run(two_runs / "other", "other-s0", "seq_ft", R_SEQ, stream="trace")
    assert main([str(two_runs), "--out", str(tmp_path), "--sort", "time"]) == 0
    text = capsys.readouterr().out
    assert text.index("== synthetic: ") < text.index("== trace: reverse, sort, increment (1 run) ==")
    synthetic = text.split("== trace:")[0]
    assert synthetic.index("seq-s0") < synthetic.index("mt-s0")  # shortest time first
    assert "no multitask run over these tasks" in text


def test_report_gap_only_against_the_same_model(two_runs, tmp_path, capsys):
    _write_run(two_runs / "big", "big-s0", "seq_ft", R_SEQ, model="llama-7b")
    assert main([str(two_runs), "--out", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("big-s0"))
    assert row.split()[5] == "-"


def test_report_without_metrics_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no metrics.json found under" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_report_skips_a_broken_file_and_says_so(two_runs, tmp_path, capsys):
    broken = two_runs / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(json.dumps({"run_id": "x", "ACC": 0.5}))
    assert main([str(two_runs), "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "missing strategy, task_stream, model" in err


def test_report_accepts_a_metrics_file_path(two_runs, tmp_path, capsys):
    path = two_runs / "2024-01-01_seq" / "metrics.json"
    assert main([str(path), "--out", str(tmp_path)]) == 0
    assert "seq-s0" in capsys.readouterr().out


def test_human_units():
    assert format_duration(None) == "-"
    assert format_duration(42.04) == "42.0s"
    assert format_duration(725) == "12m05s"
    assert format_duration(3 * 3600 + 7 * 60) == "3h07m"
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(512 * 2**20) == "512.0 MiB"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"


def test_report_names_what_differs_within_a_sweep(tmp_path, capsys):
    """Two EWC runs of a lambda sweep read `ewc (ewc_lambda=...)`; settings that differ
    without changing the experiment (paths, names, logging) are not listed; a strategy
    with a single run stays bare."""
    root = tmp_path / "sweep"
    for name, strategy, lam, out in (("a", "ewc", 0.1, "/x/a"), ("b", "ewc", 10.0, "/x/b"), ("c", "seq_ft", None, "/x/c")):
        _write_run(root / name, name, strategy, R_SEQ)
        config = {"strategy": {"name": strategy, **({"ewc_lambda": lam, "mode": "online"} if lam else {})},
                  "trainer": {"lr": 0.003, "progress_bar": name == "a"}, "output_dir": out, "seed": 0}
        (root / name / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    assert main([str(root), "--out", str(tmp_path / "out"), "--format", "csv"]) == 0
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert rows["a"]["strategy"] == "ewc" and rows["a"]["settings"] == "ewc_lambda=0.1"
    assert rows["b"]["settings"] == "ewc_lambda=10.0"
    assert rows["c"]["settings"] == ""
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "ewc (ewc_lambda=0.1)" in text and "ewc (ewc_lambda=10.0)" in text


def test_a_key_only_some_runs_have_is_not_a_setting(tmp_path, capsys):
    """Runs written by different cl-runner versions: a key one schema has and the other
    lacks (added or renamed since) does not make a setting; a value both have does."""
    root = tmp_path / "versions"
    for name, extra, lr in (("old", {}, 0.003), ("new", {"evaluation": {"monitor": []}}, 0.001)):
        _write_run(root / name, name, "seq_ft", R_SEQ)
        config = {"strategy": {"name": "seq_ft"}, "trainer": {"lr": lr}, "seed": 0, **extra}
        (root / name / "config.yaml").write_text(json.dumps(config))
    assert main([str(root), "--out", str(tmp_path / "out"), "--format", "csv"]) == 0
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert rows["old"]["settings"] == "trainer.lr=0.003" and rows["new"]["settings"] == "trainer.lr=0.001"


def test_report_groups_by_task_list_not_stream_name(two_runs, tmp_path, capsys):
    """A 2-task run of the same stream (task_stream.order=[reverse,sort]) is not compared
    with the 3-task multitask run: its own group, no reference, no gap. A run whose
    metrics.json lacks the task list is grouped by its R.csv header."""
    two = ["reverse", "sort"]
    _write_run(two_runs / "short", "short-s0", "seq_ft", [[0.0, 0.0], [1.0, 0.0], [0.1, 1.0]], tasks=two)
    old = two_runs / "old"
    _write_run(old, "old-s0", "seq_ft", R_SEQ)
    data = json.loads((old / "metrics.json").read_text())
    del data["tasks"]
    (old / "metrics.json").write_text(json.dumps(data))
    (old / "R.csv").write_text("tasks_learned,after,reverse,sort,increment\n0,before training,0,0,0\n")
    assert main([str(two_runs), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    short_block = text.split("== synthetic: reverse, sort (1 run) ==")[1]
    assert short_block.splitlines()[3].split()[:6] == ["short-s0", "tiny-gpt2", "synthetic", "seq_ft", "0.550", "-"]
    assert "no multitask run over these tasks" in short_block
    three_block = text.split("== synthetic: reverse, sort, increment (3 runs) ==")[1].split("==")[0]
    assert "old-s0" in three_block and "short-s0" not in three_block
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["short-s0"]["tasks"] == "reverse sort" and rows["short-s0"]["gap_to_multitask"] == ""
    assert rows["old-s0"]["gap_to_multitask"] != ""


def test_report_long_task_lists_read_short():
    from cl_runner.reporting.report import group_label

    names = tuple(f"t{i}" for i in range(15))
    assert group_label(("cl_long", names)) == "cl_long: t0, t1, t2, ..., t13, t14 (15 tasks)"
    assert group_label(("cl_long", names), short=True) == "cl_long (15 tasks)"
    assert group_label(("custom", ())) == "custom"


def test_report_notes_where_the_environments_differ(tmp_path, capsys):
    root = tmp_path / "runs"
    env = {"cl_runner": "0.1.0", "git_commit": "a" * 40, "git_dirty": False, "python": "3.11.7",
           "torch": "2.13.0", "transformers": "5.24.0", "peft": None, "device_names": [], "cpu": "Xeon",
           "torch_threads": 2, "world_size": 1, "hostname": "node1", "command": "cl-run"}
    _write_run(root / "a", "a", "seq_ft", R_SEQ, environment=env)
    _write_run(root / "b", "b", "ewc", R_SEQ, environment={**env, "hostname": "node2", "command": "cl-run x"})
    _write_run(root / "c", "c", "multitask", R_MT,
               environment={**env, "torch": "2.14.1", "torch_threads": 1, "git_dirty": True})
    (root / "d").mkdir()  # an older run: environment.json beside metrics.json only
    _write_run(root / "d" / "run", "d", "hft", R_SEQ)
    (root / "d" / "run" / "environment.json").write_text(json.dumps(env))
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("environment differs"))
    assert note == ("environment differs: git_dirty false vs true (c), torch 2.13.0 vs 2.14.1 (c), "
                    "torch_threads 2 vs 1 (c)")  # host names and command lines do not count
    _write_run(tmp_path / "same" / "a", "a", "seq_ft", R_SEQ, environment=env)
    _write_run(tmp_path / "same" / "b", "b", "ewc", R_SEQ, environment=env)
    _write_run(tmp_path / "same" / "c", "c", "hft", R_SEQ)  # none recorded
    assert main([str(tmp_path / "same"), "--out", str(tmp_path / "out"), "--format", "markdown"]) == 0
    assert "environment differs" not in capsys.readouterr().out


def test_report_names_run_folders_left_out_for_lack_of_metrics(two_runs, tmp_path, capsys):
    killed = two_runs / "2024-01-02_killed"
    killed.mkdir()
    (killed / "config.yaml").write_text(json.dumps({"experiment_name": "default", "seed": 0,
                                                    "task_stream": {"name": "synthetic"}, "strategy": {"name": "ewc"}}))
    wandb_files = two_runs / "2024-01-01_seq" / "wandb" / "offline-run-1" / "files"
    wandb_files.mkdir(parents=True)  # W&B's own config.yaml is no run folder
    (wandb_files / "config.yaml").write_text("task_stream: {value: {}}\nstrategy: {value: {}}\n")
    (two_runs / "configs").mkdir()  # nor is a Hydra config tree
    (two_runs / "configs" / "config.yaml").write_text("defaults:\n  - model: tiny_gpt2\n")
    started = two_runs / "2024-01-03_started"
    started.mkdir()
    (started / "config.yaml").write_text("{}")
    (started / "environment.json").write_text("{}")
    assert main([str(two_runs), "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    left_out = [line for line in err.splitlines() if "left out" in line]
    assert len(left_out) == 2, err
    assert "2024-01-02_killed: no metrics.json" in left_out[0] and "resume=" in left_out[0]
    assert "2024-01-03_started" in left_out[1]
    only_killed = tmp_path / "only"
    shutil.copytree(killed, only_killed / "killed")
    assert main([str(only_killed)]) == 1
    err = capsys.readouterr().err
    assert "left out" in err and "no metrics.json found" in err
