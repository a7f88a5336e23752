"""Task names → Task objects: the builtin tasks, and tasks defined in the experiment file."""

from __future__ import annotations

import importlib
from pathlib import Path

from labscale.config import TaskSpec
from labscale.errors import ConfigError
from labscale.tasks.base import Task
from labscale.tasks.counterfactual import SUFFIX, counterfactual_task
from labscale.tasks.user import task_from_spec

# Task name → the module (under labscale.tasks) whose make_task() builds it; imported on first use.
BUILTIN_TASKS: dict[str, str] = {
    "mts-summarization": "mts",
    "fact-check": "fact_check",
    "openbookqa": "openbookqa",
    "entity-resolution": "entity_resolution",
    "bbq": "bbq",
    "crows-pairs": "crows_pairs",
    "abstention-qa": "abstention",
    "rag-qa": "rag_qa",
}


def _builtin(name: str) -> Task:
    return importlib.import_module(f"labscale.tasks.{BUILTIN_TASKS[name]}").make_task()


def get_task(entry: str | TaskSpec, base_dir: Path, specs: list[str | TaskSpec] = ()) -> Task:
    """A builtin task by name, or a user task from its spec (data paths resolve against `base_dir`).

    `<task>+names` is the counterfactual name-swap variant of a builtin task or of a task defined in `specs`
    (the experiment's task list)."""
    if isinstance(entry, str) and entry.endswith(SUFFIX):
        base = entry[: -len(SUFFIX)]
        defined = {s.name: s for s in specs if isinstance(s, TaskSpec)}
        return counterfactual_task(get_task(defined.get(base, base), base_dir))
    if isinstance(entry, TaskSpec):
        if entry.name in BUILTIN_TASKS:
            raise ConfigError(
                f"task name '{entry.name}' is taken by a builtin task",
                "give the task defined in the experiment file another name",
            )
        return task_from_spec(entry, base_dir)
    if entry not in BUILTIN_TASKS:
        raise ConfigError(
            f"unknown task '{entry}'",
            f"use one of: {', '.join(BUILTIN_TASKS)}, or define it in the experiment file (see README); "
            f"add '{SUFFIX}' for its counterfactual name swaps",
        )
    return _builtin(entry)


def list_tasks() -> list[Task]:
    """Every builtin task, for `labscale tasks`."""
    return [_builtin(name) for name in BUILTIN_TASKS]
