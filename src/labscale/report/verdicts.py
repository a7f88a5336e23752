"""Verdicts: is each model × setting as good as the reference model on each task?

For every task one run is the **reference**: the experiment's `reference:` model in its best setting on that task
(by the main metric), or, without `reference:`, the best run of the task. Every other complete run of the task gets
a verdict from the paired bootstrap (metrics/stats.py `paired_bootstrap`, same resampled examples for both runs) of
d = model − reference on the main metric, with its 95% CI [low, high] and the task's margin m ≥ 0 (`margin:`, in
main-metric units; 0 when not set).

Orient so that positive is better: g = d, [gl, gh] = [low, high] where higher is better, else g = −d and
[gl, gh] = [−high, −low]. Then, in this order:

    better          gl > 0                    the CI lies above 0: better than the reference
    within margin   −m ≤ gl and gh ≤ m         the CI lies inside ±m: as good as the reference, up to the margin
    worse           gh < 0                    the CI lies below 0 (and reaches past −m)
    inconclusive    otherwise                 the CI straddles 0 and reaches past ±m

"inconclusive — needs ~N more test examples": a bootstrap CI's half-width h = (high − low)/2 shrinks as 1/√n
with n test examples. Keeping the observed difference |g|, the CI becomes conclusive once h' < |g| (it excludes
0: better or worse) or h' ≤ m − |g| (it fits inside ±m); the larger of the two targets, h* = max(|g|, m − |g|),
is reached first, at n' = n·(h/h*)², so

    N = ⌈n · (h / h*)²⌉ − n      (at least 1)

This assumes the difference and the per-example spread stay as observed; it is a planning figure, not a promise.
With g = 0 and m = 0 no sample size decides (N is None): set a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from labscale.report.format import fmt
from labscale.report.runs import StoredRun, shown_metric

BETTER, WITHIN, WORSE, INCONCLUSIVE = "better", "within margin", "worse", "inconclusive"
VERDICTS = (BETTER, WITHIN, WORSE, INCONCLUSIVE)


def classify(diff: float, low: float, high: float, margin: float, higher_is_better: bool = True) -> str:
    """The verdict of a difference (model − reference) and its CI at `margin` (see the module docstring)."""
    g, gl, gh = (diff, low, high) if higher_is_better else (-diff, -high, -low)
    if gl > 0:
        return BETTER
    if gl >= -margin and gh <= margin:
        return WITHIN
    if gh < 0:
        return WORSE
    return INCONCLUSIVE


def more_examples(diff: float, low: float, high: float, margin: float, n: int) -> int | None:
    """N = ⌈n·(h/h*)²⌉ − n more test examples for an inconclusive CI to become conclusive (module docstring);
    None when no sample size can (no difference and no margin)."""
    g = abs(diff)
    h = (high - low) / 2
    target = max(g, margin - g)
    if target <= 0 or n <= 0:
        return None
    if h <= target:
        return 1
    return max(1, math.ceil(n * (h / target) ** 2 - 1e-9) - n)


@dataclass
class Verdict:
    task: str
    model: str
    setting: str
    run_id: str
    reference: StoredRun | None  # None: the task has no reference result
    metric: str
    margin: float
    higher_is_better: bool = True
    n: int = 0
    value: float | None = None  # the run's score on `metric`
    diff: float | None = None  # model − reference
    low: float | None = None
    high: float | None = None
    p_value: float | None = None
    verdict: str | None = None  # one of VERDICTS, "reference", or None (not comparable: `why`)
    needed: int | None = None  # inconclusive: more test examples needed (None: no sample size decides)
    why: str = ""

    @property
    def text(self) -> str:
        if self.verdict == INCONCLUSIVE:
            if self.needed is None:
                return "inconclusive — no sample size decides a difference of 0 at margin 0 (set a margin)"
            return f"inconclusive — needs ~{self.needed:,} more test example{'s' if self.needed != 1 else ''}"
        return self.verdict or f"n/a ({self.why})"

    def as_dict(self) -> dict:
        ref = self.reference
        return {"verdict": self.verdict, "text": self.text, "metric": self.metric, "margin": self.margin,
                "higher_is_better": self.higher_is_better, "n": self.n, "diff": self.diff, "ci_low": self.low,
                "ci_high": self.high, "p_value": self.p_value, "more_examples_needed": self.needed,
                "reference": None if ref is None else {"run_id": ref.id, "model": ref.model, "setting": ref.setting}}


def margin_for(config: dict, task: str) -> float:
    """The stored experiment config's margin of `task` (see config.Experiment.margin_for)."""
    margin = config.get("margin")
    if isinstance(margin, dict):
        return float(margin.get(task, margin.get("default")) or 0.0)
    return float(margin or 0.0)


def _score(run: StoredRun, metric: str) -> float | None:
    s = run.scores.get(metric)
    return None if s is None or s["value"] is None else float(s["value"])


def _higher_is_better(run: StoredRun, metric: str) -> bool:
    s = run.scores.get(metric)
    return bool(s["higher_is_better"]) if s is not None else True


def pick_reference(runs: list[StoredRun], task: str, reference: str | None) -> StoredRun | None:
    """The task's reference run: the reference model's best complete run on it, else the task's best run."""
    candidates = [r for r in runs if r.task == task and r.complete and (reference is None or r.model == reference)]
    scored: list[tuple[StoredRun, float]] = []
    for r in candidates:
        v = _score(r, shown_metric(r, r.task_info["main_metric"]))
        if v is not None and not math.isnan(v):
            scored.append((r, v))
    if not scored:
        return None
    sign = 1 if _higher_is_better(scored[0][0], shown_metric(scored[0][0], scored[0][0].task_info["main_metric"])) \
        else -1
    return max(scored, key=lambda rv: sign * rv[1])[0]  # first best: runs keep the experiment's order


def _paired(run: StoredRun, ref: StoredRun, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    ids_a, sa = run.stats(metric)
    ids_b, sb = ref.stats(metric)
    if ids_a == ids_b:
        return sa, sb
    if sorted(ids_a) != sorted(ids_b):
        return None
    order = {i: k for k, i in enumerate(ids_b)}
    return sa, sb[[order[i] for i in ids_a]]


def common_metric(a: StoredRun, b: StoredRun) -> str:
    """The main metric both runs can compute (accuracy when one answered multiple choice by letter)."""
    shown = {shown_metric(a, a.task_info["main_metric"]), shown_metric(b, b.task_info["main_metric"])}
    return shown.pop() if len(shown) == 1 else "acc"


def compute_verdicts(runs: list[StoredRun], config: dict, n_boot: int, seed: int) -> list[Verdict]:
    """One Verdict per run (in the experiment's order): the reference run of each task gets "reference"."""
    from labscale.metrics.registry import get_metric
    from labscale.metrics.stats import paired_bootstrap

    reference = config.get("reference")
    out = []
    refs = {task: pick_reference(runs, task, reference) for task in dict.fromkeys(r.task for r in runs)}
    for r in runs:
        ref = refs[r.task]
        main = shown_metric(r, r.task_info["main_metric"])
        v = Verdict(r.task, r.model, r.setting, r.id, ref, main, margin_for(config, r.task),
                    _higher_is_better(r, main), r.row["n_examples"], _score(r, main) if r.complete else None)
        out.append(v)
        if ref is None:
            v.why = f"{reference} has no result on this task" if reference else "no run of this task has a score"
            continue
        if ref is r:
            v.verdict = "reference"
            continue
        if not r.complete:
            v.why = "pending"
            continue
        metric = common_metric(r, ref)
        v.metric, v.higher_is_better = metric, _higher_is_better(ref, metric)
        v.value = _score(r, metric)
        if v.value is None or _score(ref, metric) is None:
            v.why = f"no {metric} score"
            continue
        pair = _paired(r, ref, metric)
        if pair is None:
            v.why = "not on the same test examples"
            continue
        d = paired_bootstrap(pair[0], pair[1], get_metric(metric).aggregate, n_boot=n_boot, seed=seed)
        if d["diff"] is None or math.isnan(d["diff"]) or math.isnan(d["low"]):
            v.why = "difference undefined"
            continue
        v.diff, v.low, v.high = float(d["diff"]), float(d["low"]), float(d["high"])
        v.p_value = None if math.isnan(d["p_value"]) else float(d["p_value"])
        v.verdict = classify(v.diff, v.low, v.high, v.margin, v.higher_is_better)
        if v.verdict == INCONCLUSIVE:
            v.needed = more_examples(v.diff, v.low, v.high, v.margin, len(pair[0]))
    return out


def verdict_section(verdicts: list[Verdict], config: dict, n_boot: int) -> list[str]:
    """The report's opening table: one row per run, its verdict against its task's reference."""
    from labscale.report.format import table

    if not verdicts:
        return []
    reference = config.get("reference")
    who = f"`{reference}` in its best setting on each task" if reference else \
        "the best run of each task (no `reference:` in the experiment)"
    margins = sorted({(v.task, v.margin) for v in verdicts})
    margin_text = ", ".join(f"{t} {fmt(m) if m else '0'}" for t, m in margins)
    lines = ["## Verdicts", "",
             f"Each run against the reference — {who} — on the task's main metric: the paired-bootstrap 95% CI of "
             f"model − reference ({n_boot} resamples) is **better** (above 0), **within margin** (inside ±margin), "
             "**worse** (below 0) or **inconclusive** (with the test examples that would likely decide it, from the "
             f"CI width ∝ 1/√n). Margins (main-metric units): {margin_text}.", ""]
    rows = []
    for v in verdicts:
        ref = v.reference
        ref_s = "—" if ref is None else f"{ref.model} · {ref.setting}"
        if v.verdict == "reference":
            rows.append([v.task, v.model, v.setting, v.metric, fmt(v.value), "**reference**", "—", "—"])
            continue
        diff = "n/a" if v.diff is None else f"{fmt(v.diff)} [{fmt(v.low)}, {fmt(v.high)}]"
        shown = v.text if v.verdict in (None, INCONCLUSIVE) else f"**{v.text}**"
        rows.append([v.task, v.model, v.setting, v.metric, fmt(v.value), shown, diff, ref_s])
    return lines + table(["task", "model", "setting", "metric", "score", "verdict", "model − reference [95% CI]",
                          "reference"], rows)
