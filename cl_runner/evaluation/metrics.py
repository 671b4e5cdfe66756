"""Continual-learning metrics, pure functions of the accuracy matrix R.

R is a (T+1) x T array for a stream of T tasks: R[0, j] is the score on task j before
any training (the base model) and R[i, j] the score on task j after training on tasks
1..i, on a 0..1 scale. Task indices in the formulas are 1-based, as in the papers, so
task j is column j-1 of the array and row i is "after task i".

A run in progress has missing entries (NaN or None). Every metric that needs a missing
entry returns None, which is also what a metric undefined for T = 1 (BWT, FWT,
forgetting) returns: JSON null, never 0 or NaN. Entries above the diagonal (scores on
tasks not learned yet) are only needed by FWT.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

Number = Optional[float]


def accuracy_matrix(R) -> np.ndarray:
    """R as a float array after checking it is (T+1) x T with scores in [0, 1];
    None becomes NaN (not evaluated yet)."""
    try:
        arr = np.array(R, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "R must be a (T+1) x T accuracy matrix of numbers (None or NaN where not "
            f"evaluated yet), one row per training stage; could not read it: {err}"
        ) from None
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.shape[0] != arr.shape[1] + 1:
        raise ValueError(
            f"R must be a (T+1) x T accuracy matrix: row 0 = before training, row i = after "
            f"task i, one column per task; got shape {arr.shape}. If you have no 'before' "
            "row, add the base model's scores (or a row of None) as row 0."
        )
    finite = arr[np.isfinite(arr)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        i, j = np.argwhere(np.isfinite(arr) & ((arr < 0) | (arr > 1)))[0]
        raise ValueError(
            f"R[{i}, {j}] = {arr[i, j]:g} is outside [0, 1]; scores are on a 0..1 scale "
            "(divide percentages by 100)"
        )
    if np.isinf(arr).any():
        raise ValueError("R has an infinite entry; use NaN or None for 'not evaluated'")
    return arr


def num_tasks(R) -> int:
    """T, the number of tasks (columns) of R."""
    return accuracy_matrix(R).shape[1]


def _mean(values) -> Number:
    """Mean as a Python float, or None when any value is missing (NaN)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.isnan(values).any():
        return None
    return float(values.mean())


def average_accuracy(R) -> Number:
    """ACC = (1/T) sum_j R[T, j]: the mean score over all tasks after the last one.

    The headline number (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for
    Continual Learning"); TRACE (Wang et al. 2023) calls it OP, overall performance."""
    arr = accuracy_matrix(R)
    return _mean(arr[-1, :])


def accuracy_curve(R) -> list[Number]:
    """[ACC_1, ..., ACC_T] with ACC_k = (1/k) sum_{j<=k} R[k, j]: the mean over the
    tasks seen so far, after each task (a macro mean, like ACC). ACC_T = ACC."""
    arr = accuracy_matrix(R)
    return [_mean(arr[k, :k]) for k in range(1, arr.shape[1] + 1)]


def average_incremental_accuracy(R) -> Number:
    """AIA = (1/T) sum_k ACC_k, the area under the accuracy curve (Rebuffi et al. 2017,
    "iCaRL: Incremental Classifier and Representation Learning")."""
    return _mean([math.nan if a is None else a for a in accuracy_curve(R)])


def backward_transfer(R) -> Number:
    """BWT = 1/(T-1) sum_{j=1}^{T-1} (R[T, j] - R[j, j]) (Lopez-Paz & Ranzato 2017).

    How much learning later tasks changed the earlier ones, from the score just after
    learning each; negative means forgetting. TRACE also divides by T-1 (the last task
    has no later tasks). None when T = 1."""
    arr = accuracy_matrix(R)
    T = arr.shape[1]
    if T < 2:
        return None
    return _mean([arr[T, j - 1] - arr[j, j - 1] for j in range(1, T)])


def forward_transfer(R) -> Number:
    """FWT = 1/(T-1) sum_{j=2}^{T} (R[j-1, j] - R[0, j]) (Lopez-Paz & Ranzato 2017).

    The score on task j just before it is learned, against the base model's (row 0,
    standing in for GEM's random-initialisation baseline): what earlier tasks taught
    about later ones. Needs row 0 and the entries just above the diagonal. None when
    T = 1."""
    arr = accuracy_matrix(R)
    T = arr.shape[1]
    if T < 2:
        return None
    return _mean([arr[j - 1, j - 1] - arr[0, j - 1] for j in range(2, T + 1)])


def forgetting(R, j: int, k: int) -> Number:
    """f_j^k = max_{j<=l<k} R[l, j] - R[k, j]: forgetting of task j after task k.

    The drop from the best score task j ever had since it was learned to its score after
    task k (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning",
    with l starting at j: rows before task j was learned do not count). It uses the
    maximum, not the diagonal, so it differs from -BWT when a task peaks later.
    `j` and `k` are 1-based, 1 <= j < k <= T."""
    arr = accuracy_matrix(R)
    T = arr.shape[1]
    if not (isinstance(j, (int, np.integer)) and isinstance(k, (int, np.integer)) and 1 <= j < k <= T):
        raise ValueError(
            f"forgetting(R, j={j!r}, k={k!r}): need whole numbers 1 <= j < k <= T = {T} "
            "(1-based task indices; task j is forgotten after learning task k > j)"
        )
    history = arr[j:k, j - 1]
    if np.isnan(history).any() or math.isnan(arr[k, j - 1]):
        return None
    return float(history.max() - arr[k, j - 1])


def forgetting_per_task(R, task_names: Sequence[str]) -> dict[str, Number]:
    """{name: f_j^T} for every task; the last task has no forgetting (None)."""
    arr = accuracy_matrix(R)
    T = arr.shape[1]
    names = _check_task_names(task_names, T)
    return {names[j - 1]: (forgetting(arr, j, T) if j < T else None) for j in range(1, T + 1)}


def average_forgetting(R) -> Number:
    """F = 1/(T-1) sum_{j=1}^{T-1} f_j^T (Chaudhry et al. 2018): the average forgetting
    of the earlier tasks at the end of the stream. In general F != -BWT. None when T = 1."""
    arr = accuracy_matrix(R)
    T = arr.shape[1]
    if T < 2:
        return None
    values = [forgetting(arr, j, T) for j in range(1, T)]
    return _mean([math.nan if v is None else v for v in values])


def learning_accuracy(R) -> Number:
    """LA = (1/T) sum_j R[j, j]: the score on each task just after learning it, i.e.
    plasticity (Riemer et al. 2019, "Learning to Learn without Forgetting by Maximizing
    Transfer and Minimizing Interference")."""
    arr = accuracy_matrix(R)
    return _mean(np.diagonal(arr[1:, :]))


def _check_task_names(task_names: Sequence[str], T: int) -> list[str]:
    if isinstance(task_names, str):
        raise TypeError("task_names must be a list of task names, not a single string")
    names = [str(n) for n in task_names]
    if len(names) != T:
        raise ValueError(f"task_names has {len(names)} names but R has T = {T} task columns; give one name per column")
    if len(set(names)) != len(names):
        raise ValueError(f"task_names must be unique; got {names}")
    return names


def summarize(R, task_names: Sequence[str]) -> dict:
    """All metrics of R as a JSON-ready dict (None for undefined or not yet available):

    ACC, BWT, FWT, forgetting (the average F), forgetting_per_task {name: f_j^T},
    LA, ACC_per_step [ACC_1..ACC_T] and AIA (average incremental accuracy)."""
    arr = accuracy_matrix(R)
    _check_task_names(task_names, arr.shape[1])
    return {
        "ACC": average_accuracy(arr),
        "BWT": backward_transfer(arr),
        "FWT": forward_transfer(arr),
        "forgetting": average_forgetting(arr),
        "forgetting_per_task": forgetting_per_task(arr, task_names),
        "LA": learning_accuracy(arr),
        "ACC_per_step": accuracy_curve(arr),
        "AIA": average_incremental_accuracy(arr),
    }
