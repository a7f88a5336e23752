"""Fine-tuning as an adaptation of an experiment (see adapt/adaptation.py): `finetune_adaptations(exp, tasks)`
validates every fine-tuning an experiment declares, without loading weights; each `run` trains (or reuses an
identical adapter) and hands back the adapter backend the planner evaluates under the `finetuned` setting.

The fine-tuned run's model label is the base model's (or the adaptation's `name`), so the report's
"Results by task — finetuned" table sits beside the zero/few-shot tables with the same columns.
"""

from __future__ import annotations

from pathlib import Path

from labscale.adapt.adaptation import AdaptContext, Adapted
from labscale.adapt.data import FINETUNED
from labscale.adapt.finetune import FinetuneOptions, Job, prepare_job, run_job
from labscale.config import Experiment, ModelSpec
from labscale.tasks.base import Task

__all__ = ["FINETUNED", "FinetuneAdaptation", "base_model_spec", "finetune_adaptations"]


def base_model_spec(exp: Experiment | None, model: str, quantization: str | None) -> ModelSpec:
    """The model to fine-tune: the experiment's entry named `model` (by name or id), else a bare `model` id;
    `quantization` overrides the entry's; relative paths resolve against the experiment file (else the cwd)."""
    found = next((m for m in exp.models if model in (m.label, m.id)), None) if exp is not None else None
    spec = found or ModelSpec(id=model)
    if quantization is not None:
        spec = spec.model_copy(update={"quantization": quantization})
    return spec.resolved(exp.base_dir if exp is not None else Path("."))


class FinetuneAdaptation:
    """LoRA / QLoRA (optionally DP) fine-tuning of a local model on a task's train split."""

    kind = "finetune"

    def __init__(self, label: str, spec: ModelSpec, job: Job):
        self.label, self.spec, self.job = label, spec, job
        self.task = job.options.task

    @property
    def identity(self) -> str:
        return self.job.identity

    @property
    def reused(self) -> bool:
        return self.job.state == "done"

    def estimate(self) -> str:
        j = self.job
        if self.reused:
            return f"finetune {self.label} on {self.task.name}: identical adapter exists ({j.out}), reusing it"
        what = "resume" if j.state == "resume" else "train"
        return (f"finetune {self.label} on {self.task.name}: {what} {j.steps} steps on {len(j.train.examples)} "
                f"examples with recipe {j.recipe.name}, budget ${j.options.budget_usd:g} (a timed probe checks "
                "the estimate before training)")

    def run(self, ctx: AdaptContext) -> Adapted:
        from labscale.models.adapter import AdapterBackend

        result = run_job(self.job, ctx.say)
        run_spec = self.spec.model_copy(update={"id": f"adapter:{result.out.resolve()}", "name": self.label})
        return Adapted(run_spec, AdapterBackend(run_spec, str(result.out)), self.task, FINETUNED, result.card,
                       result.reused)


def finetune_adaptations(exp: Experiment, tasks: list[Task]) -> list[FinetuneAdaptation]:
    """One validated FinetuneAdaptation per `adaptations:` entry (tokenizers and configs only; no weights)."""
    by_name = {t.name: t for t in tasks}
    out = []
    for a in exp.adaptations:
        if a.method != "finetune":  # distillations: adapt/distill.py
            continue
        spec = base_model_spec(exp, a.model, a.quantization)
        out_dir = None if a.out is None else (exp.base_dir / a.out).resolve()
        options = FinetuneOptions.of(a, spec, by_name[a.task], out=out_dir, default_seed=exp.seed)
        out.append(FinetuneAdaptation(a.name or spec.label, spec, prepare_job(options, world_size=1)))
    return out
