"""`cl-report --layout table`: runs laid out as a paper prints its comparison table.

Methods are rows (the `paper_table.row` a table's row preset sets, in its `rank`; a run
made outside a table is its strategy label), task orders are columns, plus their average;
each cell is the mean over seeds, with the 95% t interval's ± where there are several.
Values are percentages, as O-LoRA's and TRACE's tables print them. With one order the
metrics are the columns (TRACE: OP and BWT); with several, one table per metric.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from typing import Optional, Sequence

from cl_runner.reporting.stats import LEVEL, t_interval

# How the papers name cl-runner's metrics: TRACE calls ACC "OP" (overall performance).
METRIC_NAMES = {"ACC": "ACC", "BWT": "BWT", "FWT": "FWT", "forgetting": "F", "LA": "LA"}


def row_of(run) -> tuple[int, str]:
    """(rank, name) of the run's row: its table row preset's, else its strategy label
    (with the adapter: `seq_ft (lora)`)."""
    name = run.config.get("paper_table.row")
    if name and name != "None":
        return int(run.config.get("paper_table.rank", 0) or 0), name
    adapter = run.model.partition("+")[2]
    label = run.strategy_label
    return 10**6, f"{label} ({adapter})" if adapter else label


def column_of(run) -> str:
    """The task order: its name (order1) or, for a list, the tasks joined by arrows."""
    order = run.config.get("task_stream.order", "")
    if order and not order.startswith("["):
        return order
    try:
        names = ast.literal_eval(order) if order else None
    except (ValueError, SyntaxError):
        names = None
    names = names or list(run.tasks or ())
    return "→".join(str(n) for n in names) or run.stream


def cell_text(values: Sequence[Optional[float]], level: float = LEVEL) -> str:
    """`76.5 ± 1.2` over several seeds, `76.5` for one, `-` for none (percent)."""
    interval = t_interval(values, level)
    if interval.mean is None:
        return "-"
    text = f"{100 * interval.mean:.1f}"
    if interval.half_width is not None:
        text += f" ± {100 * interval.half_width:.1f}"
    return text


def _average_text(by_column: dict[str, dict[int, float]], columns: list[str], level: float) -> str:
    """The mean over the orders; its ± over the seeds that ran every order."""
    per_seed = [
        sum(by_column[c][s] for c in columns) / len(columns)
        for s in set.intersection(*(set(by_column[c]) for c in columns))
    ] if columns and all(by_column.get(c) for c in columns) else []
    if len(per_seed) >= 2:
        return cell_text(per_seed, level)
    means = [sum(by_column[c].values()) / len(by_column[c]) for c in columns if by_column.get(c)]
    return f"{100 * sum(means) / len(means):.1f}" if means else "-"


def paper_tables(runs: Sequence, metrics: Sequence[str] = ("ACC",), level: float = LEVEL) -> str:
    """The markdown table(s) of `runs` in the paper's layout."""
    # values[metric][row][column][seed] = value
    values: dict[str, dict[tuple, dict[str, dict[int, float]]]] = {
        m: defaultdict(lambda: defaultdict(dict)) for m in metrics}
    columns: list[str] = []
    tables = sorted({run.config.get("paper_table.name") or "" for run in runs} - {"None", ""})
    for i, run in enumerate(runs):
        row, column = row_of(run), column_of(run)
        if column not in columns:
            columns.append(column)
        seed = run.seed if run.seed is not None else -1 - i
        for metric in metrics:
            value = getattr(run, metric)
            if value is not None:
                values[metric][row][column][seed] = value
    columns.sort()
    rows = sorted({row for m in metrics for row in values[m]})
    seeds = sorted({s for m in metrics for r in values[m].values() for c in r.values() for s in c if s >= 0})
    title = (f"Table {', '.join(tables)}: " if tables else "") + \
        f"{len(runs)} runs, seeds {', '.join(map(str, seeds)) or '-'}; percent, mean ± 95% t interval over seeds"
    parts = [f"**{title}**", ""]
    if len(columns) == 1:
        head = ["method", *(METRIC_NAMES.get(m, m) for m in metrics)]
        lines = [_line(head), _line(["---"] + ["---:"] * len(metrics))]
        for row in rows:
            lines.append(_line([row[1], *(cell_text(list(values[m][row][columns[0]].values()), level)
                                          for m in metrics)]))
        parts += [f"Order: {columns[0]}", "", *lines, ""]
        return "\n".join(parts)
    for metric in metrics:
        lines = [_line(["method", *columns, "Avg"]), _line(["---"] + ["---:"] * (len(columns) + 1))]
        for row in rows:
            by_column = values[metric][row]
            cells = [cell_text(list(by_column[c].values()), level) if by_column.get(c) else "-" for c in columns]
            lines.append(_line([row[1], *cells, _average_text(by_column, columns, level)]))
        parts += [f"{METRIC_NAMES.get(metric, metric)}:", "", *lines, ""]
    return "\n".join(parts)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
