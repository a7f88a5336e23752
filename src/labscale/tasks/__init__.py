"""Tasks: examples, instruction, metrics and seeded splits; builtin tasks and tasks from the experiment file."""

from labscale.tasks.base import SPLITS, Task, TaskType
from labscale.example import Example
from labscale.tasks.registry import BUILTIN_TASKS, get_task, list_tasks
from labscale.tasks.user import task_from_spec

__all__ = ["BUILTIN_TASKS", "SPLITS", "Example", "Task", "TaskType", "get_task", "list_tasks", "task_from_spec"]
