"""Task names → Task objects: the builtin tasks, and tasks defined in the experiment file."""

from __future__ import annotations

import importlib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from labscale.config import TASK_OPTIONS, CollectionSpec, TaskOptions, TaskRef, TaskSpec, task_name
from labscale.errors import ConfigError, did_you_mean
from labscale.example import Demo, Example
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
    task = _with_prompt_and_collection(_get_task(entry, base_dir, specs), entry, base_dir)
    if options is None:
        own = {} if isinstance(entry, str) else \
            {k: getattr(entry, k) for k in entry.model_fields_set & set(TASK_OPTIONS)}
        options = TaskOptions(**own)
    if options.max_input_tokens is None:
        return task
    return replace(task, max_input_tokens=options.max_input_tokens, truncate=options.truncate)


def collection_loader(spec: CollectionSpec, base_dir: Path):
    """A task's `collection` callable for a collection named in the experiment file: loaded (and chunked) on
    first use, once."""

    @lru_cache(maxsize=1)
    def load():
        from labscale.retrieval.collection import load_collection

        return load_collection(spec.path, base_dir, text_column=spec.text_column, id_column=spec.id_column,
                               title_column=spec.title_column, max_words=spec.max_words, overlap=spec.overlap)

    return load


def _with_prompt_and_collection(task: Task, entry: str | TaskRef | TaskSpec, base_dir: Path) -> Task:
    """The entry's own instruction (builtin tasks), fixed demos and collection over the task's."""
    if isinstance(entry, str):
        return task
    changes: dict = {}
    if isinstance(entry, TaskRef) and entry.instruction is not None:
        changes["instruction"] = entry.instruction.strip()
    if entry.demos:
        changes["demos"] = tuple(
            Demo(Example(id=d.id or f"demo-{i}", input=d.input, target=d.output, choices=tuple(d.choices)),
                 d.output, "fixed") for i, d in enumerate(entry.demos))
    if entry.collection is not None:
        changes["collection"] = collection_loader(entry.collection, base_dir)
    return replace(task, **changes) if changes else task


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
