"""What a rater can rate: the generated outputs of one experiment's runs, read from the store.

absolute: one item per (run, example) output of a complete generate run (failed requests left out);
pairwise: one item per example and unordered pair of runs of the same task that both answered it.
Only runs of the chosen experiment are read, so no output of another experiment is reachable. An item carries
what a rater sees (the task instruction, the example input, the outputs) and, kept server-side, which runs
produced it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations

from labscale.engine.store import Store
from labscale.errors import LabscaleError

MODES = ("absolute", "pairwise")


@dataclass(frozen=True)
class Item:
    key: str  # stable identity (never sent to the page)
    task: str
    example_id: str
    run_id: str
    other_run_id: str | None  # pairwise: the second run (canonical order: run_id < other_run_id)
    instruction: str
    input: str
    outputs: tuple[str, ...]  # one (absolute) or two (pairwise, in run_id, other_run_id order)


def _input(prediction) -> str:
    """The example's input as stored; a database from before inputs were stored shows the exact prompt."""
    value = prediction["input"] if "input" in prediction.keys() else None
    return value if value is not None else prediction["prompt"]


def load_items(store: Store, exp_id: int, mode: str, task: str | None = None) -> list[Item]:
    """The experiment's rateable items (see the module docstring), in a fixed order; a one-line error when there
    are none."""
    if mode not in MODES:
        raise LabscaleError(f"unknown --mode '{mode}'", "use absolute or pairwise")
    runs = [r for r in store.experiment_runs(exp_id) if r["status"] == "complete" and r["protocol"] == "generate"]
    tasks = list(dict.fromkeys(r["task"] for r in store.experiment_runs(exp_id)))
    if task is not None:
        if task not in tasks:
            from labscale.errors import did_you_mean

            raise LabscaleError(f"--task '{task}' is not a task of this experiment",
                                f"{did_you_mean(task, tasks)}use one of: {', '.join(tasks)}")
        runs = [r for r in runs if r["task"] == task]
    outputs: dict[str, dict[str, tuple[str, str, str]]] = {}  # run id -> example id -> (output, input, instruction)
    for r in runs:
        info = json.loads(r["task_json"])
        outputs[r["id"]] = {p["example_id"]: (p["output"], _input(p), info.get("instruction") or "")
                            for p in store.predictions(r["id"]) if p["error"] is None and p["output"].strip()}
    items: list[Item] = []
    if mode == "absolute":
        for r in runs:
            for ex, (out, inp, instruction) in outputs[r["id"]].items():
                items.append(Item(f"a|{r['id']}|{ex}", r["task"], ex, r["id"], None, instruction, inp, (out,)))
    else:
        by_task: dict[str, list] = {}
        for r in runs:
            by_task.setdefault(r["task"], []).append(r)
        for t, task_runs in by_task.items():
            for ra, rb in combinations(sorted(task_runs, key=lambda r: r["id"]), 2):
                a, b = outputs[ra["id"]], outputs[rb["id"]]
                for ex in a:
                    if ex in b:
                        out_a, inp, instruction = a[ex]
                        items.append(Item(f"p|{ra['id']}|{rb['id']}|{ex}", t, ex, ra["id"], rb["id"], instruction,
                                          inp, (out_a, b[ex][0])))
    if not items:
        where = f" of task '{task}'" if task else ""
        if mode == "pairwise" and runs:
            raise LabscaleError(f"nothing to compare pairwise{where}: it needs two runs of one task with generated "
                                "outputs for the same examples", "use --mode absolute, or add a model or setting")
        raise LabscaleError(f"database '{store.path}' has no generated outputs to rate{where}",
                            "rating needs a task scored by generation (e.g. a summarization or user generate task); "
                            "run one with `labscale run FILE` first")
    return items
