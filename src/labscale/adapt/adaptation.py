"""The adaptation interface: one way of turning (model, task) into something evaluated — fine-tuning today,
distillation and prompt compilation beside it.

An experiment's `adapt` phase (engine/experiment.py) handles every adaptation the same way:

1. while validating (before any work and before the database opens), the adaptation is built: it resolves and
   checks everything it needs without expensive work, and knows its `identity` — a hash of everything that
   determines its result — and whether that result already exists (`reused`);
2. `estimate()` gives one line about what running it will do and cost, printed before anything runs; an
   adaptation that can tell before spending anything that it would exceed its budget raises here;
3. `run(ctx)` produces the result (or reuses an identical earlier one), reports progress through `ctx.say`, and
   sends any model calls (a teacher labelling data, an optimizer's trials) through the experiment's generation
   cache, `ctx.cache` (engine/cache.py) — so an interrupted adaptation resumes without repeating a call;
4. the result names the model to evaluate (`spec`, `backend`), the setting its runs appear under
   (e.g. `finetuned`) and the `card`: how it was made and what it cost (the report's Adaptations section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from labscale.config import ModelSpec
from labscale.engine.cache import GenerationCache
from labscale.engine.store import Store
from labscale.models.base import ModelBackend
from labscale.settings.setting import Setting
from labscale.tasks.base import Task

Say = Callable[[str], None]


@dataclass
class AdaptContext:
    """What an adaptation may use while it runs: the experiment's store (its generation cache) and a printer."""

    store: Store
    say: Say

    @property
    def cache(self) -> GenerationCache:
        return GenerationCache(self.store)


@dataclass
class Adapted:
    """What an adaptation hands the planner: evaluate `backend` on `task` under `setting`."""

    spec: ModelSpec  # the run's model entry (its label is the report column)
    backend: ModelBackend
    task: Task
    setting: Setting
    card: dict  # provenance and cost (e.g. an adapter's labscale.json)
    reused: bool = False


class Adaptation(Protocol):
    kind: str  # "finetune", "distill", "compile"
    label: str  # the adapted model's column in reports
    task: Task

    @property
    def identity(self) -> str:
        """Hash of everything that determines the result: equal identities give the same result."""

    @property
    def reused(self) -> bool:
        """True when an identical result already exists and `run` will only load it."""

    def estimate(self) -> str:
        """One line on what `run` will do and what it may cost; raises a LabscaleError when it can already tell
        that the budget would be exceeded."""

    def run(self, ctx: AdaptContext) -> Adapted: ...
