"""Per-group breakdown of a metric: the value in each group, the worst group and the largest gap, with CIs.

Each group is resampled on its own (a stratified bootstrap: group sizes stay fixed, as in the data). The b-th
replicate of every group together gives one replicate of the worst-group value (min over groups, or max when lower
is better) and of the gap (max − min over groups), so their percentile CIs come from the same resamples as the
per-group CIs. Groups where the metric is undefined (NaN, e.g. a bias score with no eligible rows) are shown but
left out of the worst group and the gap.
"""

from __future__ import annotations

import math
import warnings

from typing import Any

import numpy as np

from labscale.metrics.stats import Aggregate, interval, resample


def group_breakdown(stats: np.ndarray, aggregate: Aggregate, labels: list[str | None], higher_is_better: bool,
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> list[dict]:
    """Rows {kind: group|worst|gap, group, value, ci_low, ci_high, n}; examples labelled None are left out."""
    stats = np.asarray(stats, dtype=float)
    names = sorted({g for g in labels if g is not None})
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    values: dict[str, float] = {}
    replicates: dict[str, np.ndarray] = {}
    for g in names:
        sub = stats[[i for i, label in enumerate(labels) if label == g]]
        value = aggregate(sub)
        reps = resample(sub, rng.integers(0, len(sub), size=(n_boot, len(sub))), aggregate)
        if not math.isnan(value):
            values[g], replicates[g] = value, reps
        low, high = (value, value) if len(sub) == 1 or math.isnan(value) else interval(reps, alpha)
        rows.append({"kind": "group", "group": g, "value": value, "ci_low": low, "ci_high": high, "n": len(sub)})
    if len(values) < 2:
        return rows
    defined = sorted(values, key=lambda g: (values[g], g))
    lowest, highest = defined[0], defined[-1]
    worst = lowest if higher_is_better else highest
    reps = np.stack([replicates[g] for g in defined])
    with warnings.catch_warnings():  # a replicate where every group is undefined: NaN, left out of the CI
        warnings.simplefilter("ignore", RuntimeWarning)
        worst_reps = np.nanmin(reps, axis=0) if higher_is_better else np.nanmax(reps, axis=0)
        gap_reps = np.nanmax(reps, axis=0) - np.nanmin(reps, axis=0)
    n = sum(r["n"] for r in rows if r["group"] in values)
    rows.append({"kind": "worst", "group": worst, "value": values[worst], **_ci(worst_reps, alpha),
                 "n": next(r["n"] for r in rows if r["group"] == worst)})
    rows.append({"kind": "gap", "group": f"{highest} − {lowest}", "value": values[highest] - values[lowest],
                 **_ci(gap_reps, alpha), "n": n})
    return rows


def _ci(reps: np.ndarray, alpha: float) -> dict:
    low, high = interval(reps, alpha)
    return {"ci_low": low, "ci_high": high}
