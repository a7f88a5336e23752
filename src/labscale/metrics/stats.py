"""Percentile bootstrap CIs and paired bootstrap tests over per-example statistic rows."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np

from labscale.metrics.base import mean_of_first_column, nanmean_of_first_column

Aggregate = Callable[[np.ndarray], float]

# Aggregates that are (nan)means of column 0 get the vectorised resampling path.
_MEANS: dict[Callable, Callable] = {mean_of_first_column: np.mean, nanmean_of_first_column: np.nanmean}


def resample(stats: np.ndarray, idx: np.ndarray, aggregate: Aggregate) -> np.ndarray:
    """Aggregate of every resample; `idx` is (n_boot, n) row indices."""
    mean = _MEANS.get(aggregate)
    if mean is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample under nanmean
            return mean(stats[:, 0][idx], axis=1)
    return np.array([aggregate(stats[rows]) for rows in idx], dtype=float)


def interval(scores: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.nanpercentile(scores, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(
    stats: np.ndarray, aggregate: Aggregate, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap (1 − alpha) CI of `aggregate` over resampled rows of `stats`."""
    stats = np.asarray(stats, dtype=float)
    value = aggregate(stats) if len(stats) else float("nan")
    if math.isnan(value):
        return float("nan"), float("nan")
    if len(stats) == 1:
        return value, value
    idx = np.random.default_rng(seed).integers(0, len(stats), size=(n_boot, len(stats)))
    return interval(resample(stats, idx, aggregate), alpha)


def paired_bootstrap(
    stats_a: np.ndarray,
    stats_b: np.ndarray,
    aggregate: Aggregate,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired bootstrap of agg(a) − agg(b) for two models scored on the same, row-aligned examples.

    Both models are resampled with the same row indices. `diff` is the difference on the full data; `low`/`high`
    the percentile CI of the resampled differences. `p_value` is two-sided: twice the share of resampled
    differences that fall on the other side of 0 from `diff` (ties at 0 count against it), capped at 1; it is 1
    when `diff` is 0 and NaN with fewer than two examples.
    """
    a, b = np.asarray(stats_a, dtype=float), np.asarray(stats_b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs aligned rows, got {len(a)} and {len(b)}")
    n = len(a)
    diff = aggregate(a) - aggregate(b) if n else float("nan")
    if math.isnan(diff):
        return {"diff": diff, "low": diff, "high": diff, "p_value": float("nan")}
    if n == 1:
        return {"diff": diff, "low": diff, "high": diff, "p_value": float("nan")}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    diffs = resample(a, idx, aggregate) - resample(b, idx, aggregate)
    low, high = interval(diffs, alpha)
    if diff > 0:
        p = 2 * float(np.mean(diffs <= 0))
    elif diff < 0:
        p = 2 * float(np.mean(diffs >= 0))
    else:
        p = 1.0
    return {"diff": float(diff), "low": low, "high": high, "p_value": min(1.0, p)}


def macro_bootstrap(stats: list[np.ndarray], n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> tuple[float, float, float]:
    """(value, low, high) of the unweighted mean over groups (e.g. a task group's member tasks) of each group's
    mean of column 0, with a percentile-bootstrap CI that resamples every group's rows independently (a stratified
    bootstrap: each task keeps its size, so the CI reflects each task's own sampling error). NaN rows (a metric
    undefined for an example) are ignored within their group."""
    if not stats:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    columns = [np.asarray(s, dtype=float).reshape(len(s), -1)[:, 0] for s in stats]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(np.mean([np.nanmean(c) for c in columns]))
        if math.isnan(value):
            return value, value, value
        means = [np.nanmean(c[rng.integers(0, len(c), size=(n_boot, len(c)))], axis=1) for c in columns]
    low, high = interval(np.mean(means, axis=0), alpha)
    return value, low, high
