"""The markdown report: results tables by setting (tasks × models, `score [low, high]`), full metric tables per
task, paired differences between models, efficiency per run, and provenance. Built from the database alone."""

from __future__ import annotations

import datetime as dt
import json
from itertools import combinations
from pathlib import Path

import numpy as np

from labscale.atomic import write_atomic
from labscale.engine.store import Store, require_db
from labscale.errors import LabscaleError
from labscale.report.format import fmt, fmt_bytes, fmt_rate, table
from labscale.report.runs import StoredRun, adapter_runs, result_cell, shown_metric


def build_report(store: Store, experiment: str | None = None, bootstrap_samples: int | None = None) -> str:
    exp = store.require_experiment(experiment)
    config = json.loads(exp["config_json"])
    env = json.loads(exp["environment_json"])
    runs = [StoredRun(store, r) for r in store.experiment_runs(exp["id"])]
    seed = config.get("seed", 0)
    n_boot = bootstrap_samples or config.get("bootstrap_samples", 1000)
    tasks = list(dict.fromkeys(r.task for r in runs))
    models = list(dict.fromkeys(r.model for r in runs))
    settings = list(dict.fromkeys(r.setting for r in runs))
    by_key = {(r.task, r.model, r.setting): r for r in runs}
    main_metric = {r.task: r.task_info["main_metric"] for r in runs}

    when = dt.datetime.fromtimestamp(exp["finished_at"] or exp["started_at"], dt.timezone.utc)
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    pending = [r for r in runs if not r.complete]
    lines = [
        f"# labscale report — {exp['name']}",
        "",
        f"Config `{exp['config_hash']}` · seed {seed} · {when:%Y-%m-%d %H:%M} UTC · {len(runs)} runs "
        f"({len(tasks)} tasks × {len(models)} models × {len(settings)} settings)",
        "",
        "Scores are on each task's seeded test split; brackets give 95% percentile-bootstrap confidence intervals "
        f"({n_boot} resamples, seed {seed}).",
        "",
    ]
    if pending:
        lines += [f"**{len(pending)} run(s) did not finish** (shown as `pending`); re-run the experiment to complete "
                  "them without repeating finished work.", ""]
    for notice in store.notices(exp["id"]):
        lines += [f"**Notice:** {notice}.", ""]
    failed = [r for r in runs if r.complete and r.efficiency.get("failed")]
    if failed:
        lines += ["**Failed requests** (API errors that persisted through retries; scored as wrong — a run whose "
                  "every request failed has no score — reasons in the database's `predictions.error`; re-running "
                  "the experiment retries them): " + ", ".join(
                      f"{r.model} · {r.task} · {r.setting}: {r.efficiency['failed']}/{r.efficiency['examples']}"
                      for r in failed) + ".", ""]

    from labscale.report.verdicts import compute_verdicts, verdict_section

    lines += verdict_section(compute_verdicts(runs, config, n_boot, seed), config, n_boot)

    lines += ["## Models", ""]
    model_rows = []
    for m in models:
        run = next(r for r in runs if r.model == m)
        info = run.model_info
        params = f"{info['parameters'] / 1e6:,.1f}M" if info.get("parameters") else "n/a"
        model_rows.append([m, info["backend"], f"`{info['fingerprint']}`", params, info.get("dtype") or "n/a",
                           info.get("device") or "n/a", info.get("quantization") or "none",
                           str(info["context_length"]) if run.context_known else "unknown"])
    lines += table(["model", "backend", "fingerprint", "parameters", "dtype", "device", "quantization", "context"],
                   model_rows)

    for setting in settings:
        lines += [f"## Results by task — {setting}", ""]
        rows = []
        for task in tasks:
            metric = main_metric[task]
            row_runs = [by_key[(task, m, setting)] for m in models if (task, m, setting) in by_key]
            # the row names the metric its cells show: acc where every run answered by letter
            shown_all = list(dict.fromkeys(shown_metric(r, metric) for r in row_runs)) or [metric]
            primary = metric if metric in shown_all else shown_all[0]
            others = [s for s in shown_all if s != primary]
            label = primary + (f"; {others[0]} where answered by letter" if others else "")
            cells = []
            for m in models:
                r = by_key.get((task, m, setting))
                shown = shown_metric(r, metric) if r else metric
                cell = result_cell(r, shown)
                if r and r.scores.get(shown) and shown != primary:
                    cell += f" ({shown}, {r.protocol})"
                cells.append(cell)
            protocols = {r.protocol for r in row_runs}
            note = "" if protocols <= {"generate"} and primary == metric else f", {'/'.join(sorted(protocols))}"
            n = row_runs[0].row["n_examples"] if row_runs else 0
            rows.append([f"{task} ({label}{note}, n={n})", *cells])
        rows += _group_rows(config, by_key, models, setting, n_boot, seed)
        lines += table(["task (main metric)", *models], rows)
        lines += caveats([r for r in runs if r.setting == setting], with_task=True)

    lines += ["## Full metrics by task", ""]
    for task in tasks:
        info = next(r.task_info for r in runs if r.task == task)
        metrics = info["metrics"]
        lines += [f"### {task}", ""]
        if info.get("notes"):
            lines += ["Data: " + "; ".join(f"{k}: {_note(v)}" for k, v in info["notes"].items()) + ".", ""]
        lines += caveats([r for r in runs if r.task == task], with_task=False)
        rows = []
        for m in models:
            for setting in settings:
                r = by_key.get((task, m, setting))
                if r is None:
                    continue
                cells = [result_cell(r, k) for k in metrics]
                rows.append([m, setting, r.protocol, str(r.row["n_examples"]), *cells])
        lines += table(["model", "setting", "protocol", "n", *metrics], rows)

    if len(models) > 1:
        from labscale.metrics.registry import get_metric
        from labscale.metrics.stats import paired_bootstrap

        lines += ["## Paired differences between models", "",
                  "Main metric, A − B on the same test examples; paired bootstrap 95% CI. "
                  "A difference whose CI excludes 0 is marked *.", ""]
        rows = []
        for task in tasks:
            for setting in settings:
                for a, b in combinations(models, 2):
                    ra, rb = by_key.get((task, a, setting)), by_key.get((task, b, setting))
                    if not (ra and rb and ra.complete and rb.complete):
                        continue
                    # both runs on a metric each can compute (accuracy when one answered by letter)
                    shown = {shown_metric(ra, main_metric[task]), shown_metric(rb, main_metric[task])}
                    metric = shown.pop() if len(shown) == 1 else "acc"
                    if metric not in ra.scores or metric not in rb.scores:  # e.g. every request failed
                        continue
                    aggregate = get_metric(metric).aggregate
                    ids_a, sa = ra.stats(metric)
                    ids_b, sb = rb.stats(metric)
                    if ids_a != ids_b:
                        continue
                    d = paired_bootstrap(sa, sb, aggregate, n_boot=n_boot, seed=seed)
                    if d["diff"] is None or np.isnan(d["diff"]):
                        continue
                    sig = " *" if d["low"] > 0 or d["high"] < 0 else ""
                    rows.append([task, setting, metric, f"{a} − {b}", f"{fmt(d['diff'])}{sig}",
                                 f"[{fmt(d['low'])}, {fmt(d['high'])}]", f"{d['p_value']:.3f}"])
        lines += table(["task", "setting", "metric", "A − B", "difference", "95% CI", "p"], rows) if rows else [
            "No complete pairs.", ""]

    from labscale.report.compiled import compiled_section
    from labscale.report.rag import rag_section
    from labscale.report.values import values_section

    lines += rag_section(runs, n_boot, seed) + compiled_section(runs, n_boot, seed)
    lines += values_section(runs)

    from labscale.report.human import human_section

    lines += human_section(store, runs, n_boot, seed)

    lines += ["## Efficiency", "",
              "Per run, from the stored per-request timings (cached requests keep the timings of the run that "
              "computed them). examples/s and new tokens/s divide by compute time, the sum of each request's share "
              "of its batch; latency is what one request waited for its batch; peak memory is the process's "
              "resident set (and accelerator memory when present) during the run's last execution.", ""]
    rows = []
    for r in runs:
        e = r.efficiency
        if not r.complete:
            rows.append([r.model, r.task, r.setting, str(r.row["n_examples"]), *["pending"] * 6])
            continue
        mem = fmt_bytes(e.get("peak_rss_bytes"))
        if e.get("peak_accelerator_bytes"):
            mem += f" (GPU {fmt_bytes(e['peak_accelerator_bytes'])})"
        rows.append([r.model, r.task, r.setting, str(e["examples"]), fmt_rate(e.get("examples_per_s")),
                     fmt_rate(e.get("new_tokens_per_s")),
                     fmt_rate(e.get("mean_latency_s")), mem, f"{e['compute_s']:.1f}", f"{e['wall_s']:.1f}"])
    lines += table(["model", "task", "setting", "n", "examples/s", "new tokens/s", "mean latency (s)", "peak memory",
                    "compute (s)", "wall (s)"], rows)
    truncated = [r for r in runs if r.efficiency.get("truncated")]
    if truncated:
        lines += ["Generations that hit max_new_tokens: " + ", ".join(
            f"{r.model} · {r.task} · {r.setting}: {r.efficiency['truncated']}/{r.efficiency['examples']}"
            for r in truncated) + ".", ""]

    lines += _cost_section(runs)
    lines += _adaptation_section(runs)

    lines += ["## Provenance", "",
              f"- Config hash `{exp['config_hash']}`; Python {env['python']} on {env['platform']} ({env['cpus']} CPUs).",
              f"- Packages: {pkgs}.",
              f"- Decoding: {json.dumps(config.get('generation', {}), sort_keys=True)}.",
              "- Every prediction, exact prompt and generation is in the database (tables `predictions`, "
              "`generations`, `loglikelihoods`); run ids: " + ", ".join(f"`{r.id}`" for r in runs) + ".", ""]
    return "\n".join(lines)


def caveats(runs: list[StoredRun], with_task: bool) -> list[str]:
    """What a reader must know beside a run's scores, from its stored task info: inputs cut to max_input_tokens
    ("12 of 40 inputs truncated") and a max_new_tokens far below the references' length."""
    out = []
    for r in runs:
        where = f"{r.model} · {r.task} · {r.setting}" if with_task else f"{r.model} · {r.setting}"
        limit, budget = r.task_info.get("input_limit"), r.task_info.get("output_budget")
        if limit:
            out.append(f"- {where}: {limit['truncated']} of {limit['of']} inputs truncated "
                       f"(max_input_tokens={limit['max_input_tokens']}, cut at the {limit['truncate']}).")
        if budget:
            out.append(f"- {where}: **warning** — {budget.get('field', 'max_new_tokens')}={budget['max_new_tokens']} "
                       "is under a quarter of the "
                       f"median reference length ({budget['median_target_tokens']} tokens): outputs were cut short, so "
                       "the scores understate the model.")
    return out + [""] if out else []


def _note(value) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_note(v)}" for k, v in value.items())
    return str(value)


def _cost_section(runs: list[StoredRun]) -> list[str]:
    """API spending per run: tokens the API reported × the run's recorded price."""
    api = [r for r in runs if r.is_remote or r.price is not None]
    if not api:
        return []
    lines = ["## API cost", "",
             "Tokens as reported by the API (`usage`) for the requests behind each run's results — cached results "
             "keep the cost of the call that made them — times the price recorded with the run ($ per million "
             "input / output tokens). Failed requests are not billed and not counted.", ""]
    rows, total = [], 0.0
    for r in api:
        e = r.efficiency
        price = r.price
        price_s = f"{price['input']:g} / {price['output']:g} ({price['source']})" if price else "unknown"
        if not r.complete:
            rows.append([r.model, r.task, r.setting, price_s, *["pending"] * 5])
            continue
        cost = e.get("cost_usd")
        total += cost or 0.0
        est = f" ({e['usage_estimated']} estimated)" if e.get("usage_estimated") else ""
        rows.append([r.model, r.task, r.setting, price_s, f"{e.get('prompt_tokens', 0):,}{est}",
                     f"{e.get('new_tokens', 0):,}", str(e.get("retries", 0)), str(e.get("failed", 0)),
                     "n/a" if cost is None else f"${cost:.4f}"])
    lines += table(["model", "task", "setting", "price in / out ($/1M)", "prompt tokens", "completion tokens",
                    "retries", "failed", "cost"], rows)
    return lines + [f"Total API cost of the results above: ${total:.4f}.", ""]


def _group_rows(config: dict, by_key: dict, models: list[str], setting: str, n_boot: int, seed: int) -> list[list]:
    """One row per task group the experiment lists (taskgroups.py): the macro average of the group's metric over
    its member tasks, per model, with a stratified bootstrap CI (metrics/stats.py `macro_bootstrap`). A model
    whose member runs are not all complete gets `pending` (or `—` when it has none)."""
    from labscale.metrics.stats import macro_bootstrap
    from labscale.report.format import fmt_ci
    from labscale.taskgroups import TASK_GROUPS

    names = [t if isinstance(t, str) else t.get("name") for t in config.get("tasks", [])]
    rows = []
    for group in (TASK_GROUPS[n] for n in dict.fromkeys(names) if n in TASK_GROUPS):
        cells, sizes = [], set()
        for m in models:
            member_runs = [by_key.get((t, m, setting)) for t in group.members]
            if not any(member_runs):
                cells.append("—")
                continue
            if not all(r is not None and r.complete and group.metric in r.scores for r in member_runs):
                cells.append("pending")
                continue
            stats = [r.stats(group.metric)[1] for r in member_runs if r is not None]
            sizes.add(sum(len(s) for s in stats))
            cells.append(fmt_ci(*macro_bootstrap(stats, n_boot=n_boot, seed=seed)))
        if any(c != "—" for c in cells):
            n = "/".join(str(x) for x in sorted(sizes)) or "0"
            rows.append([f"**{group.name}** (macro {group.metric} over {len(group.members)} tasks, n={n})", *cells])
    return rows


def _adaptation_section(runs: list[StoredRun]) -> list[str]:
    """Fine-tuned and distilled models: how each adapter was trained and what it cost (from its labscale.json
    card); distilled students also split the teacher's cost from the student's, with the teacher's own score."""
    rows, usd, kg = [], 0.0, 0.0
    for r, a in adapter_runs(runs):
        usd += a.get("cost_usd") or 0.0
        kg += a.get("co2eq_kg") or 0.0
        loss = f"{fmt(a.get('dev_loss_before'))} → {fmt(a.get('best_dev_loss'))}"
        minutes = f"{a['wall_s'] / 60:.1f}" if a.get("wall_s") is not None else "n/a"
        co2 = f"{a['co2eq_kg'] * 1000:.2f}" if a.get("co2eq_kg") is not None else "n/a"
        energy = f"{a['energy_kwh']:.5f}" if a.get("energy_kwh") is not None else "n/a"
        cost = f"${a['cost_usd']:.4f}" if a.get("cost_usd") is not None else "n/a"
        rows.append([r.model, a.get("task") or r.task, f"`{r.model_info['fingerprint']}`", a.get("recipe") or "n/a",
                     a.get("quantization") or "none", f"{a.get('steps')} ({a.get('stopped')})", loss, minutes,
                     fmt_rate(a.get("tokens_per_s")), energy, co2,
                     f"{cost} ({a.get('hardware')}, ${a.get('usd_per_hour') or 0:g}/h)"])
    if not rows:
        return []
    lines = ["## Adaptations", "",
             "LoRA / QLoRA adapters evaluated under the `finetuned` setting (distilled students: the `distilled` "
             "setting) with zero-shot prompts, exactly as trained. "
             "Dev loss is on the task's dev split, before training → the kept (best) checkpoint. Time, energy and "
             "CO2eq (CodeCarbon, offline) cover the whole training process; cost = measured hours × the hardware "
             "price per hour. Details in each adapter's `labscale.json`.", ""]
    lines += table(["model", "task", "fingerprint", "recipe", "quantization", "steps", "dev loss", "train (min)",
                    "tokens/s", "energy (kWh)", "CO2eq (g)", "cost"], rows)
    lines += [f"Total fine-tuning cost: ${usd:.4f}, {kg * 1000:.2f} g CO2eq.", ""]
    return lines + _distillation_rows(runs)


def _distillation_rows(runs: list[StoredRun]) -> list[str]:
    """The distilled students' teacher / student split (the `distill` part of their card summary)."""
    found = [(r, a["distill"]) for r, a in adapter_runs(runs) if a.get("distill")]
    if not found:
        return []
    g = lambda x: "n/a" if x is None else f"{x * 1000:.2f}"  # noqa: E731
    kwh = lambda x: "n/a" if x is None else f"{x:.5f}"  # noqa: E731
    usd = lambda x: "n/a" if x is None else f"${x:.4f}"  # noqa: E731
    rows, teacher_total, teacher_kg = [], 0.0, 0.0
    for r, d in found:
        teacher_total += d.get("teacher_usd") or 0.0
        teacher_kg += d.get("teacher_co2eq_kg") or 0.0
        if d.get("teacher_score") is not None:
            from labscale.report.format import fmt_ci

            score = (f"{d['teacher_metric']} {fmt_ci(d['teacher_score'], d['teacher_ci_low'], d['teacher_ci_high'])}"
                     f" (n={d['teacher_scored_n']})")
        else:
            score = "n/a (no gold)" if d.get("mode") == "task" else "n/a (instructions)"
        share = d.get("dropped_share")
        dropped = f"{d.get('dropped')} ({share:.0%})" if share is not None else "n/a"
        mode = d.get("mode", "task") + (" + rationales" if d.get("rationales") else "")
        rows.append([r.model, mode, d.get("teacher") or "n/a", f"{d.get('kept')}/{d.get('labelled')}", dropped,
                     score, f"{usd(d.get('teacher_usd'))} (API {usd(d.get('teacher_api_usd'))})",
                     kwh(d.get("teacher_kwh")), g(d.get("teacher_co2eq_kg")), usd(d.get("student_usd")),
                     kwh(d.get("student_kwh")), g(d.get("student_co2eq_kg")), usd(d.get("total_usd"))])
    lines = ["### Distillation: teacher and student", "",
             "Students evaluated under the `distilled` setting. The teacher labelled the task's train inputs (or "
             "wrote the instruction dataset); kept = training examples made of its outputs, dropped = outputs "
             "unparseable or empty. The teacher's score is its own, on the train inputs it labelled that have gold "
             "answers (95% bootstrap CI): the ceiling imitation can reach. Teacher $ = API tokens × price + a local "
             "teacher's compute hours × the hardware price; its energy and CO2eq are measured while labelling (an "
             "API teacher's are unknown). Student figures are the training's (the table above).", ""]
    lines += table(["model", "mode", "teacher", "kept / labelled", "dropped", "teacher score on train",
                    "teacher $", "teacher kWh", "teacher CO2eq (g)", "student $", "student kWh", "student CO2eq (g)",
                    "total $"], rows)
    return lines + [f"Total teacher cost: ${teacher_total:.4f}, {teacher_kg * 1000:.2f} g CO2eq.", ""]


def write_report(db: Path, out: Path | None = None, experiment: str | None = None) -> Path:
    require_db(db)
    store = Store(db, readonly=True)
    try:
        text = build_report(store, experiment)
    finally:
        store.close()
    out = out or db.with_suffix(".md")
    check_output(out)
    write_atomic(out, text)
    return out


def check_output(out: Path) -> None:
    """A report path must be a file in an existing folder: one-line errors otherwise (nothing is written)."""
    if out.is_dir():
        raise LabscaleError(f"--out '{out}' is a folder", f"pass a file path, e.g. --out {out / 'report.md'}")
    if not out.parent.is_dir():
        raise LabscaleError(f"the folder of --out '{out}' does not exist", f"create {out.parent}/ first, or pass "
                            "another path")
