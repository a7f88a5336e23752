"""Adaptations declared in an experiment file: validate every one, then train (or reuse) each adapter, and hand the
planner the adapter backends it evaluates under the `finetuned` setting.

The fine-tuned run's model label is the base model's (or the adaptation's `name`), so the report's
"Results by task — finetuned" table sits beside the zero/few-shot tables with the same columns.
"""

from __future__ import annotations

from pathlib import Path

from labscale.adapt.data import FINETUNED
from labscale.adapt.finetune import FinetuneOptions, Job, prepare_job, run_job
from labscale.config import Experiment, ModelSpec
from labscale.models.base import ModelBackend
from labscale.tasks.base import Task

__all__ = ["FINETUNED", "adapted_models", "prepare_adaptations"]


def base_model_spec(exp: Experiment | None, model: str, quantization: str | None) -> ModelSpec:
    """The model to fine-tune: the experiment's entry named `model` (by name or id), else a bare `model` id;
    `quantization` overrides the entry's; relative paths resolve against the experiment file (else the cwd)."""
    found = next((m for m in exp.models if model in (m.label, m.id)), None) if exp is not None else None
    spec = found or ModelSpec(id=model)
    if quantization is not None:
        spec = spec.model_copy(update={"quantization": quantization})
    return spec.resolved(exp.base_dir if exp is not None else Path("."))


def prepare_adaptations(exp: Experiment, tasks: list[Task]) -> list[tuple[str, ModelSpec, Job]]:
    """(label, base spec, job) for every adaptation; all validated before any training starts."""
    by_name = {t.name: t for t in tasks}
    jobs = []
    for a in exp.adaptations:
        spec = base_model_spec(exp, a.model, a.quantization)
        out = None if a.out is None else (exp.base_dir / a.out).resolve()
        options = FinetuneOptions.of(a, spec, by_name[a.task], out=out, default_seed=exp.seed)
        jobs.append((a.name or spec.label, spec, prepare_job(options, world_size=1)))
    return jobs


def adapted_models(exp: Experiment, tasks: list[Task]) -> list[tuple[ModelSpec, ModelBackend, Task]]:
    """Train what is missing, then one (run spec, adapter backend, task) per adaptation."""
    from labscale.models.adapter import AdapterBackend

    out = []
    for label, spec, job in prepare_adaptations(exp, tasks):
        result = run_job(job)
        run_spec = spec.model_copy(update={"id": f"adapter:{result.out.resolve()}", "name": label})
        out.append((run_spec, AdapterBackend(run_spec, str(result.out)), job.options.task))
    return out
