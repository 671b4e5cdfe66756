"""Runs that differ only in seed, as one group with intervals; paired differences from a
baseline.

The grouping rule: two runs are seeds of one experiment when they trained the same task
list of the same stream with the same model and strategy, and their resolved configs
(config.yaml, flattened to dotted keys) agree on every key except `seed` and the keys in
`INCIDENTAL_KEYS` / `INCIDENTAL_PREFIXES`, which change where and how a run is written
or launched but not what it measures. A run without a readable config.yaml is grouped by
strategy name alone, and its group says so.

Intervals (95% by default): over n >= 2 seeds, mean ± t_{0.975, n-1} · s/√n of the
values in metrics.json; with one seed, a percentile bootstrap over test items from the
run's per-item scores (predictions/), or no interval when they are missing. A difference
from the baseline pairs runs by seed (same seed, same stream, tasks and model); with
n >= 2 pairs it is the t interval of the differences, with one pair the bootstrap of the
difference over the same resampled items of both runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from cl_runner.evaluation import metrics as M
from cl_runner.reporting.item_scores import load_item_scores
from cl_runner.reporting.stats import (
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    LEVEL,
    Interval,
    bootstrap_interval,
    item_counts,
    resampled_matrices,
    t_interval,
    t_quantile,
)

# Config keys that never make two runs different experiments.
INCIDENTAL_KEYS = frozenset({
    "seed", "output_dir", "resume", "experiment_name", "dry_run", "save_final_model",
    "trainer.progress_bar", "trainer.log_every_steps", "trainer.checkpoint_every_steps", "trainer.keep_checkpoints",
    "trainer.cpu_threads", "task_stream.data_dir", "evaluation.save_predictions",
})
# paper_table.*: where a table prints the run, not how it trains (its row preset's other keys
# do say how, and differ where rows differ).
INCIDENTAL_PREFIXES = ("logger.", "launcher.", "hydra.", "ops.", "plan_", "paper_table.")

# metric -> (RunResult attribute, function of R for the bootstrap)
METRICS: dict[str, tuple[str, Callable[[Any], Optional[float]]]] = {
    "ACC": ("ACC", M.average_accuracy),
    "BWT": ("BWT", M.backward_transfer),
    "FWT": ("FWT", M.forward_transfer),
    "F": ("forgetting", M.average_forgetting),
    "LA": ("LA", M.learning_accuracy),
}


class BaselineError(ValueError):
    """--baseline names no group, or no run of any group shares a seed with it."""


def is_incidental(key: str) -> bool:
    return key in INCIDENTAL_KEYS or key.startswith(INCIDENTAL_PREFIXES)


def experiment_key(run) -> tuple:
    """What a run measured: stream and task list, model, strategy and every config
    setting that is not incidental. Runs with equal keys are seeds of one experiment."""
    settings = tuple(sorted((k, v) for k, v in run.config.items() if not is_incidental(k))) if run.config else None
    return (run.group, run.model, run.strategy, settings)


@dataclass
class SeedGroup:
    """The runs of one experiment, one per seed (in seed order)."""

    runs: list
    intervals: dict[str, Interval] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def first(self):
        return self.runs[0]

    @property
    def label(self) -> str:
        return self.first.strategy_label

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    def seeds_text(self) -> str:
        shown = ",".join("?" if s is None else str(s) for s in self.seeds)
        return f"{self.n} ({shown})"


def group_by_seed(runs: Sequence) -> list[SeedGroup]:
    """One SeedGroup per experiment key, in the order the runs come; runs in seed order."""
    found: dict[tuple, list] = {}
    for run in runs:
        found.setdefault(experiment_key(run), []).append(run)
    groups = []
    for key, members in found.items():
        members = sorted(members, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.run_id))
        group = SeedGroup(members)
        if key[3] is None:
            group.notes.append("no config.yaml: grouped by strategy name only")
        seeds = [r.seed for r in members if r.seed is not None]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            group.notes.append(f"seed {', '.join(map(str, repeated))} appears more than once (reruns are not independent seeds)")
        groups.append(group)
    return groups


def _items(run, cache: dict):
    key = ("items", id(run))
    if key not in cache:
        cache[key] = (None, "no R matrix in metrics.json") if run.R is None else load_item_scores(run.path.parent, run.R)
    return cache[key]


def _copies(run, items, samples: int, seed: int, cache: dict) -> np.ndarray:
    """The run's bootstrap copies of R, drawn once per (samples, seed)."""
    key = ("copies", id(run), samples, seed)
    if key not in cache:
        cache[key] = resampled_matrices([items], samples, seed)[0]
    return cache[key]


def summarize_group(group: SeedGroup, level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = BOOTSTRAP_SEED, cache: Optional[dict] = None) -> SeedGroup:
    """Fill group.intervals: the t interval over seeds, or for one seed the bootstrap
    over its test items (or no interval, with the reason in the notes)."""
    cache = {} if cache is None else cache
    for name, (attr, fn) in METRICS.items():
        values = [getattr(r, attr) for r in group.runs]
        if group.n >= 2:
            group.intervals[name] = t_interval(values, level)
            continue
        items, reason = _items(group.first, cache)
        if values[0] is None:
            group.intervals[name] = Interval(None, n=1, reason="not defined")
        elif items is None:
            group.intervals[name] = Interval(values[0], n=1, reason=reason)
        else:
            copies = [_copies(group.first, items, samples, seed, cache)]
            group.intervals[name] = bootstrap_interval([items], fn, level, samples, seed, copies)
    if group.n == 1:
        reasons = {iv.reason for iv in group.intervals.values() if iv.method == "none" and iv.mean is not None}
        group.notes += [f"one seed, no interval: {r}" for r in sorted(reasons)]
    return group


@dataclass
class Difference:
    """`group` minus `baseline`, metric by metric, over the seeds they share."""

    group: SeedGroup
    baseline: SeedGroup
    pairs: list = field(default_factory=list)  # [(seed, run, baseline run)]
    intervals: dict[str, Interval] = field(default_factory=dict)
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.pairs)


def find_baseline(groups: Sequence[SeedGroup], name: str) -> list[SeedGroup]:
    """The groups whose label (`seq_ft`, `ewc (ewc_lambda=1.0)`) is `name`, else those
    whose strategy is `name`. Several are only allowed for different streams/models."""
    exact = [g for g in groups if g.label == name]
    chosen = exact or [g for g in groups if g.first.strategy == name]
    by_place: dict[tuple, list[SeedGroup]] = {}
    for g in chosen:
        by_place.setdefault((g.first.group, g.first.model), []).append(g)
    for place, found in by_place.items():
        if len(found) > 1:
            raise BaselineError(f"--baseline {name!r} is ambiguous for {place[1]} on {place[0][0]}: "
                                f"{', '.join(repr(g.label) for g in found)}; name one of these labels")
    return chosen


def paired_differences(groups: Sequence[SeedGroup], name: str, level: float = LEVEL,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       cache: Optional[dict] = None) -> list[Difference]:
    """Every group minus the baseline group of the same stream, task list and model,
    paired by seed. BaselineError when no group is the baseline, or when no run anywhere
    shares a seed with its baseline."""
    cache = {} if cache is None else cache
    baselines = find_baseline(groups, name)
    if not baselines:
        labels = sorted({g.label for g in groups})
        raise BaselineError(f"--baseline {name!r}: no such run; the runs are {', '.join(map(repr, labels))}")
    by_place = {(g.first.group, g.first.model): g for g in baselines}
    differences = []
    for group in groups:
        base = by_place.get((group.first.group, group.first.model))
        if base is None or base is group:
            continue
        base_runs = {r.seed: r for r in reversed(base.runs)}  # the first run of a repeated seed
        pairs, used = [], set()
        for run in group.runs:
            if run.seed in base_runs and run.seed not in used:
                pairs.append((run.seed, run, base_runs[run.seed]))
                used.add(run.seed)
        diff = Difference(group, base, pairs)
        if not pairs:
            diff.note = (f"no paired seeds: seeds {','.join(map(str, group.seeds))} vs "
                         f"baseline {','.join(map(str, base.seeds))}")
        else:
            _difference_intervals(diff, level, samples, seed, cache)
        differences.append(diff)
    if not any(d.pairs for d in differences):
        detail = "; ".join(f"{d.group.label}: {d.note}" for d in differences) or "no other run beside it"
        raise BaselineError(f"--baseline {name!r}: no run shares a seed (and stream, tasks, model) with it ({detail})")
    return differences


def _difference_intervals(diff: Difference, level: float, samples: int, seed: int, cache: dict) -> None:
    for name, (attr, fn) in METRICS.items():
        values = [None if getattr(a, attr) is None or getattr(b, attr) is None else getattr(a, attr) - getattr(b, attr)
                  for _, a, b in diff.pairs]
        if diff.n >= 2 or values[0] is None:
            diff.intervals[name] = t_interval(values, level)
            continue
        (_, run, base_run), = diff.pairs
        (items, reason), (base_items, base_reason) = _items(run, cache), _items(base_run, cache)
        if items is None or base_items is None:
            diff.intervals[name] = Interval(values[0], n=1, reason=reason or base_reason)
            continue

        def minus(r, b, fn=fn):
            x, y = fn(r), fn(b)
            return None if x is None or y is None else x - y

        if item_counts(items) != item_counts(base_items):  # different test sets: no paired resampling
            diff.intervals[name] = Interval(values[0], n=1, reason=(
                f"the runs' test sets differ in size ({item_counts(items)} vs {item_counts(base_items)} items per task)"))
            continue
        copies = [_copies(run, items, samples, seed, cache), _copies(base_run, base_items, samples, seed, cache)]
        diff.intervals[name] = bootstrap_interval([items, base_items], minus, level, samples, seed, copies)
    reasons = {iv.reason for iv in diff.intervals.values() if iv.method == "none" and iv.mean is not None}
    if reasons:
        diff.note = "; ".join(f"one pair, no interval: {r}" for r in sorted(reasons))


# --- curves -----------------------------------------------------------------------------


def curve_bands(group: SeedGroup, level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES,
                seed: int = BOOTSTRAP_SEED, cache: Optional[dict] = None) -> Optional[dict]:
    """Mean and interval of every cell of R and of ACC_k over the group's runs:
    {"R": (mean, low, high) arrays (T+1, T), "ACC": (mean, low, high) arrays (T,)}; t
    bands over seeds, bootstrap bands for one seed with item scores, else low = high =
    NaN (no band). None when no run has an R."""
    cache = {} if cache is None else cache
    mats = [M.accuracy_matrix(r.R) for r in group.runs if r.R is not None]
    if not mats or len({m.shape for m in mats}) > 1:
        return None
    stack = np.stack(mats)  # (n, T+1, T)
    T = stack.shape[2]
    acc = np.stack([_acc_curve(m) for m in stack])  # (n, T)
    if len(mats) >= 2:
        n = len(mats)
        quantile = t_quantile(0.5 + level / 2.0, n - 1)
        bands = []
        for data in (stack, acc):
            mean = data.mean(axis=0)
            half = quantile * data.std(axis=0, ddof=1) / math.sqrt(n)
            bands.append((mean, mean - half, mean + half))
        return {"R": bands[0], "ACC": bands[1], "n": n}
    items, _ = _items(group.runs[0], cache)
    mean_r, mean_acc = stack[0], acc[0]
    if items is None:
        return {"R": (mean_r, np.full_like(mean_r, np.nan), np.full_like(mean_r, np.nan)),
                "ACC": (mean_acc, np.full_like(mean_acc, np.nan), np.full_like(mean_acc, np.nan)), "n": 1}
    copies = _copies(group.runs[0], items, samples, seed, cache)  # (B, T+1, T)
    lo_q, hi_q = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    acc_copies = np.stack([copies[:, k + 1, : k + 1].mean(axis=1) for k in range(T)], axis=1)  # (B, T)
    with np.errstate(all="ignore"):
        r_band = (mean_r, np.quantile(copies, lo_q, axis=0), np.quantile(copies, hi_q, axis=0))
        a_band = (mean_acc, np.quantile(acc_copies, lo_q, axis=0), np.quantile(acc_copies, hi_q, axis=0))
    return {"R": r_band, "ACC": a_band, "n": 1}


def _acc_curve(R: np.ndarray) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in M.accuracy_curve(R)])
