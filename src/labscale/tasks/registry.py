"""Task names → Task objects: the builtin tasks, and tasks defined in the experiment file."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

from labscale.config import TASK_OPTIONS, TaskOptions, TaskRef, TaskSpec, task_name
from labscale.errors import ConfigError, did_you_mean
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
    "piqa": "piqa",
    "siqa": "siqa",
    "commonsenseqa": "commonsenseqa",
    "boolq": "boolq",
}


def _builtin(name: str) -> Task:
    return importlib.import_module(f"labscale.tasks.{BUILTIN_TASKS[name]}").make_task()


def get_task(entry: str | TaskRef | TaskSpec, base_dir: Path, specs: list[str | TaskRef | TaskSpec] = (),
             options: TaskOptions | None = None) -> Task:
    """A builtin task by name, or a user task from its spec (data paths resolve against `base_dir`).

    `<task>+names` is the counterfactual name-swap variant of a builtin task or of a task defined in `specs`
    (the experiment's task list). `options` (Experiment.task_options: the entry's own over task_defaults) default
    to the entry's own."""
    task = _get_task(entry, base_dir, specs)
    if options is None:
        own = {} if isinstance(entry, str) else \
            {k: getattr(entry, k) for k in entry.model_fields_set & set(TASK_OPTIONS)}
        options = TaskOptions(**own)
    if options.max_input_tokens is None:
        return task
    return replace(task, max_input_tokens=options.max_input_tokens, truncate=options.truncate)


def _get_task(entry: str | TaskRef | TaskSpec, base_dir: Path, specs) -> Task:
    name = task_name(entry)
    if name.endswith(SUFFIX):
        base = name[: -len(SUFFIX)]
        defined = {s.name: s for s in specs if isinstance(s, TaskSpec)}
        return counterfactual_task(get_task(defined.get(base, base), base_dir))
    if isinstance(entry, TaskSpec):
        if entry.name in BUILTIN_TASKS:
            raise ConfigError(
                f"task name '{entry.name}' is taken by a builtin task",
                "give the task defined in the experiment file another name",
            )
        return task_from_spec(entry, base_dir)
    if name not in BUILTIN_TASKS:
        defined = [s.name for s in specs if isinstance(s, TaskSpec)]
        raise ConfigError(
            f"unknown task '{name}'",
            f"{did_you_mean(name, [*BUILTIN_TASKS, *defined])}use one of: {', '.join(BUILTIN_TASKS)}, or define it "
            f"in the experiment file (see README); add '{SUFFIX}' for its counterfactual name swaps",
        )
    return _builtin(name)


def list_tasks() -> list[Task]:
    """Every builtin task, for `labscale tasks`."""
    return [_builtin(name) for name in BUILTIN_TASKS]
