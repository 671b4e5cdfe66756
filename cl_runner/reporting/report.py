"""`cl-report`: compare finished runs side by side.

    cl-report PATH [PATH ...] [--out DIR] [--sort ACC] [--format table|csv|markdown] [--baseline LABEL]

Every `metrics.json` under the given paths (a run folder holds `config.yaml` and
`metrics.json`) becomes one row: run, model, stream, strategy, ACC, gap, BWT, FWT, F,
LA, time, memory. Rows are grouped by stream and task list (the ordered task names), so
only runs over the same tasks are compared. Runs of one strategy that differ in their
settings (a sweep) are told apart in the strategy column by what differs, read from each
run's config.yaml: `ewc (ewc_lambda=0.1)`. In each group the multitask run (strategy
name starting with "multitask") of the same model is the upper-bound reference: its gap
column reads "ref" and every other run's gap is its ACC minus the reference's. Under
each group a note names what differs in the runs' recorded environments (versions,
devices, threads). A run folder without metrics.json (a run stopped or still running)
is named as left out. `comparison.csv` (raw numbers) and `comparison.png` (ACC curves
and final metrics) are written to --out, by default the first PATH.

Under each group's run table, runs that differ only in seed (seed_groups.py says which)
are summarised as one row: mean ± 95% CI of ACC, BWT, FWT, F and LA (t over the seeds;
one seed: a bootstrap over test items) and the number of seeds; `--baseline LABEL` adds
the paired difference of every other seed group from it. These go to
`comparison_seeds.csv` (mean/low/high columns) and `forgetting_curves.png` (mean curves
with bands). docs/reporting.md has the rules.

`--layout table` prints the runs as a paper's table instead (paper_table.py): methods as
rows, task orders as columns plus their average (docs/tables.md).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from cl_runner.reporting.formatting import format_bytes, format_duration, format_metric, markdown_table, text_table  # noqa: F401 (re-exported)
from cl_runner.reporting.outputs import CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE
from cl_runner.reporting.paper_table import METRIC_NAMES, paper_tables
from cl_runner.reporting.seed_groups import is_incidental

# Without these a row means nothing; a file that lacks one is reported and skipped.
REQUIRED_KEYS = ("strategy", "task_stream", "model", "ACC")


@dataclass
class RunResult:
    """One run's metrics.json, reduced to what the comparison shows."""

    path: Path
    run_id: str
    model: str
    stream: str
    strategy: str
    ACC: Optional[float]
    BWT: Optional[float] = None
    FWT: Optional[float] = None
    forgetting: Optional[float] = None
    LA: Optional[float] = None
    ACC_per_step: list = field(default_factory=list)
    num_tasks: Optional[int] = None
    wall_time_s: Optional[float] = None
    train_time_s: Optional[float] = None  # the training steps alone (no evaluation)
    test_time_s: Optional[float] = None  # a strategy's own test-time work (MbPA++'s local adaptation)
    optimizer_steps: Optional[float] = None
    peak_memory_bytes: Optional[float] = None
    strategy_extra_bytes: Optional[float] = None
    reference: Optional["RunResult"] = None  # the multitask run of its group and model
    config: dict = field(default_factory=dict)  # the run's config.yaml, flattened to dotted keys
    settings: str = ""  # what sets it apart from runs of the same strategy (a sweep's values)
    tasks: Optional[tuple] = None  # the ordered task names (metrics.json, else R.csv)
    environment: dict = field(default_factory=dict)  # metrics.json's, else environment.json
    R: Optional[list] = None  # the accuracy matrix (metrics.json)
    seed: Optional[int] = None  # metrics.json's seed, else config.yaml's
    # evaluation.monitor (tasks scored but never trained): {task: (before training, at the end)}
    monitor: dict = field(default_factory=dict)

    @property
    def monitor_change(self) -> Optional[float]:
        """Mean change of the monitor scores from before training to the end."""
        changes = [end - start for start, end in self.monitor.values() if start is not None and end is not None]
        return sum(changes) / len(changes) if changes and len(changes) == len(self.monitor) else None

    @property
    def seconds_per_step(self) -> Optional[float]:
        """Training time per optimizer step (None without both numbers, or no step)."""
        if self.train_time_s is None or not self.optimizer_steps:
            return None
        return self.train_time_s / self.optimizer_steps

    @property
    def group(self) -> tuple:
        """Runs are compared when they trained the same stream's tasks in the same order."""
        return (self.stream, self.tasks or ())

    @property
    def is_multitask(self) -> bool:
        """An upper-bound run (its registration says so: multitask)."""
        from cl_runner.strategies.registry import is_upper_bound

        return is_upper_bound(self.strategy)

    @property
    def is_reference(self) -> bool:
        return self.reference is self

    @property
    def gap(self) -> Optional[float]:
        """ACC minus the multitask reference's ACC (negative: below the upper bound)."""
        if self.reference is None or self.ACC is None or self.reference.ACC is None:
            return None
        return self.ACC - self.reference.ACC

    @property
    def strategy_label(self) -> str:
        return f"{self.strategy} ({self.settings})" if self.settings else self.strategy

    @property
    def label(self) -> str:
        return f"{self.run_id} ({self.strategy_label})"


# --- loading ------------------------------------------------------------------------


def files_named(root: Path, name: str) -> list[Path]:
    """Every file `name` under `root`, sorted, following links to folders (a sweep's
    folder links to its jobs' run folders)."""
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        if name in files:
            found.append(Path(folder) / name)
    return sorted(found)


def find_metrics_files(paths: Sequence[Path]) -> list[Path]:
    """Every metrics.json at or under the given paths, each once, in path order."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_file():
            candidates = [path]
        else:
            candidates = files_named(path, METRICS_FILE)
        for candidate in candidates:
            found.setdefault(candidate.resolve(), None)
    return list(found)


def _number(value, key: str, path: Path):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: {key} = {value!r} is not a number or null")
    if isinstance(value, float) and math.isnan(value):
        return None
    return value  # ints stay ints (bytes), so the CSV shows 536870912, not 536870912.0


def flatten(node, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists and scalars become their text."""
    if not isinstance(node, dict):
        return {prefix: str(node)} if prefix else {}
    flat: dict[str, str] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def load_run_config(run_folder: Path) -> dict[str, str]:
    """The run's config.yaml, flattened; empty when it is missing or unreadable (the
    comparison then simply cannot say what the run's settings were)."""
    import yaml  # PyYAML comes with omegaconf

    try:
        return flatten(yaml.safe_load((run_folder / CONFIG_FILE).read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return {}


# Keys that differ between runs without changing what is measured.
_NOT_SETTINGS = ("output_dir", "resume", "experiment_name", "dry_run", "plan_", "logger.", "trainer.progress_bar",
                 "trainer.log_every_steps", "trainer.checkpoint_every_steps", "trainer.keep_checkpoints",
                 "task_stream.data_dir", "evaluation.save_predictions", "ops.", "paper_table.")


def describe_differences(runs: Sequence[RunResult]) -> None:
    """Among runs of one group, strategy and model (a sweep), name the settings that
    differ: `ewc (ewc_lambda=0.1)` rather than two rows that read `ewc`. Runs on another
    model (`minilm+lora`) are told apart by the model column, not by a settings label."""
    families: dict[tuple, list[RunResult]] = {}
    for run in runs:
        families.setdefault((run.group, run.strategy, run.model), []).append(run)
    for family in families.values():
        if len(family) < 2 or not all(r.config for r in family):
            continue
        # Only keys every run has: one that some runs lack comes from another cl-runner
        # version's schema (a key added or renamed since), not from a choice.
        keys = sorted(set.intersection(*(set(r.config) for r in family)))
        differing = [k for k in keys if not k.startswith(_NOT_SETTINGS) and not is_incidental(k)
                     and len({r.config.get(k) for r in family}) > 1]
        for run in family:
            run.settings = ", ".join(f"{k.removeprefix('strategy.')}={run.config.get(k, '-')}" for k in differing)


def tasks_from_accuracy_csv(run_folder: Path) -> Optional[list[str]]:
    """The task names from R.csv's header (tasks_learned, after, <task>...)."""
    try:
        with open(run_folder / "R.csv", newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except OSError:
        return None
    return header[2:] if header[:2] == ["tasks_learned", "after"] and len(header) > 2 else None


def load_environment(run_folder: Path) -> dict:
    """The run's environment.json, or {} when it is missing or unreadable."""
    from cl_runner.reporting.environment import load_environment as load

    return load(run_folder) or {}


def load_run(path: Path) -> RunResult:
    """Read one metrics.json; a ValueError names the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (is this a cl-run metrics.json?)")
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        tasks = tasks_from_accuracy_csv(path.parent)
    steps = data.get("ACC_per_step") or []
    environment = data.get("environment")
    config = load_run_config(path.parent)
    R = data.get("R")
    return RunResult(
        path=path,
        run_id=str(data.get("run_id") or path.parent.name),
        # An adapter run is another model to compare against: tiny_llama+lora.
        model=str(data["model"]) + (f"+{data['adapter']['kind']}" if isinstance(data.get("adapter"), dict) else ""),
        stream=str(data["task_stream"]),
        strategy=str(data["strategy"]),
        ACC=_number(data["ACC"], "ACC", path),
        BWT=_number(data.get("BWT"), "BWT", path),
        FWT=_number(data.get("FWT"), "FWT", path),
        forgetting=_number(data.get("forgetting"), "forgetting", path),
        LA=_number(data.get("LA"), "LA", path),
        ACC_per_step=[_number(v, "ACC_per_step", path) for v in steps],
        num_tasks=len(tasks) if isinstance(tasks, list) else None,
        wall_time_s=_number(data.get("wall_time_s"), "wall_time_s", path),
        train_time_s=_number(data.get("train_time_s"), "train_time_s", path),
        test_time_s=_number(data.get("test_time_s"), "test_time_s", path),
        optimizer_steps=_number(data.get("optimizer_steps"), "optimizer_steps", path),
        peak_memory_bytes=_number(data.get("peak_memory_bytes"), "peak_memory_bytes", path),
        strategy_extra_bytes=_number(data.get("strategy_extra_bytes"), "strategy_extra_bytes", path),
        config=config,
        R=R if isinstance(R, list) else None,
        seed=_seed(data.get("seed", config.get("seed"))),
        tasks=tuple(str(t) for t in tasks) if isinstance(tasks, list) else None,
        environment=environment if isinstance(environment, dict) else load_environment(path.parent),
        monitor=_monitor_scores(data, path),
    )


def _seed(value) -> Optional[int]:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _monitor_scores(data: dict, path: Path) -> dict:
    """{monitor task: (score before training, score at the end)} from metrics.json."""
    rows, names = data.get("monitor"), data.get("monitor_tasks")
    if not rows or not isinstance(names, list) or not isinstance(rows, list):
        return {}
    first, last = rows[0], rows[-1]
    return {str(n): (_number(a, "monitor", path), _number(b, "monitor", path)) for n, a, b in zip(names, first, last)}


def _is_run_folder(folder: Path) -> bool:
    """A folder cl-run made: its config.yaml is a resolved run config (not a Hydra
    primary config with `defaults:`, nor W&B's), or it has an environment.json."""
    if (folder / ENVIRONMENT_FILE).is_file():
        return True
    import yaml

    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    # W&B keeps its own config.yaml ({key: {value: ...}}) inside the run's wandb/ folder.
    return (isinstance(config, dict) and isinstance(config.get("experiment_name"), str)
            and all(isinstance(config.get(k), dict) for k in ("task_stream", "strategy")))


def find_unfinished_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders at or under the paths that have no metrics.json: runs that were
    stopped (killed, failed) or are still running. Each once, in path order."""
    found: dict[Path, Path] = {}
    for path in paths:
        if not path.is_dir():
            continue
        for config in files_named(path, CONFIG_FILE):
            folder = config.parent
            if "wandb" in config.relative_to(path).parts:
                continue  # W&B's own files inside a run folder
            if not (folder / METRICS_FILE).exists() and _is_run_folder(folder):
                found.setdefault(folder.resolve(), folder)
    return list(found.values())


def attach_references(runs: Sequence[RunResult]) -> None:
    """Point every run at the multitask run of the same group (stream and task list) and
    model (the best ACC if there are several); runs without one keep `reference = None`."""
    best: dict[tuple, RunResult] = {}
    for run in runs:
        if not run.is_multitask:
            continue
        key = (run.group, run.model)
        current = best.get(key)
        if current is None or (run.ACC is not None and (current.ACC is None or run.ACC > current.ACC)):
            best[key] = run
    for run in runs:
        run.reference = best.get((run.group, run.model))


# --- ordering and formatting ----------------------------------------------------------

# sort key -> (value of a run, higher is better). Text keys sort A..Z.
SORT_KEYS: dict[str, tuple[Callable[[RunResult], object], bool]] = {
    "ACC": (lambda r: r.ACC, True),
    "gap": (lambda r: r.gap, True),
    "BWT": (lambda r: r.BWT, True),
    "FWT": (lambda r: r.FWT, True),
    "F": (lambda r: r.forgetting, False),
    "forgetting": (lambda r: r.forgetting, False),
    "LA": (lambda r: r.LA, True),
    "time": (lambda r: r.wall_time_s, False),
    "memory": (lambda r: r.peak_memory_bytes, False),
    "run": (lambda r: r.run_id, False),
    "model": (lambda r: r.model, False),
    "strategy": (lambda r: r.strategy, False),
}


def sort_runs(runs: Sequence[RunResult], key: str) -> list[RunResult]:
    """Best first for metrics (higher ACC/BWT/FWT/LA, lower F/time/memory), A..Z for
    names; runs without the value go last."""
    get, descending = SORT_KEYS[key]
    present = [r for r in runs if get(r) is not None]
    absent = [r for r in runs if get(r) is None]
    return sorted(present, key=get, reverse=descending) + absent


def group_runs(runs: Sequence[RunResult]) -> dict[tuple, list[RunResult]]:
    """Runs by (stream, task list): a 2-task run is never compared with a 3-task one."""
    groups: dict[tuple, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return {key: groups[key] for key in sorted(groups, key=lambda k: (k[0], len(k[1]), k[1]))}


def group_label(group: tuple, short: bool = False) -> str:
    """`synthetic: reverse, shift_letters, increment`; a long list is cut in the middle
    (`cl_benchmark: mnli, cb, wic, ..., yelp, amazon (15 tasks)`); `short`: the
    stream and the task count only."""
    stream, tasks = group
    if not tasks:
        return stream
    count = f"{len(tasks)} task" + ("s" if len(tasks) != 1 else "")
    if short:
        return f"{stream} ({count})"
    names = list(tasks) if len(tasks) <= 6 else [*tasks[:3], "...", *tasks[-2:]]
    return f"{stream}: {', '.join(names)}" + (f" ({count})" if len(tasks) > 6 else "")


def _fmt(value: Optional[float], signed: bool = False) -> str:
    return format_metric(value, signed)


HEADERS = ("run", "model", "stream", "strategy", "ACC", "gap", "BWT", "FWT", "F", "LA", "time", "memory")
_TEXT_COLUMNS = 4  # the first four are left-aligned text, the rest right-aligned numbers


def table_row(run: RunResult) -> list[str]:
    gap = "ref" if run.is_reference else _fmt(run.gap, signed=True)
    return [
        run.run_id, run.model, run.stream, run.strategy_label,
        _fmt(run.ACC), gap, _fmt(run.BWT, signed=True), _fmt(run.FWT, signed=True),
        _fmt(run.forgetting), _fmt(run.LA), time_cell(run), format_bytes(run.peak_memory_bytes),
    ]


def time_cell(run: RunResult) -> str:
    """Wall time, and the part a strategy spent on its own test-time work (MbPA++)."""
    wall = format_duration(run.wall_time_s)
    return f"{wall} (test-time {format_duration(run.test_time_s)})" if run.test_time_s else wall


def render_table(rows: Sequence[Sequence[str]]) -> str:
    """Aligned plain-text table: text columns left, numbers right."""
    return text_table(HEADERS, rows, _TEXT_COLUMNS)


def render_markdown(rows: Sequence[Sequence[str]]) -> str:
    return markdown_table(HEADERS, rows, _TEXT_COLUMNS)


def _reference_note(runs: Sequence[RunResult]) -> str:
    refs = [r for r in runs if r.is_reference]
    if not refs:
        return "no multitask run over these tasks: no upper-bound reference, gap not available"
    listed = ", ".join(f"{r.run_id} (model {r.model}, ACC {_fmt(r.ACC)})" for r in refs)
    return f"ref = multitask upper bound, per model: {listed}; gap = ACC - ref ACC"


# Environment entries compared between runs (the host name, command line and start time
# always differ and change nothing measured).
ENVIRONMENT_KEYS = ("cl_runner", "git_commit", "git_dirty", "python", "torch", "transformers", "accelerate",
                    "datasets", "peft", "cuda", "cudnn", "device_names", "cpu", "cpu_count", "torch_threads",
                    "world_size")


def _environment_value(key: str, value) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return str(value)[:10] if key == "git_commit" else str(value)


def monitor_note(runs: Sequence[RunResult]) -> str:
    """The never-trained monitor tasks of each run that has them, before -> after:
    `monitor (never trained): run-a sst-2 0.512 -> 0.498 (-0.014); run-b ...`."""
    parts = []
    for run in runs:
        if not run.monitor:
            continue
        cells = []
        for name, (start, end) in run.monitor.items():
            change = f" ({end - start:+.3f})" if start is not None and end is not None else ""
            cells.append(f"{name} {_fmt(start)} -> {_fmt(end)}{change}")
        parts.append(f"{run.run_id} {', '.join(cells)}")
    return ("monitor (never trained): " + "; ".join(parts)) if parts else ""


def environment_note(runs: Sequence[RunResult]) -> str:
    """`environment differs: torch 2.13.0 vs 2.14.1 (run-c), torch_threads 2 vs 1 (run-c)`:
    the most common value first; every value but a majority's names its runs. Empty
    when the recorded environments agree (or fewer than two runs recorded one)."""
    recorded = [r for r in runs if r.environment]
    if len(recorded) < 2:
        return ""
    parts = []
    for key in ENVIRONMENT_KEYS:
        holders: dict[str, list[str]] = {}
        for run in recorded:
            holders.setdefault(_environment_value(key, run.environment.get(key)), []).append(run.run_id)
        if len(holders) < 2:
            continue
        ordered = sorted(holders, key=lambda v: -len(holders[v]))  # stable: ties keep table order
        shown = [v if 2 * len(holders[v]) > len(recorded) else f"{v} ({', '.join(holders[v])})" for v in ordered]
        parts.append(f"{key} {' vs '.join(shown)}")
    missing = [r.run_id for r in runs if not r.environment]
    note = f"environment differs: {', '.join(parts)}" if parts else ""
    if parts and missing:
        note += f"; not recorded for {', '.join(missing)}"
    return note


CSV_COLUMNS = (
    "stream", "model", "strategy", "run", "ACC", "gap_to_multitask", "reference_run", "BWT", "FWT",
    "forgetting", "LA", "num_tasks", "wall_time_s", "test_time_s", "peak_memory_bytes", "strategy_extra_bytes", "path",
    "settings", "tasks", "monitor_change",
)


def csv_text(groups: dict[tuple, list[RunResult]]) -> str:
    """Raw numbers (empty cell for null), one row per run, in the table's order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for runs in groups.values():
        for r in runs:
            values = [
                r.stream, r.model, r.strategy, r.run_id, r.ACC, r.gap,
                r.reference.run_id if r.reference else None, r.BWT, r.FWT, r.forgetting, r.LA,
                r.num_tasks, r.wall_time_s, r.test_time_s, r.peak_memory_bytes, r.strategy_extra_bytes, r.path,
                r.settings,
                " ".join(r.tasks) if r.tasks else None, r.monitor_change,
            ]
            writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def _count(runs: Sequence[RunResult]) -> str:
    return "1 run" if len(runs) == 1 else f"{len(runs)} runs"


@dataclass
class SeedSummary:
    """The seed groups of every stream group (key as in group_runs), and the paired
    differences from --baseline (None without one)."""

    groups: dict
    differences: Optional[list] = None
    baseline: Optional[str] = None
    level: float = 0.95
    samples: int = 2000  # bootstrap resamples and their seed
    seed: int = 0
    cache: dict = field(default_factory=dict)  # per-item scores and bootstrap copies, per run


def render(groups: dict[tuple, list[RunResult]], fmt: str, seeds: Optional[SeedSummary] = None) -> str:
    """The comparison as text in `fmt` (table, markdown or csv); with `seeds`, each
    group's block ends with its seed-group table (and differences from the baseline)."""
    if fmt == "csv":
        return csv_text(groups).rstrip("\n")
    from cl_runner.reporting.seed_tables import render_seed_sections

    blocks = []
    for group, runs in groups.items():
        rows = [table_row(r) for r in runs]
        notes = "\n".join(n for n in (_reference_note(runs), monitor_note(runs), environment_note(runs)) if n)
        section = ""
        if seeds is not None and seeds.groups.get(group):
            section = render_seed_sections(seeds.groups[group], seeds.differences, seeds.baseline, fmt,
                                           seeds.level, environment_note)
        if fmt == "markdown":
            notes = notes.replace("\n", "\n\n")
            block = f"### {group_label(group)} ({_count(runs)})\n\n{render_markdown(rows)}\n\n{notes}"
            blocks.append(block + (f"\n\n{section}" if section else ""))
        else:
            block = f"== {group_label(group)} ({_count(runs)}) ==\n{render_table(rows)}\n{notes}"
            blocks.append(block + (f"\n\n{section}" if section else ""))
    return "\n\n".join(blocks)


def summarize_seeds(groups: dict[tuple, list[RunResult]], baseline: Optional[str] = None, level: float = 0.95,
                    samples: int = 2000, seed: int = 0) -> SeedSummary:
    """Seed groups per stream group with their intervals (best mean ACC first), and the
    paired differences from `baseline`; BaselineError when it names no run or no seed pairs."""
    from cl_runner.reporting.seed_groups import group_by_seed, paired_differences, summarize_group

    summary = SeedSummary({}, baseline=baseline, level=level, samples=samples, seed=seed)
    cache = summary.cache
    for key, runs in groups.items():
        found = [summarize_group(g, level, samples, seed, cache) for g in group_by_seed(runs)]
        acc = [g.intervals["ACC"].mean for g in found]
        order = sorted(range(len(found)), key=lambda i: (acc[i] is None, -(acc[i] or 0.0)))
        summary.groups[key] = [found[i] for i in order]
    if baseline is not None:
        every = [g for found in summary.groups.values() for g in found]
        summary.differences = paired_differences(every, baseline, level, samples, seed, cache)
    return summary


def write_seed_outputs(summary: SeedSummary, out: Path) -> list[Path]:
    """comparison_seeds.csv, and forgetting_curves.png per stream group (numbered when
    there are several) with each seed group's mean and interval band."""
    from cl_runner.reporting.plots import plot_seed_curves
    from cl_runner.reporting.seed_groups import curve_bands
    from cl_runner.reporting.seed_tables import seeds_csv_text

    written = [out / "comparison_seeds.csv"]
    written[0].write_text(seeds_csv_text(summary.groups, summary.differences, summary.baseline, summary.level),
                          encoding="utf-8")
    keys = [k for k, found in summary.groups.items() if found and k[1]]
    for n, key in enumerate(keys, 1):
        found = summary.groups[key]
        several_models = len({g.first.model for g in found}) > 1
        bands = {}
        for g in found:
            data = curve_bands(g, summary.level, summary.samples, summary.seed, summary.cache)
            if data is not None and data["R"][0].shape[1] == len(key[1]):
                bands[f"{g.label} [{g.first.model}]" if several_models else g.label] = data
        if bands:
            name = "forgetting_curves.png" if len(keys) == 1 else f"forgetting_curves_{n}.png"
            written.append(plot_seed_curves(bands, key[1], out / name, summary.level))
    return written


def _plot_labels(runs: Sequence[RunResult], several_groups: bool) -> dict[str, dict]:
    labelled: dict[str, dict] = {}
    for run in runs:
        label = f"{group_label(run.group, short=True)} / {run.label}" if several_groups else run.label
        base, n = label, 2
        while label in labelled:  # two runs with the same id and strategy
            label, n = f"{base} #{n}", n + 1
        labelled[label] = {"ACC_per_step": run.ACC_per_step, "ACC": run.ACC, "BWT": run.BWT, "forgetting": run.forgetting}
    return labelled


# --- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cl-report",
        description="Compare continual-learning runs: finds every metrics.json under PATH and prints "
        "one row per run, grouped by stream and task list, with the multitask run as the upper bound.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run folders, folders of runs, or metrics.json files")
    parser.add_argument("--out", type=Path, default=None, help="where comparison.csv and comparison.png go (default: the first PATH)")
    parser.add_argument("--sort", default="ACC", choices=sorted(SORT_KEYS), help="order of the rows within a group (default: ACC, best first)")
    parser.add_argument("--format", dest="fmt", default="table", choices=("table", "csv", "markdown"), help="what is printed (default: table)")
    parser.add_argument("--baseline", default=None, metavar="LABEL",
                        help="strategy label (as in the strategy column, e.g. seq_ft) to subtract from every other "
                        "seed group of the same tasks and model, paired by seed")
    parser.add_argument("--layout", default="runs", choices=("runs", "table"),
                        help="runs: one row per run, grouped (default); table: a paper's layout, methods as rows "
                        "and task orders as columns plus their average, mean ± interval over seeds (table.md)")
    parser.add_argument("--metrics", nargs="+", default=["ACC"], choices=sorted(METRIC_NAMES),
                        help="--layout table: the metrics shown (default: ACC; TRACE's table: ACC BWT)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)")
    parser.add_argument("--bootstrap-samples", type=int, default=2000,
                        help="resamples of the test items for a single seed's interval (default: 2000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"cl-report: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2

    files = find_metrics_files(args.paths)
    runs: list[RunResult] = []
    for path in files:
        try:
            runs.append(load_run(path))
        except ValueError as err:
            print(f"cl-report: skipping {err}", file=sys.stderr)
    for folder in find_unfinished_runs(args.paths):
        print(f"cl-report: left out {folder}: no metrics.json (the run was stopped or is still running; "
              f"continue it with cl-run resume={folder})", file=sys.stderr)
    if not runs:
        where = ", ".join(str(p) for p in args.paths)
        what = "no readable metrics.json" if files else "no metrics.json"
        print(
            f"cl-report: {what} found under {where}. Point it at run folders (each with config.yaml "
            "and metrics.json, written by cl-run when a run ends) or at a folder that contains them.",
            file=sys.stderr,
        )
        return 1

    attach_references(runs)
    describe_differences(runs)
    if args.layout == "table":
        return _write_paper_table(runs, args)
    groups = {key: sort_runs(group, args.sort) for key, group in group_runs(runs).items()}
    if not 0.0 < args.level < 1.0 or args.bootstrap_samples < 1:
        print("cl-report: --level must lie in (0, 1) and --bootstrap-samples be at least 1", file=sys.stderr)
        return 2
    from cl_runner.reporting.seed_groups import BaselineError

    try:
        seeds = summarize_seeds(groups, args.baseline, args.level, args.bootstrap_samples, args.bootstrap_seed)
    except BaselineError as err:
        print(f"cl-report: {err}", file=sys.stderr)
        return 2
    print(render(groups, args.fmt, seeds))

    first = args.paths[0]
    out = args.out or (first.parent if first.is_file() else first)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "comparison.csv"
    csv_path.write_text(csv_text(groups), encoding="utf-8")
    from cl_runner.reporting.plots import plot_run_comparison  # matplotlib only when writing the figure

    ordered = [run for group in groups.values() for run in group]
    png_path = plot_run_comparison(_plot_labels(ordered, len(groups) > 1), out / "comparison.png")
    extra = write_seed_outputs(seeds, out)
    print(f"cl-report: wrote {csv_path}, {png_path}, {', '.join(p.name for p in extra)}", file=sys.stderr)
    return 0


def _write_paper_table(runs: Sequence[RunResult], args: argparse.Namespace) -> int:
    text = paper_tables(runs, args.metrics, args.level)
    print(text)
    first = args.paths[0]
    out = args.out or (first.parent if first.is_file() else first)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(f"cl-report: wrote {out / 'table.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
