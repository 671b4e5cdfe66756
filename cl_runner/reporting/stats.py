"""Confidence intervals for run metrics: pure functions, no files.

- `t_interval`: mean ± t_{(1+level)/2, n-1} · s / √n over independent runs (seeds).
- `bootstrap_interval`: a percentile bootstrap over test items, for a single seed: every
  replicate resamples each task's test items (with replacement, the same indices for
  every row of R and every run given), rebuilds R from the resampled items' mean scores
  and recomputes the statistic.

The t quantile is computed here (regularised incomplete beta + bisection), so the
statistics need nothing beyond numpy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval. `method`: "t" (over n seeds), "bootstrap"
    (over test items, one seed) or "none" (low/high are None; `reason` says why)."""

    mean: Optional[float]
    low: Optional[float] = None
    high: Optional[float] = None
    n: int = 0
    method: str = "none"
    reason: str = ""

    @property
    def half_width(self) -> Optional[float]:
        """t: the exact ± of the interval; bootstrap (not symmetric): the larger side."""
        if self.mean is None or self.low is None or self.high is None:
            return None
        return max(self.mean - self.low, self.high - self.mean)

    @property
    def excludes_zero(self) -> Optional[bool]:
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


# --- Student's t quantile -----------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (e.g. t_quantile(0.975, 2) = 4.3027)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile: degrees of freedom must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --- intervals ------------------------------------------------------------------------------


def t_interval(values: Sequence[Optional[float]], level: float = LEVEL) -> Interval:
    """mean ± t_{(1+level)/2, n-1} · s/√n (s: the sample standard deviation, n - 1 in
    the denominator). Missing values (None/NaN) are dropped; with fewer than two left
    there is no interval."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(kept)
    if n == 0:
        return Interval(None, n=0, reason="no value")
    mean = float(np.mean(kept))
    if n == 1:
        return Interval(mean, n=1, reason="one seed")
    half = t_quantile(0.5 + level / 2.0, n - 1) * float(np.std(kept, ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n=n, method="t")


ItemScores = Sequence[Sequence[Optional[np.ndarray]]]  # [row i][task j] -> per-item scores, or None


def item_counts(items: ItemScores) -> list[int]:
    """Test items per task (column), checked to agree across the rows that have scores."""
    counts: list[Optional[int]] = [None] * len(items[0])
    for row in items:
        for j, cell in enumerate(row):
            if cell is None:
                continue
            if counts[j] is not None and counts[j] != len(cell):
                raise ValueError(f"task {j + 1}: {counts[j]} and {len(cell)} scored items in different rows of R")
            counts[j] = len(cell)
    return [c or 0 for c in counts]


def resampled_matrices(runs: Sequence[ItemScores], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> list[np.ndarray]:
    """For each run, `samples` bootstrap copies of R, shape (samples, T+1, T): each task's
    items are resampled with replacement and each cell is the mean score of the
    resampled items (NaN where the run has no scores). The indices of task j are drawn
    once per replicate and used for every row and every run, so rows of one run and runs
    on the same test set stay paired. Deterministic for a given seed, and a run's copies
    do not depend on which other runs are given (the draws depend on the item counts
    only), so copies drawn for each run alone pair up as well."""
    counts = item_counts(runs[0])
    for other in runs[1:]:
        if item_counts(other) != counts:
            raise ValueError(f"the runs' test sets differ in size ({counts} vs {item_counts(other)} items per task)")
    rng = np.random.default_rng(seed)
    rows, T = len(runs[0]), len(counts)
    out = [np.full((samples, rows, T), np.nan) for _ in runs]
    for j, n_items in enumerate(counts):
        if n_items == 0:
            continue
        idx = rng.integers(0, n_items, size=(samples, n_items))
        for r, items in enumerate(runs):
            for i in range(rows):
                cell = items[i][j]
                if cell is not None:
                    out[r][:, i, j] = np.asarray(cell, dtype=float)[idx].mean(axis=1)
    return out


def full_matrix(items: ItemScores) -> np.ndarray:
    """R rebuilt from the per-item scores: each cell the mean of its items (NaN: none)."""
    return np.array([[np.nan if c is None else float(np.mean(c)) for c in row] for row in items])


def bootstrap_interval(runs: Sequence[ItemScores], statistic: Callable[..., Optional[float]],
                       level: float = LEVEL, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       copies: Optional[Sequence[np.ndarray]] = None) -> Interval:
    """Percentile bootstrap over test items of `statistic(R_run1, R_run2, ...)` (one R
    per run given; a difference of two runs takes two). The point estimate is the
    statistic of the runs' full-sample R. `copies`: the runs' `resampled_matrices`, when
    already drawn (the same seed gives every run of a test set the same indices)."""
    point = statistic(*(full_matrix(items) for items in runs))
    if point is None:
        return Interval(None, n=1, reason="metric not defined")
    copies = resampled_matrices(runs, samples, seed) if copies is None else copies
    samples = len(copies[0])
    values = np.array([np.nan if (v := statistic(*(c[b] for c in copies))) is None else v for b in range(samples)])
    values = values[~np.isnan(values)]
    if values.size < samples:
        return Interval(float(point), n=1, reason="metric undefined in some resamples")
    low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(point), float(low), float(high), n=1, method="bootstrap")
