"""One paired comparison of two stored runs of the same task on the same test examples: the main metric's
difference A − B with a paired-bootstrap 95% CI (metrics/stats.py), as the report's paired-differences table
computes it. Used by the retrieval (closed-book vs rag:K) and compiled-prompt (optimized vs zero-/few-shot)
sections."""

from __future__ import annotations

import numpy as np

from labscale.report.format import fmt
from labscale.report.runs import StoredRun, shown_metric


def paired_main(a: StoredRun, b: StoredRun, n_boot: int, seed: int) -> dict | None:
    """{"metric", "diff", "low", "high", "p_value"} of a − b on the task's main metric (acc where either run
    answered by letter), or None when the runs are not comparable (unfinished, unscored, other examples)."""
    from labscale.metrics.registry import get_metric
    from labscale.metrics.stats import paired_bootstrap

    if not (a.complete and b.complete):
        return None
    main = a.task_info["main_metric"]
    shown = {shown_metric(a, main), shown_metric(b, main)}
    metric = shown.pop() if len(shown) == 1 else "acc"
    if metric not in a.scores or metric not in b.scores:
        return None
    ids_a, sa = a.stats(metric)
    ids_b, sb = b.stats(metric)
    if ids_a != ids_b:
        return None
    d = paired_bootstrap(sa, sb, get_metric(metric).aggregate, n_boot=n_boot, seed=seed)
    if d["diff"] is None or np.isnan(d["diff"]):
        return None
    return {"metric": metric, **d}


def diff_cells(d: dict | None) -> list[str]:
    """[difference (with * when the CI excludes 0), "[low, high]", p] or n/a cells."""
    if d is None:
        return ["n/a", "n/a", "n/a"]
    sig = " *" if d["low"] > 0 or d["high"] < 0 else ""
    return [f"{fmt(d['diff'])}{sig}", f"[{fmt(d['low'])}, {fmt(d['high'])}]", f"{d['p_value']:.3f}"]
