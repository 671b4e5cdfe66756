"""cl-report over seeds: grouping runs that differ only in seed, t and bootstrap intervals,
paired differences from a baseline, their CSV and plots, on hand-made run folders."""
import csv
import json
import math

import numpy as np
import pytest

from cl_runner.evaluation.metrics import average_accuracy, summarize
from cl_runner.reporting.item_scores import load_item_scores
from cl_runner.reporting.report import load_run, main
from cl_runner.reporting.seed_groups import (BaselineError, curve_bands, group_by_seed, is_incidental, paired_differences,
                                   summarize_group)
from cl_runner.reporting.stats import Interval, bootstrap_interval, t_interval, t_quantile

TASKS = ["reverse", "sort", "increment"]
T975_2 = 4.302652729749464  # t_{0.975, 2}


def _R(acc_last_row):
    """A 3-task R whose last row is `acc_last_row` (ACC = its mean)."""
    return [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 1.0, 0.0], list(acc_last_row)]


def _write(folder, strategy, seed, R, settings=None, config_extra=None, environment=None, items=None, model="tiny",
           metrics_extra=None):
    """A run folder as cl-run leaves it: config.yaml (JSON is YAML), metrics.json and,
    with `items` ({(i, j): scores}), predictions/task_<j+1>_after_<i>.jsonl."""
    folder.mkdir(parents=True)
    config = {"experiment_name": "x", "seed": seed, "output_dir": str(folder), "task_stream": {"name": "synthetic"},
              "strategy": {"name": strategy, **(settings or {})}, "trainer": {"lr": 0.003, "progress_bar": True},
              "logger": {"name": "none"}}
    for key, value in (config_extra or {}).items():
        section, name = key.split(".")
        config.setdefault(section, {})[name] = value
    (folder / "config.yaml").write_text(json.dumps(config))
    metrics = summarize(R, TASKS)
    metrics.update(run_id=folder.name, strategy=strategy, seed=seed, task_stream="synthetic", model=model,
                   tasks=TASKS, R=R)
    if environment is not None:
        metrics["environment"] = environment
    metrics.update(metrics_extra or {})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for (i, j), scores in (items or {}).items():
        path = folder / "predictions" / f"task_{j + 1}_after_{i}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps({"task": TASKS[j], "score": float(s)}) + "\n" for s in scores))


def _with_items(seed=0, n_items=20):
    """An R and the per-item 0/1 scores behind every cell."""
    rng = np.random.default_rng(seed)
    items, R = {}, [[None] * 3 for _ in range(4)]
    for i in range(4):
        for j in range(3):
            scores = (rng.random(n_items) < 0.2 + 0.2 * i).astype(float)
            items[(i, j)] = scores
            R[i][j] = float(scores.mean())
    return R, items


# --- statistics -------------------------------------------------------------------------


def test_t_quantile_matches_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.9602, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 29, 120):
        for p in (0.9, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def test_t_interval_by_hand():
    interval = t_interval([0.5, 0.6, 0.7])
    half = 4.3027 * 0.1 / math.sqrt(3)  # s = 0.1
    assert interval.method == "t" and interval.n == 3
    assert interval.mean == pytest.approx(0.6)
    assert interval.half_width == pytest.approx(half, rel=1e-4)
    assert (interval.low, interval.high) == pytest.approx((0.6 - half, 0.6 + half), rel=1e-4)
    one = t_interval([0.5, None])
    assert one.mean == 0.5 and one.low is None and one.method == "none"
    assert t_interval([]).mean is None


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    R, items = _with_items()
    table = [[items[(i, j)] for j in range(3)] for i in range(4)]
    first = bootstrap_interval([table], average_accuracy, samples=500, seed=7)
    again = bootstrap_interval([table], average_accuracy, samples=500, seed=7)
    other = bootstrap_interval([table], average_accuracy, samples=500, seed=8)
    assert first == again and first.method == "bootstrap"
    assert (first.low, first.high) != (other.low, other.high)
    assert first.mean == pytest.approx(average_accuracy(R))
    assert first.low < first.mean < first.high
    # the interval is about the standard error of a mean of 60 Bernoulli items (p ~ 0.8) wide
    assert 0.1 < first.high - first.low < 0.4
    # every item scores the same: nothing to resample, a zero-width interval
    flat = [[np.ones(5)] * 3 for _ in range(4)]
    assert bootstrap_interval([flat], average_accuracy, samples=50) == Interval(1.0, 1.0, 1.0, 1, "bootstrap")


# --- grouping -----------------------------------------------------------------------------


def test_two_configs_by_three_seeds_make_two_groups_of_three(tmp_path):
    for seed in range(3):
        # incidental keys differ from seed to seed: output folder, progress bar, threads, logger
        extra = {"trainer.progress_bar": seed == 0, "trainer.cpu_threads": seed + 1, "logger.mode": f"m{seed}"}
        _write(tmp_path / f"ewc_a_s{seed}", "ewc", seed, _R([0.5, 0.6, 0.7]), {"ewc_lambda": 1.0}, extra)
        _write(tmp_path / f"ewc_b_s{seed}", "ewc", seed, _R([0.5, 0.6, 0.7]), {"ewc_lambda": 10.0}, extra)
    runs = [load_run(p) for p in sorted(tmp_path.rglob("metrics.json"))]
    groups = group_by_seed(runs)
    assert sorted(g.n for g in groups) == [3, 3]
    for group in groups:
        assert group.seeds == [0, 1, 2]
        assert len({r.config["strategy.ewc_lambda"] for r in group.runs}) == 1
    # a setting that changes the experiment (not incidental) splits a group
    _write(tmp_path / "ewc_a_lr", "ewc", 3, _R([0.5, 0.6, 0.7]), {"ewc_lambda": 1.0}, {"trainer.lr": 0.1})
    runs = [load_run(p) for p in sorted(tmp_path.rglob("metrics.json"))]
    assert sorted(g.n for g in group_by_seed(runs)) == [1, 3, 3]


def test_incidental_keys_are_the_documented_ones():
    for key in ("seed", "output_dir", "resume", "logger.mode", "trainer.progress_bar", "trainer.cpu_threads",
                "task_stream.data_dir", "evaluation.save_predictions", "ops.backend", "launcher.partition"):
        assert is_incidental(key), key
    for key in ("trainer.lr", "strategy.ewc_lambda", "task_stream.order", "model.name", "evaluation.decoding",
                "seed_extra", "trainer.steps_per_task"):
        assert not is_incidental(key), key


def test_report_table_of_seed_groups(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, acc in enumerate((0.5, 0.6, 0.7)):
        _write(root / f"seq_s{seed}", "seq_ft", seed, _R([acc] * 3))
        _write(root / f"ewc_s{seed}", "ewc", seed, _R([acc + 0.2] * 3), {"ewc_lambda": 1.0})
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    half = f"{T975_2 * 0.1 / math.sqrt(3):.3f}"  # 0.248
    seq = next(line for line in text.splitlines() if line.startswith("seq_ft ") and "(0,1,2)" in line)
    assert seq.split()[:6] == ["seq_ft", "tiny", "3", "(0,1,2)", "0.600", "±"] and seq.split()[6] == half
    assert "ewc (ewc_lambda" not in text  # the seed is no setting: both runs of ewc read "ewc"
    with open(out / "comparison_seeds.csv", newline="") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    assert rows["seq_ft"]["n_seeds"] == "3" and rows["seq_ft"]["seeds"] == "0 1 2"
    assert float(rows["seq_ft"]["ACC_mean"]) == pytest.approx(0.6)
    assert float(rows["seq_ft"]["ACC_low"]) == pytest.approx(0.6 - T975_2 * 0.1 / math.sqrt(3))
    assert float(rows["ewc"]["ACC_high"]) == pytest.approx(0.8 + T975_2 * 0.1 / math.sqrt(3))
    assert rows["ewc"]["ACC_interval"] == "t" and rows["ewc"]["BWT_interval"] == "t"
    assert "baseline" not in rows["ewc"]  # no --baseline: no difference columns
    assert (out / "forgetting_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_seed_group_warns_when_environments_differ(tmp_path, capsys):
    env = {"torch": "2.13.0", "python": "3.11.7", "torch_threads": 2}
    for seed in range(3):
        _write(tmp_path / f"s{seed}", "seq_ft", seed, _R([0.5] * 3),
               environment={**env, "torch": "2.14.1"} if seed == 2 else env)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "seq_ft (tiny): environment differs: torch 2.13.0 vs 2.14.1 (s2)" in text


def test_repeated_seed_is_named(tmp_path):
    _write(tmp_path / "a", "seq_ft", 0, _R([0.5] * 3))
    _write(tmp_path / "b", "seq_ft", 0, _R([0.6] * 3))
    (group,) = group_by_seed([load_run(p) for p in sorted(tmp_path.rglob("metrics.json"))])
    assert group.n == 2 and any("seed 0 appears more than once" in n for n in group.notes)


# --- one seed: bootstrap over test items -------------------------------------------------


def test_single_seed_bootstraps_its_test_items(tmp_path):
    R, items = _with_items()
    _write(tmp_path / "one", "seq_ft", 0, R, items=items)
    run = load_run(tmp_path / "one" / "metrics.json")
    (group,) = group_by_seed([run])
    summarize_group(group, samples=300, seed=1)
    acc = group.intervals["ACC"]
    assert acc.method == "bootstrap" and acc.mean == pytest.approx(run.ACC)
    assert acc.low <= acc.mean <= acc.high
    (again,) = group_by_seed([load_run(tmp_path / "one" / "metrics.json")])
    assert summarize_group(again, samples=300, seed=1).intervals == group.intervals
    bands = curve_bands(group, samples=300)
    mean, low, high = bands["R"]
    assert np.all(low <= mean + 1e-12) and np.all(mean <= high + 1e-12)


def test_single_seed_without_item_scores_has_no_interval(tmp_path, capsys):
    R, items = _with_items()
    _write(tmp_path / "none", "seq_ft", 0, R)  # evaluation.save_predictions=false
    bad = {**items, (3, 1): np.zeros(20)}  # a file that is not the evaluation behind R
    _write(tmp_path / "bad", "ewc", 0, R, items=bad)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("seq_ft ") and "1 (0)" in line)
    assert "[" not in row and "±" not in row  # the value alone
    assert "seq_ft (tiny): one seed, no interval: no per-item scores" in text
    assert "ewc (tiny): one seed, no interval: per-item scores do not match R" in text
    assert load_item_scores(tmp_path / "none", R)[0] is None


# --- paired differences ------------------------------------------------------------------


def test_paired_difference_against_the_baseline(tmp_path, capsys):
    root = tmp_path / "runs"
    seq = {0: 0.5, 1: 0.6, 2: 0.7}
    gain = {0: 0.10, 1: 0.20, 2: 0.15}  # differences by seed: mean 0.15, s 0.05
    for seed in seq:
        _write(root / f"seq_s{seed}", "seq_ft", seed, _R([seq[seed]] * 3))
        _write(root / f"ewc_s{seed}", "ewc", seed, _R([seq[seed] + gain[seed]] * 3))
    _write(root / "ewc_s3", "ewc", 3, _R([0.9] * 3))  # no seq_ft seed 3: not paired
    _write(root / "hft_s5", "hft", 5, _R([0.55] * 3))  # no common seed at all
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--baseline", "seq_ft"]) == 0
    text = capsys.readouterr().out
    half = T975_2 * 0.05 / math.sqrt(3)
    ewc = next(line for line in text.splitlines() if line.startswith("ewc ") and "3 (0,1,2)" in line and " *" in line)
    assert ewc.split()[4:8] == ["+0.150", "±", f"{half:.3f}", "*"]
    assert "hft (tiny): no paired seeds: seeds 5 vs baseline 0,1,2" in text
    assert "differences from seq_ft whose interval excludes 0: ewc (ACC +0.150" in text
    with open(out / "comparison_seeds.csv", newline="") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    assert rows["ewc"]["n_seeds"] == "4" and rows["ewc"]["n_pairs"] == "3"
    assert float(rows["ewc"]["ACC_diff_mean"]) == pytest.approx(0.15)
    assert float(rows["ewc"]["ACC_diff_low"]) == pytest.approx(0.15 - half)
    assert float(rows["ewc"]["ACC_diff_high"]) == pytest.approx(0.15 + half)
    assert rows["ewc"]["ACC_diff_excludes_0"] == "True"
    assert rows["hft"]["n_pairs"] == "0" and rows["hft"]["ACC_diff_mean"] == ""


def test_cost_relative_to_the_baseline_on_the_full_model(tmp_path, capsys):
    """Seconds per step and peak memory as means over seeds, each divided by the
    baseline's mean; an adapter run (`tiny+lora`) is costed against the full model's seq_ft."""
    root = tmp_path / "runs"
    GiB = 2**30
    cost = {  # label: (strategy, model, adapter, [(train_time_s, steps, peak bytes) per seed])
        "seq": ("seq_ft", [(10.0, 10, 2 * GiB), (12.0, 10, 2 * GiB)], None),  # 1.1 s/step, 2 GiB
        "svd": ("svd_orthogonal", [(22.0, 10, 3 * GiB), (22.0, 10, 3 * GiB)], None),  # 2.2 s/step, 3 GiB
        "lora": ("seq_ft", [(5.5, 10, GiB), (5.5, 10, GiB)], "lora"),  # 0.55 s/step, 1 GiB
    }
    for label, (strategy, per_seed, adapter) in cost.items():
        for seed, (train, steps, peak) in enumerate(per_seed):
            extra = {"train_time_s": train, "optimizer_steps": steps, "peak_memory_bytes": peak}
            if adapter:
                extra["adapter"] = {"kind": adapter}
            # The adapter run's own lr is no sweep setting: its model (tiny+lora) tells it apart.
            _write(root / f"{label}_s{seed}", strategy, seed, _R([0.5 + 0.1 * seed] * 3), metrics_extra=extra,
                   config_extra={"trainer.lr": 0.001} if adapter else None)
    assert main([str(root), "--out", str(tmp_path / "out"), "--baseline", "seq_ft"]) == 0
    text = capsys.readouterr().out
    section = text.split("cost relative to seq_ft")[1]
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in section.splitlines()[3:] if line.strip()}
    assert rows["seq_ft tiny"][4:] == ["1.100", "1.00x", "2.00", "GiB", "1.00x"]
    assert rows["svd_orthogonal tiny"][4:] == ["2.200", "2.00x", "3.00", "GiB", "1.50x"]
    assert rows["seq_ft tiny+lora"][4:] == ["0.550", "0.50x", "1.00", "GiB", "0.50x"]
    with open(tmp_path / "out" / "comparison_seeds.csv", newline="") as f:
        csv_rows = {(r["strategy"], r["model"]): r for r in csv.DictReader(f)}
    assert float(csv_rows[("svd_orthogonal", "tiny")]["train_s_per_step"]) == pytest.approx(2.2)
    assert float(csv_rows[("svd_orthogonal", "tiny")]["step_time_ratio"]) == pytest.approx(2.0)
    assert float(csv_rows[("seq_ft", "tiny+lora")]["peak_memory_ratio"]) == pytest.approx(0.5)
    assert float(csv_rows[("seq_ft", "tiny")]["peak_memory_bytes"]) == 2 * GiB


def test_difference_whose_interval_contains_zero(tmp_path):
    for seed, (a, b) in enumerate(((0.5, 0.6), (0.6, 0.5), (0.7, 0.72))):
        _write(tmp_path / f"seq_s{seed}", "seq_ft", seed, _R([a] * 3))
        _write(tmp_path / f"ewc_s{seed}", "ewc", seed, _R([b] * 3))
    groups = group_by_seed([load_run(p) for p in sorted(tmp_path.rglob("metrics.json"))])
    (diff,) = paired_differences(groups, "seq_ft")
    assert diff.n == 3 and diff.intervals["ACC"].mean == pytest.approx(0.02 / 3)
    assert diff.intervals["ACC"].excludes_zero is False


def test_one_pair_bootstraps_the_difference_over_shared_items(tmp_path):
    R_a, items_a = _with_items(seed=0)
    R_b, items_b = _with_items(seed=1)
    _write(tmp_path / "seq", "seq_ft", 0, R_a, items=items_a)
    _write(tmp_path / "ewc", "ewc", 0, R_b, items=items_b)
    groups = group_by_seed([load_run(p) for p in sorted(tmp_path.rglob("metrics.json"))])
    (diff,) = paired_differences(groups, "seq_ft", samples=300, seed=3)
    acc = diff.intervals["ACC"]
    assert acc.method == "bootstrap" and acc.mean == pytest.approx(average_accuracy(R_b) - average_accuracy(R_a))
    assert acc.low <= acc.mean <= acc.high
    (again,) = paired_differences(groups, "seq_ft", samples=300, seed=3)
    assert again.intervals == diff.intervals
    # the same as resampling both runs together with one set of indices per replicate
    tables = [[[it[(i, j)] for j in range(3)] for i in range(4)] for it in (items_b, items_a)]
    together = bootstrap_interval(tables, lambda b, a: average_accuracy(b) - average_accuracy(a), samples=300, seed=3)
    assert together.low == pytest.approx(acc.low) and together.high == pytest.approx(acc.high)


def test_baseline_errors(tmp_path, capsys):
    _write(tmp_path / "seq", "seq_ft", 0, _R([0.5] * 3))
    _write(tmp_path / "ewc", "ewc", 1, _R([0.6] * 3))
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--baseline", "replay"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'replay': no such run; the runs are 'ewc', 'seq_ft'" in err
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--baseline", "seq_ft"]) == 2
    err = capsys.readouterr().err
    assert "no run shares a seed" in err and "seeds 1 vs baseline 0" in err
    groups = group_by_seed([load_run(p) for p in sorted(tmp_path.rglob("metrics.json"))])
    with pytest.raises(BaselineError, match="no such run"):
        paired_differences(groups, "multitask")


def test_baseline_by_sweep_label_and_ambiguity(tmp_path):
    for lam in (1.0, 10.0):
        for seed in range(2):
            _write(tmp_path / f"ewc{lam}_s{seed}", "ewc", seed, _R([0.5 + lam / 100 + seed / 10] * 3), {"ewc_lambda": lam})
    from cl_runner.reporting.report import describe_differences

    runs = [load_run(p) for p in sorted(tmp_path.rglob("metrics.json"))]
    describe_differences(runs)
    groups = group_by_seed(runs)
    with pytest.raises(BaselineError, match="ambiguous"):
        paired_differences(groups, "ewc")
    (diff,) = paired_differences(groups, "ewc (ewc_lambda=1.0)")
    assert diff.group.label == "ewc (ewc_lambda=10.0)" and diff.intervals["ACC"].mean == pytest.approx(0.09)


def test_item_scores_side_files_stand_in_for_predictions(tmp_path):
    """With evaluation.save_predictions=false cl-run writes item_scores/*.json (the
    scores alone); the bootstrap reads them like the predictions' scores."""
    from cl_runner.reporting.tracking import write_item_scores

    R, items = _with_items()
    _write(tmp_path / "run", "seq_ft", 0, R)
    for (i, j), scores in items.items():
        write_item_scores(tmp_path / "run" / "item_scores" / f"task_{j + 1}_after_{i}.json", list(scores))
    loaded, reason = load_item_scores(tmp_path / "run", R)
    assert reason == "" and np.array_equal(loaded[3][2], items[(3, 2)])
    (group,) = group_by_seed([load_run(tmp_path / "run" / "metrics.json")])
    assert summarize_group(group, samples=100).intervals["ACC"].method == "bootstrap"
