"""The report's Compiled prompts section, for experiments with optimized runs (the run record's
`task_info["compiled"]`: the card adapt/optimize.py stores).

For each compiled prompt: the algorithm, its main-metric score on the dev split it was selected on, its test
score (the evaluated run, with its bootstrap CI) and the dev → test gap (test − dev: selection on dev flatters
the dev score, so a negative gap is expected); the test difference to the same model's zero-shot and few-shot:K
runs on the same examples (paired bootstrap, report/paired.py); the compilation's cost (calls, tokens, model
compute, wall time, energy, CO2eq, $) beside the evaluation's; and the chosen instruction and demonstration ids.
"""

from __future__ import annotations

from labscale.report.format import fmt, table
from labscale.report.paired import diff_cells, paired_main
from labscale.report.runs import StoredRun, result_cell, shown_metric


def _baselines(run: StoredRun, runs: list[StoredRun]) -> list[StoredRun]:
    """The same model's zero-shot and few-shot:K runs of the task (the comparisons a compiled prompt must win)."""
    return [r for r in runs if r.task == run.task and r.model == run.model and r.id != run.id
            and (r.setting == "zero-shot" or r.setting.startswith("few-shot:"))]


def _money(x) -> str:
    return "n/a" if x is None else f"${x:.4f}"


def compiled_section(runs: list[StoredRun], n_boot: int, seed: int) -> list[str]:
    """Empty when no run evaluated a compiled prompt."""
    compiled = [r for r in runs if r.task_info.get("compiled")]
    if not compiled:
        return []
    lines = ["## Compiled prompts", "",
             "optimized settings evaluate a prompt compiled for each model and task (docs/optimize.md): "
             "demonstrations drawn from the train split, every choice made on the dev split, the test split used "
             "only for the scores below. dev → test gap = test − dev (the dev score is the selected maximum, so it "
             "is optimistic). Differences are on the same test examples, paired bootstrap 95% CI; * : the CI "
             "excludes 0.", ""]
    rows = []
    for r in compiled:
        c = r.task_info["compiled"]
        metric = shown_metric(r, c.get("metric") or r.task_info["main_metric"])
        test = r.scores.get(metric)
        dev = (c.get("dev") or {}).get("score")
        gap = fmt(test["value"] - dev) if test and test["value"] is not None and dev is not None else "n/a"
        vs = []
        for b in _baselines(r, runs):
            d = paired_main(r, b, n_boot, seed)
            cells = diff_cells(d)
            vs.append(f"{b.setting}: {cells[0]} {cells[1]}")
        algo = f"{c.get('mode')} T={c.get('trials')} ({c.get('candidates')} scored" + \
            (", stopped at budget)" if c.get("stopped") else ")")
        rows.append([r.model, r.task, r.setting, algo, f"{fmt(dev)} (n={(c.get('dev') or {}).get('n')})",
                     f"{result_cell(r, metric)} (n={r.row['n_examples']})", gap, "; ".join(vs) or "—"])
    lines += table(["model", "task", "setting", "search", "dev score", "test score", "dev → test",
                    "test difference vs"], rows)

    rows = []
    for r in compiled:
        c = r.task_info["compiled"]
        cost = c.get("cost") or {}
        e = r.efficiency
        per_hour = cost.get("usd_per_hour")
        if r.is_remote or r.price is not None:
            eval_usd = e.get("cost_usd")
        else:
            eval_usd = e["compute_s"] / 3600 * per_hour if per_hour is not None and "compute_s" in e else None
        energy = f"{cost['energy_kwh']:.6f}" if cost.get("energy_kwh") is not None else "n/a"
        co2 = f"{cost['co2eq_kg'] * 1000:.3f}" if cost.get("co2eq_kg") is not None else "n/a"
        rows.append([f"{r.model} · {r.task} · {r.setting}" + (" (reused)" if c.get("reused") else ""),
                     f"{cost.get('calls', 'n/a')} ({cost.get('new', 0)} new / {cost.get('cached', 0)} cached)",
                     f"{cost.get('prompt_tokens', 0):,} / {cost.get('new_tokens', 0):,}",
                     fmt(cost.get("compute_s")), fmt(cost.get("wall_s")), energy, co2, _money(cost.get("usd")),
                     str(e.get("examples", "pending")),
                     fmt(e.get("compute_s")), _money(eval_usd)])
    lines += ["### Compilation cost beside evaluation cost", "",
              "Compilation: every call it used (teacher, dev scoring, proposer; counted from the stored calls, so a "
              "resumed compilation reports the same), prompt / new tokens, model compute seconds, wall time of the "
              "compiling invocation, energy and CO2eq (CodeCarbon, offline, over that invocation), and $ (API "
              "tokens × price; local compute hours × the hardware price per hour). Evaluation: the test run's "
              "requests, compute seconds and $ priced the same way.", ""]
    lines += table(["compiled prompt", "compile calls", "tokens (prompt / new)", "compute (s)", "wall (s)",
                    "energy (kWh)", "CO2eq (g)", "compile $", "eval requests", "eval compute (s)", "eval $"], rows)

    lines += ["### Chosen prompts", ""]
    for r in compiled:
        c = r.task_info["compiled"]
        demos = ", ".join(f"`{d['id']}` ({d['kind']})" for d in c.get("demos", [])) or "none"
        changed = "compiled" if c.get("instruction_changed") else "the task's own, kept"
        lines += [f"**{r.model} · {r.task} · {r.setting}** — {c.get('origin', '')}; teacher {c.get('teacher')}, "
                  f"proposer {c.get('proposer')}; identity `{c.get('identity')}` (`{c.get('file')}`).", "",
                  f"- Instruction, {changed}: " + " ".join(str(c.get("instruction", "")).split()),
                  f"- Demonstrations (train ids): {demos}", ""]
    lines += ["Export a compiled prompt as a task entry you can read and reuse: `labscale export-prompt --db <db> "
              "--task <task> --model <model> --setting <setting>`.", ""]
    return lines
