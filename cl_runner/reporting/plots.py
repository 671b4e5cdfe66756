"""Figures of a run (accuracy matrix, forgetting curves) and of several runs side by side.

Figures are drawn on `matplotlib.figure.Figure` objects and saved with the Agg canvas,
never through pyplot, so nothing opens a window, touches the global backend or leaks
figures in a long process. Each function writes one file and returns its path.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cl_runner.evaluation.metrics import accuracy_curve, accuracy_matrix


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no GUI backend is ever chosen
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _names(task_names: Sequence[str], T: int) -> list[str]:
    names = [str(n) for n in task_names]
    if len(names) != T:
        raise ValueError(f"task_names has {len(names)} names but R has T = {T} task columns; give one name per column")
    return names


def plot_accuracy_matrix(R, task_names: Sequence[str], path, title: Optional[str] = None) -> Path:
    """Heat map of R with every score written in its cell. Rows are "before" and
    "after <task>", columns the evaluated tasks; the diagonal (a task just after
    learning it) is outlined, and cells not evaluated (NaN/None) are grey."""
    arr = accuracy_matrix(R)
    T = arr.shape[1]
    names = _names(task_names, T)
    fig = Figure(figsize=(max(5.0, 2.5 + 0.6 * T), max(3.5, 1.5 + 0.45 * (T + 1))))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="score")

    fontsize = 9 if T <= 8 else 7 if T <= 12 else 6
    for i in range(T + 1):
        for j in range(T):
            value = arr[i, j]
            if math.isnan(value):
                continue
            # dark cells of viridis need light text
            color = "white" if value < 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color=color)
    for j in range(T):
        ax.add_patch(Rectangle((j - 0.5, j + 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))

    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T + 1), ["before"] + [f"after {n}" for n in names])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("model after training on")
    ax.set_title(title or "Accuracy matrix R")
    return _save(fig, path)


def plot_forgetting_curves(R, task_names: Sequence[str], path) -> Path:
    """Score of every task against the number of tasks learned (0..T), dashed before
    the task is learned and solid after, with the running average ACC_k in black."""
    arr = accuracy_matrix(R)
    T = arr.shape[1]
    names = _names(task_names, T)
    fig = Figure(figsize=(max(6.0, 3.0 + 0.5 * T), 4.5))
    ax = fig.add_subplot()
    steps = np.arange(T + 1)
    for j, (name, color) in enumerate(zip(names, _colors(T))):
        learned_at = j + 1
        scores = arr[:, j]
        ax.plot(steps[: learned_at + 1], scores[: learned_at + 1], linestyle=":", color=color, alpha=0.4)
        ax.plot(steps[learned_at:], scores[learned_at:], marker="o", markersize=3, color=color, label=name)
    curve = np.array([math.nan if a is None else a for a in accuracy_curve(arr)])
    ax.plot(steps[1:], curve, color="black", linewidth=2.5, marker="s", markersize=4, label="ACC_k (mean of seen tasks)")

    ax.set_xticks(steps, ["0: before"] + [f"{k}: {n}" for k, n in enumerate(names, 1)], rotation=45, ha="right")
    ax.set_xlim(-0.2, T + 0.2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.set_title("Forgetting curves (dotted: before the task is learned)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


_BAR_METRICS = (("ACC", "ACC"), ("BWT", "BWT"), ("forgetting", "F"))


def plot_run_comparison(runs: Mapping[str, Mapping], path) -> Path:
    """Several runs on one figure: their ACC_per_step curves overlaid (left) and a bar
    chart of ACC, BWT and forgetting F (right). `runs` maps a label to a metrics dict
    (as in metrics.json); a missing or None value is drawn as "n/a"."""
    if not runs:
        raise ValueError("plot_run_comparison needs at least one run (a dict label -> metrics dict)")
    labels = list(runs)
    colors = _colors(len(labels))
    fig = Figure(figsize=(13.0, 4.8))
    curve_ax, bar_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1.0]})

    longest = 1
    for label, color in zip(labels, colors):
        steps = [math.nan if v is None else v for v in (runs[label].get("ACC_per_step") or [])]
        if steps:
            longest = max(longest, len(steps))
            curve_ax.plot(range(1, len(steps) + 1), steps, marker="o", markersize=3, color=color, label=label)
    curve_ax.set_xticks(range(1, longest + 1))
    curve_ax.set_ylim(-0.02, 1.02)
    curve_ax.set_xlabel("tasks learned")
    curve_ax.set_ylabel("ACC_k (mean over seen tasks)")
    curve_ax.grid(alpha=0.3)
    curve_ax.set_title("Average accuracy after each task")

    width = 0.8 / len(labels)
    annotate = len(labels) <= 6
    for r, (label, color) in enumerate(zip(labels, colors)):
        for m, (key, _) in enumerate(_BAR_METRICS):
            x = m + (r - (len(labels) - 1) / 2) * width
            value = runs[label].get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                bar_ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color=color)
                continue
            bar_ax.bar(x, value, width=width, color=color, label=label if m == 0 else None)
            if annotate:
                bar_ax.text(x, value, f"{value:.2f}", ha="center", va="bottom" if value >= 0 else "top", fontsize=7)
    bar_ax.axhline(0.0, color="black", linewidth=0.8)
    bar_ax.set_xticks(range(len(_BAR_METRICS)), [name for _, name in _BAR_METRICS])
    bar_ax.set_ylabel("value")
    bar_ax.set_title("Final metrics (ACC, BWT: higher is better; F: lower)")
    bar_ax.grid(axis="y", alpha=0.3)

    handles, names = curve_ax.get_legend_handles_labels()
    if not handles:
        handles, names = bar_ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(names) / 4)))
    fig.tight_layout()
    return _save(fig, path)


def plot_seed_curves(groups: Mapping[str, Mapping], task_names: Sequence[str], path, level: float = 0.95) -> Path:
    """Forgetting curves of groups of runs (one group = the seeds of one experiment) with
    their intervals: the first panel is ACC_k against tasks learned, then one panel per
    task with its score R[i, j] against i. Each group is a mean line with a shaded band
    (its interval; none where a group has no interval). `groups` maps a label to
    {"R": (mean, low, high) arrays (T+1, T), "ACC": (mean, low, high) arrays (T,), "n": seeds}."""
    if not groups:
        raise ValueError("plot_seed_curves needs at least one group (a dict label -> bands)")
    T = len(task_names)
    names = [str(n) for n in task_names]
    cols = min(4, T + 1)
    rows = math.ceil((T + 1) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colors = _colors(len(groups))
    steps = np.arange(T + 1)

    def draw(ax, x, band, color, label):
        mean, low, high = (np.asarray(a, dtype=float) for a in band)
        ax.plot(x, mean, marker="o", markersize=3, color=color, label=label)
        if np.isfinite(low).any():
            ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)

    for (label, data), color in zip(groups.items(), colors):
        shown = f"{label} (n={data.get('n', '?')})"
        draw(axes[0], steps[1:], data["ACC"], color, shown)
        for j in range(T):
            draw(axes[j + 1], steps, tuple(np.asarray(a)[:, j] for a in data["R"]), color, shown)
    axes[0].set_title("ACC_k (mean over seen tasks)", fontsize=9)
    for j, name in enumerate(names):
        axes[j + 1].set_title(f"{name} (learned at {j + 1})", fontsize=9)
        axes[j + 1].axvline(j + 1, color="grey", linewidth=0.8, linestyle=":")
    for k, ax in enumerate(axes):
        if k > T:
            ax.set_visible(False)
            continue
        ax.set_xticks(steps)
        ax.set_xlim(-0.2, T + 0.2)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("tasks learned", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"Forgetting curves: mean over seeds with the {level * 100:g}% interval", fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.04 - 0.04 * math.ceil(len(labels) / 3)))
    fig.tight_layout()
    return _save(fig, path)
