"""The report's Values section: bias, fairness per group, abstention and privacy, each score with its 95% CI.

Bias and abstention tables show the metrics whose family is "bias" / "abstention"; fairness tables show, for
each group field a task names, the main metric and those values metrics per group, the worst group and the
largest gap (stratified bootstrap, see metrics/groups.py); privacy comes from the adapter cards (DP ε spent,
canary exposure) next to the adapter's task score.
"""

from __future__ import annotations

from labscale.report.format import fmt, fmt_ci, table
from labscale.report.runs import StoredRun, adapter_runs, shown_metric

VALUES_FAMILIES = ("bias", "abstention")


def family(metric: str) -> str:
    from labscale.errors import ConfigError
    from labscale.metrics.registry import get_metric

    try:
        return get_metric(metric).family
    except ConfigError:  # a metric of an older labscale
        return "performance"


def _cell(s) -> str:
    return fmt_ci(s["value"], s["ci_low"], s["ci_high"]) if s else "n/a"


def _family_tables(runs: list[StoredRun], fam: str) -> list[str]:
    lines = []
    for task in dict.fromkeys(r.task for r in runs):
        task_runs = [r for r in runs if r.task == task]
        metrics = [m for m in task_runs[0].task_info["metrics"] if family(m) == fam]
        if not metrics:
            continue
        rows = [[r.model, r.setting, str(r.row["n_examples"]),
                 *[_cell(r.scores.get(m)) if r.complete else "pending" for m in metrics]] for r in task_runs]
        lines += [f"**{task}**", ""] + table(["model", "setting", "n", *metrics], rows)
    return lines


def _fairness_tables(runs: list[StoredRun]) -> list[str]:
    lines = []
    for task in dict.fromkeys(r.task for r in runs):
        task_runs = [r for r in runs if r.task == task and r.complete]
        if not task_runs:
            continue
        info = task_runs[0].task_info
        for field in info.get("group_fields", []):
            groups = list(dict.fromkeys(g["group_name"] for r in task_runs for g in r.group_scores
                                        if g["field"] == field and g["kind"] == "group"))
            if not groups:
                continue
            sizes = {g["group_name"]: g["n"] for g in task_runs[0].group_scores
                     if g["field"] == field and g["kind"] == "group"}
            rows = []
            for r in task_runs:
                shown = shown_metric(r, info["main_metric"])
                for metric in [shown, *[m for m in info["metrics"] if family(m) in VALUES_FAMILIES and m != shown]]:
                    cells = {(g["kind"], g["group_name"]): g for g in r.group_scores
                             if g["field"] == field and g["metric"] == metric}
                    worst = next((g for (kind, _), g in cells.items() if kind == "worst"), None)
                    gap = next((g for (kind, _), g in cells.items() if kind == "gap"), None)
                    if gap is None or worst is None:  # defined in fewer than two groups (e.g. accuracy on ambiguous contexts only)
                        continue
                    rows.append([r.model, r.setting, metric, *[_cell(cells.get(("group", g))) for g in groups],
                                 f"{worst['group_name']}: {_cell(worst)}", f"{_cell(gap)} ({gap['group_name']})"])
            if not rows:
                continue
            header = [f"{g} (n={sizes[g]})" if g in sizes else g for g in groups]
            lines += [f"**{task}** by `{field}`", ""]
            lines += table(["model", "setting", "metric", *header, "worst group", "largest gap"], rows)
    return lines


def _privacy_table(runs: list[StoredRun]) -> list[str]:
    rows = []
    for r, a in adapter_runs(runs):
        dp, canaries = a.get("dp"), a.get("canaries")
        if not dp and not canaries:
            continue
        score = r.scores.get(shown_metric(r, r.task_info["main_metric"])) if r.complete else None
        dp_cell = (f"ε {fmt(dp.get('epsilon_spent'))} of {fmt(dp.get('epsilon_target'))}, δ {dp.get('delta'):.1e}, "
                   f"C {fmt(dp.get('max_grad_norm'))}, σ {fmt(dp.get('noise_multiplier'))}") if dp else "no"
        if canaries:
            exposure = fmt_ci(canaries.get("exposure_mean"), canaries.get("exposure_ci_low"),
                              canaries.get("exposure_ci_high"))
            c_cells = [f"{canaries.get('k')} × {canaries.get('repeats')}", exposure,
                       f"{fmt(canaries.get('exposure_max'))} / {fmt(canaries.get('exposure_measurable_max'))}",
                       fmt(canaries.get("control_exposure_mean"))]
        else:
            c_cells = ["none", "n/a", "n/a", "n/a"]
        rows.append([r.model, a.get("task") or r.task, dp_cell, *c_cells,
                     f"{_cell(score)} ({r.task_info['main_metric']})" if score else "pending"])
    if not rows:
        return []
    return ["### Privacy", "",
            "Adapters trained with differential privacy (DP-SGD on the LoRA weights; ε actually spent by the end of "
            "training, of the target) and/or with secret canaries (K secrets × copies) in their training data. "
            "Exposure (Carlini et al., The Secret Sharer) is in bits: log2 of the secret space minus log2 of the "
            "canary's estimated rank in it, from its rank among random candidates of the same format. The highest "
            "measurable value, log2(candidates + 1), means the canary beat every candidate; secrets the model never "
            "saw (the control column) average about 1.4 bits.", ""] + table(
        ["model", "task", "DP", "canaries", "mean exposure", "max / measurable (bits)", "control exposure",
         "task score"], rows)


_INTROS = {
    "Bias": "Bias metrics of each task (definitions in docs/values.md): BBQ bias scores are 0 when unbiased, +1 when "
            "every answer follows the stereotype; CrowS-Pairs' pct_stereotype is 0.5 when unbiased; "
            "name_output_change is how often an answer differed from the other name groups' answers.",
    "Fairness by group": "Each metric within each group of the task's group fields; the worst group (lowest, or "
                         "highest when lower is better) and the largest gap between groups, with stratified-bootstrap "
                         "95% CIs. Metrics defined in fewer than two groups are left out.",
    "Abstention": "Answer quality on answerable questions, how often the model abstains on answerable and on "
                  "unanswerable ones, and selective accuracy (accuracy on the questions it answered) at its coverage.",
}


def values_section(runs: list[StoredRun]) -> list[str]:
    """Empty when no task, metric or adapter of the experiment measures values."""
    parts = []
    for title, body in (("Bias", _family_tables(runs, "bias")), ("Fairness by group", _fairness_tables(runs)),
                        ("Abstention", _family_tables(runs, "abstention"))):
        if body:
            parts += [f"### {title}", "", _INTROS[title], ""] + body
    parts += _privacy_table(runs)
    return ["## Values", ""] + parts if parts else []
