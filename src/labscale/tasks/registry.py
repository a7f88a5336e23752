"""Task names → Task objects: the builtin tasks, and tasks defined in the experiment file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from labscale.config import TaskSpec
from labscale.errors import ConfigError
from labscale.tasks import fact_check, mts, openbookqa
from labscale.tasks.base import Task
from labscale.tasks.user import task_from_spec

BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    mts.NAME: mts.make_task,
    fact_check.NAME: fact_check.make_task,
    openbookqa.NAME: openbookqa.make_task,
}


def get_task(entry: str | TaskSpec, base_dir: Path) -> Task:
    """A builtin task by name, or a user task from its spec (data paths resolve against `base_dir`)."""
    if isinstance(entry, TaskSpec):
        if entry.name in BUILTIN_TASKS:
            raise ConfigError(
                f"task name '{entry.name}' is taken by a builtin task",
                "give the task defined in the experiment file another name",
            )
        return task_from_spec(entry, base_dir)
    factory = BUILTIN_TASKS.get(entry)
    if factory is None:
        raise ConfigError(
            f"unknown task '{entry}'",
            f"use one of: {', '.join(BUILTIN_TASKS)}, or define it in the experiment file (see README)",
        )
    return factory()


def list_tasks() -> list[Task]:
    """Every builtin task, for `labscale tasks`."""
    return [factory() for factory in BUILTIN_TASKS.values()]
