"""`labscale export-prompt`: a compiled prompt, from the database alone, as a task entry to read and reuse.

The file is one YAML mapping for an experiment's `tasks:` list: the task as the experiment declared it (a builtin
task by name, or the user task's own definition — its data paths relative to the original experiment file's
folder), with the compiled `instruction` and the compiled demonstrations as fixed `demos` (input, output, and the
options of a multiple-choice demo). Under that entry every setting starts from the compiled prompt: its zero-shot
prompt is exactly the optimized run's prompt (so a re-run on the same database makes no new call), and it can be
evaluated on other models. Provenance (model, setting, algorithm, identity, dev and test scores) is written as
comments at the top.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from labscale.errors import LabscaleError
from labscale.report.format import fmt
from labscale.report.runs import StoredRun


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def compiled_runs(store, experiment: str | None = None) -> tuple[dict, list[StoredRun]]:
    exp = store.require_experiment(experiment)
    runs = [StoredRun(store, r) for r in store.experiment_runs(exp["id"])]
    return dict(exp), [r for r in runs if r.task_info.get("compiled")]


def pick(runs: list[StoredRun], task: str | None, model: str | None, setting: str | None) -> StoredRun:
    chosen = [r for r in runs if (task is None or r.task == task) and (model is None or r.model == model)
              and (setting is None or r.setting == setting)]
    listed = "; ".join(f"--task {r.task} --model {r.model} --setting {r.setting}" for r in runs[:6])
    if not runs:
        raise LabscaleError("the experiment has no compiled prompt", "add an optimized setting and run it")
    if not chosen:
        raise LabscaleError("no compiled prompt matches", f"the experiment has: {listed}")
    if len(chosen) > 1:
        raise LabscaleError(f"{len(chosen)} compiled prompts match", f"narrow it down, e.g. {listed}")
    return chosen[0]


def _entry(config: dict, run: StoredRun) -> dict:
    """The experiment's own entry for the run's task (a dict), the compiled instruction and demos put in."""
    from labscale.config import TaskRef, TaskSpec

    card = run.task_info["compiled"]
    entry: dict = {"name": run.task}
    for t in config.get("tasks", []):
        if isinstance(t, dict) and t.get("name") == run.task:  # as written: the fields that differ from defaults
            fields = (TaskSpec if "data" in t else TaskRef).model_fields
            entry = {k: v for k, v in t.items() if k in fields and (
                fields[k].is_required() or v != json.loads(json.dumps(fields[k].default)))}
    for key in ("instruction", "demos"):
        entry.pop(key, None)
    entry["instruction"] = card["instruction"]
    entry["demos"] = [{"input": d["input"], "output": d["output"], **({"choices": d["choices"]} if d.get("choices")
                                                                      else {}), "id": d["id"]}
                      for d in card["demos"]]
    return entry


class _Dumper:
    @staticmethod
    def dump(data) -> str:
        import yaml

        class Dumper(yaml.SafeDumper):
            pass

        def text(dumper, value: str):
            style = "|" if "\n" in value else None
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

        Dumper.add_representer(str, text)
        return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=110)


def export_prompt(db: Path, out: Path | None = None, task: str | None = None, model: str | None = None,
                  setting: str | None = None, experiment: str | None = None) -> Path:
    """Write the compiled prompt of one optimized run as a YAML task entry; returns the path."""
    from labscale.atomic import write_atomic
    from labscale.engine.store import Store, require_db
    from labscale.report.markdown import check_output

    require_db(db)
    store = Store(db, readonly=True)
    try:
        exp, runs = compiled_runs(store, experiment)
        run = pick(runs, task, model, setting)
        config = json.loads(exp["config_json"])
        card = run.task_info["compiled"]
        score = run.scores.get(card.get("metric") or run.task_info["main_metric"])
        test = dict(score) if score is not None else {}
    finally:
        store.close()
    out = out or db.parent / f"{exp['name']}.{_slug(run.task)}.{_slug(run.model)}.{_slug(run.setting)}.yaml"
    check_output(out)
    kinds = ", ".join(d["kind"] for d in card.get("demos", [])) or "none"
    own = "compiled" if card.get("instruction_changed") else "the task's own"
    header = [
        f"# labscale compiled prompt, exported from {db} (experiment '{exp['name']}', run {run.id})",
        f"# model {run.model}, setting {run.setting}: {card.get('algorithm_name')}, T={card.get('trials')}, "
        f"identity {card.get('identity')}",
        f"# {card.get('metric')}: dev {fmt((card.get('dev') or {}).get('score'))} "
        f"(n={(card.get('dev') or {}).get('n')}, selected on) → test {fmt(test.get('value'))} "
        f"[{fmt(test.get('ci_low'))}, {fmt(test.get('ci_high'))}] (n={run.row['n_examples']})",
        f"# {len(card.get('demos', []))} demos from the train split ({kinds}); instruction: {own}",
        "# Use: put this mapping under `tasks:` of an experiment (data paths, if any, are relative to the original "
        "experiment file);",
        "# every setting then starts from this prompt, and its zero-shot prompt is the compiled one.",
    ]
    write_atomic(out, "\n".join(header) + "\n" + _Dumper.dump(_entry(config, run)))
    return out
