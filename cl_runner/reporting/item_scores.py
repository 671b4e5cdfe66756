"""Per-item test scores of a finished run, for the bootstrap over test items.

cl-run writes `predictions/task_<j>_after_<i>.jsonl` (j 1-based task, i tasks learned,
one line per test item with its `score`) when `evaluation.save_predictions` is on (the
default), else `item_scores/task_<j>_after_<i>.json` (a JSON list of the items' scores).
A task's score in R is the mean of its items' scores, so R can be rebuilt from resampled
items. Without those files (runs from before item_scores/, with predictions off) or when
they do not reproduce R there is no item-level interval, and the loader says why
instead of inventing one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PREDICTIONS = "predictions"
ITEM_SCORES = "item_scores"
# R.csv keeps 6 decimals; metrics.json the full float. A file whose mean is further off
# than this is not the evaluation behind R (a rerun, a partial file).
TOLERANCE = 1e-5


def predictions_path(run_folder: Path, task: int, tasks_learned: int) -> Path:
    """`task` is 1-based, `tasks_learned` 0..T (0: before training)."""
    return Path(run_folder) / PREDICTIONS / f"task_{task}_after_{tasks_learned}.jsonl"


def item_scores_path(run_folder: Path, task: int, tasks_learned: int) -> Path:
    return Path(run_folder) / ITEM_SCORES / f"task_{task}_after_{tasks_learned}.json"


def _read_scores(path: Path) -> np.ndarray:
    if path.suffix == ".json":
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{path}: expected a JSON list of numbers")
        return np.asarray(values, dtype=float)
    scores = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            value = json.loads(line).get("score")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path}:{n}: score {value!r} is not a number")
            scores.append(float(value))
    return np.asarray(scores)


def load_item_scores(run_folder: Path, R: Sequence[Sequence[Optional[float]]]):
    """(items, reason): items[i][j] are the per-item scores behind R[i][j] (None where R
    is None), or items is None and `reason` says why there are none."""
    items: list[list[Optional[np.ndarray]]] = []
    for i, row in enumerate(R):
        cells: list[Optional[np.ndarray]] = []
        for j, value in enumerate(row):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append(None)
                continue
            path = predictions_path(run_folder, j + 1, i)
            if not path.is_file():
                path = item_scores_path(run_folder, j + 1, i)
            if not path.is_file():
                return None, f"no per-item scores (no {PREDICTIONS}/ or {ITEM_SCORES}/ files for every cell of R)"
            try:
                scores = _read_scores(path)
            except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
                return None, f"per-item scores unreadable ({err})"
            if scores.size == 0:
                return None, f"no per-item scores ({path.parent.name}/{path.name} is empty)"
            if abs(float(scores.mean()) - float(value)) > TOLERANCE:
                return None, (f"per-item scores do not match R ({path.parent.name}/{path.name}: mean {scores.mean():.6f}, "
                              f"R[{i}][{j}] = {value:.6f})")
            cells.append(scores)
        items.append(cells)
    return items, ""
