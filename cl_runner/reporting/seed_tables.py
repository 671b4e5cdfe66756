"""cl-report's seed sections: the table of seed groups (mean ± interval, number of
seeds), the table of paired differences from the baseline, and their CSV."""
from __future__ import annotations

import csv
import io
from typing import Callable, Optional, Sequence

from cl_runner.reporting.formatting import (
    SIGNED_METRICS,
    format_bytes,
    format_interval,
    format_metric,
    markdown_table,
    text_table,
)
from cl_runner.reporting.seed_groups import METRICS, Difference, SeedGroup, find_baseline

GROUP_HEADERS = ("strategy", "model", "seeds", *METRICS)
DIFF_HEADERS = ("strategy", "model", "pairs", *(f"Δ{m}" for m in METRICS))
COST_HEADERS = ("strategy", "model", "seeds", "train s/step", "ratio", "peak memory", "ratio")
TEXT_COLUMNS = 3
EXCLUDES_ZERO_MARK = " *"


def _signed(metric: str) -> bool:
    return metric in SIGNED_METRICS


def group_row(group: SeedGroup) -> list[str]:
    return [group.label, group.first.model, group.seeds_text(),
            *(format_interval(group.intervals.get(m), _signed(m)) for m in METRICS)]


def difference_row(diff: Difference) -> list[str]:
    cells = []
    for m in METRICS:
        interval = diff.intervals.get(m)
        text = format_interval(interval, signed=True)
        cells.append(text + (EXCLUDES_ZERO_MARK if interval is not None and interval.excludes_zero else ""))
    pairs = f"{diff.n} ({','.join(str(s) for s, _, _ in diff.pairs)})" if diff.pairs else "0"
    return [diff.group.label, diff.group.first.model, pairs, *cells]


def _table(headers, rows, fmt: str) -> str:
    return markdown_table(headers, rows, TEXT_COLUMNS) if fmt == "markdown" else text_table(headers, rows, TEXT_COLUMNS)


def render_seed_sections(groups: Sequence[SeedGroup], differences: Optional[Sequence[Difference]],
                         baseline: Optional[str], fmt: str, level: float,
                         environment_note: Callable[[Sequence], str]) -> str:
    """The seed-group table with its notes, then (with a baseline) the differences."""
    pct = f"{level * 100:g}%"
    title = (f"seed groups: mean ± {pct} CI (t over the n seeds; n = 1: [bootstrap over test items], "
             "or the value alone without per-item scores)")
    holders: dict[str, list[str]] = {}  # note -> the groups it is about (one line for all of them)
    for group in groups:
        env = environment_note(group.runs) if group.n > 1 else ""
        for note in ([env] if env else []) + group.notes:
            holders.setdefault(note, []).append(f"{group.label} ({group.first.model})")
    notes = [f"{', '.join(names)}: {note}" for note, names in holders.items()]
    sections = [[_heading(title, fmt), _table(GROUP_HEADERS, [group_row(g) for g in groups], fmt)]]
    if notes:
        sections[0].append(_join_notes(notes, fmt))
    shown = [d for d in differences or [] if d.group in groups]
    if shown:
        section = [_heading(f"difference from {baseline}, paired by seed (mean ± {pct} CI of the differences; "
                            f"*: the interval excludes 0)", fmt),
                   _table(DIFF_HEADERS, [difference_row(d) for d in shown], fmt)]
        diff_notes = [f"{d.group.label} ({d.group.first.model}): {d.note}" for d in shown if d.note]
        section += [_join_notes(diff_notes + conclusion(shown, baseline), fmt)]
        sections.append(section)
    if baseline is not None:
        rows = cost_rows(groups, baseline)
        if rows:
            sections.append([_heading(f"cost relative to {baseline} on the full model (mean over seeds; same "
                                      "machine and load assumed: compare runs of one comparison)", fmt),
                             _table(COST_HEADERS, rows, fmt)])
    inner = "\n\n" if fmt == "markdown" else "\n"
    return "\n\n".join(inner.join(section) for section in sections)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def cost_baseline(groups: Sequence[SeedGroup], group: SeedGroup, baseline: str) -> Optional[SeedGroup]:
    """The baseline's group on the same stream and the full model: an adapter run
    (`minilm+lora`) is costed against full fine-tuning (`minilm`), what it is meant to save."""
    full_model = group.first.model.split("+", 1)[0]
    for g in find_baseline(groups, baseline):
        if g.first.model == full_model and g.first.group == group.first.group:
            return g
    return None


def group_cost(group: SeedGroup) -> tuple[Optional[float], Optional[float]]:
    """(training seconds per optimizer step, peak memory bytes), means over the seeds."""
    return _mean([r.seconds_per_step for r in group.runs]), _mean([r.peak_memory_bytes for r in group.runs])


def cost_rows(groups: Sequence[SeedGroup], baseline: str) -> list[list[str]]:
    """Per seed group: training seconds per optimizer step and peak memory, each with its
    ratio to the baseline's (means over seeds). Empty when no group has a cost."""
    rows = []
    for g in groups:
        step, memory = group_cost(g)
        if step is None and memory is None:
            continue
        base = cost_baseline(groups, g, baseline)
        base_step, base_memory = group_cost(base) if base else (None, None)
        ratios = [_ratio_value(step, base_step), _ratio_value(memory, base_memory)]
        rows.append([g.label, g.first.model, g.seeds_text(), "-" if step is None else f"{step:.3f}",
                     "-" if ratios[0] is None else f"{ratios[0]:.2f}x", format_bytes(memory),
                     "-" if ratios[1] is None else f"{ratios[1]:.2f}x"])
    return rows


def _ratio_value(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return None if value is None or not base else value / base


def conclusion(differences: Sequence[Difference], baseline: Optional[str]) -> list[str]:
    """Which differences from the baseline have an interval that excludes 0
    (`ewc (ACC +0.250, F -0.425)`), which have intervals that all contain 0, and which
    have no interval at all (no paired seeds, or one pair without per-item scores)."""
    outside, within, unknown = [], [], []
    for d in differences:
        hits = [f"{m} {format_metric(iv.mean, True)}" for m, iv in d.intervals.items() if iv.excludes_zero]
        if hits:
            outside.append(f"{d.group.label} ({', '.join(hits)})")
        elif any(iv.method != "none" for iv in d.intervals.values()):
            within.append(d.group.label)
        else:
            unknown.append(d.group.label)
    text = []
    if outside:
        text.append(f"differences from {baseline} whose interval excludes 0: {'; '.join(outside)}")
    if within:
        text.append(f"every interval of the difference from {baseline} contains 0: {', '.join(within)}")
    if unknown:
        text.append(f"no interval for the difference from {baseline}: {', '.join(unknown)}")
    return text


def _heading(text: str, fmt: str) -> str:
    return f"#### {text}" if fmt == "markdown" else f"-- {text} --"


def _join_notes(notes: Sequence[str], fmt: str) -> str:
    return "\n\n".join(notes) if fmt == "markdown" else "\n".join(notes)


def seeds_csv_text(groups_by_place: dict, differences: Optional[Sequence[Difference]], baseline: Optional[str],
                   level: float) -> str:
    """One row per seed group: n_seeds, seeds, runs, and per metric mean/low/high and the
    interval's method; the mean seconds per training step, peak memory and change of the
    monitor tasks (before training to the end); with a baseline, per metric the paired
    difference's mean/low/high and whether it excludes 0, and the cost ratios to the
    baseline on the full model (`cost_baseline`). Empty cell: no value."""
    by_group = {id(d.group): d for d in differences or []}
    columns = ["stream", "tasks", "model", "strategy", "n_seeds", "seeds", "runs", "level"]
    for m in METRICS:
        columns += [f"{m}_mean", f"{m}_low", f"{m}_high", f"{m}_interval"]
    columns += ["train_s_per_step", "peak_memory_bytes", "monitor_change"]
    if differences is not None:
        columns += ["baseline", "n_pairs"]
        for m in METRICS:
            columns += [f"{m}_diff_mean", f"{m}_diff_low", f"{m}_diff_high", f"{m}_diff_excludes_0"]
        columns += ["step_time_ratio", "peak_memory_ratio"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for groups in groups_by_place.values():
        for g in groups:
            r = g.first
            row = [r.stream, " ".join(r.tasks) if r.tasks else None, r.model, g.label, g.n,
                   " ".join("" if s is None else str(s) for s in g.seeds), " ".join(x.run_id for x in g.runs), level]
            for m in METRICS:
                iv = g.intervals.get(m)
                row += [iv.mean, iv.low, iv.high, iv.method] if iv else [None] * 4
            step, memory = group_cost(g)
            row += [step, memory, _mean([r.monitor_change for r in g.runs])]
            if differences is not None:
                d = by_group.get(id(g))
                row += [baseline, d.n if d else None]
                for m in METRICS:
                    iv = d.intervals.get(m) if d else None
                    row += [iv.mean, iv.low, iv.high, iv.excludes_zero] if iv else [None] * 4
                base = cost_baseline(groups, g, baseline)
                base_step, base_memory = group_cost(base) if base else (None, None)
                row += [_ratio_value(step, base_step), _ratio_value(memory, base_memory)]
            writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()
