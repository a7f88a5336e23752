"""Runs (model × task × setting) and their prompts: everything checked before any work starts.

`plan_run` builds and renders every test prompt of one run and checks it against the model's context; the
experiment runner (engine/experiment.py) calls it for every model × task × setting while validating, and for
adapted models after the adapt phase. Anything wrong surfaces as a LabscaleError, before the database is opened,
so bad input never leaves a half-written database behind.

Context rule: a prompt whose tokens plus the generation budget (max_new_tokens; cot_max_new_tokens for cot) exceed
the model's context length — or, for log-likelihood scoring, whose context plus longest choice does — is an
error naming the example. labscale never truncates a prompt silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import metadata

from labscale.answers import ANSWER_PARSER_VERSION
from labscale.config import Experiment, ModelSpec
from labscale.errors import ConfigError, ModelError
from labscale.hashing import sha
from labscale.models.base import DecodingParams, ModelBackend
from labscale.settings.setting import (
    PROMPT_FORMAT_VERSION,
    Setting,
    chat_prompt,
    check_shots,
    loglikelihood_prompt,
    parse_setting,
    protocol_for,
)
from labscale.tasks.base import Task
from labscale.example import Example

_PACKAGES = ("labscale", "torch", "transformers", "tokenizers", "accelerate", "bitsandbytes", "rouge-score",
             "sacrebleu", "bert-score", "scikit-learn", "numpy")


def environment() -> dict:
    import os
    import platform

    versions: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "packages": versions}


@dataclass
class Item:
    """One example of a run: its prompt (rendered text, or log-likelihood context) and model requests."""

    example: Example
    prompt: str
    tokens: int  # prompt tokens (context tokens for log-likelihood)
    continuations: list[str] = field(default_factory=list)  # log-likelihood protocol only


@dataclass
class RunPlan:
    id: str
    model: ModelSpec
    backend: ModelBackend
    task: Task
    setting: Setting
    protocol: str  # "generate" | "loglikelihood"
    decoding: DecodingParams
    items: list[Item]
    seed: int

    @property
    def label(self) -> str:
        return f"{self.model.label} · {self.task.name} · {self.setting.name}"

    def record(self) -> dict:
        """The run row the store keeps (everything but results)."""
        info = self.backend.info
        return {
            "id": self.id, "task": self.task.name, "model": self.model.label, "model_fingerprint": info.fingerprint,
            "setting": self.setting.name, "protocol": self.protocol, "n_examples": len(self.items), "seed": self.seed,
            "decoding": self.decoding.key(), "task_info": {**self.task.info(), "labels": list(self.task.labels)},
            "model_info": {**asdict(info), "spec": self.model.model_dump()},
        }


def _decoding(exp: Experiment, setting: Setting) -> DecodingParams:
    g = exp.generation
    budget = g.cot_max_new_tokens if setting.kind == "cot" else g.max_new_tokens
    return DecodingParams(max_new_tokens=budget, temperature=g.temperature, top_p=g.top_p, stop=tuple(g.stop),
                          seed=exp.seed)


def _items(task: Task, setting: Setting, protocol: str, backend: ModelBackend, examples: list[Example],
           seed: int, budget: int) -> list[Item]:
    items = []
    ctx = backend.info.context_length
    for ex in examples:
        if protocol == "loglikelihood":
            prompt, continuations = loglikelihood_prompt(task, setting, ex, seed)
            tokens = backend.count_tokens(prompt)
            need = tokens + max(backend.count_tokens(c) for c in continuations)
            what = "context plus its longest choice"
        else:
            prompt, continuations = backend.render(chat_prompt(task, setting, ex, seed)), []
            tokens = backend.count_tokens(prompt)
            need = tokens + budget
            what = f"prompt plus max_new_tokens={budget}"
        if need > ctx:
            raise ModelError(
                f"example '{ex.id}' of task '{task.name}' ({setting.name}) needs {need} tokens ({what}) but "
                f"model '{backend.info.name}' has a context of {ctx}",
                "use fewer shots, a lower max_new_tokens, shorter inputs, or a model with a longer context",
            )
        items.append(Item(ex, prompt, tokens, continuations))
    return items


def skipped_models(exp: Experiment) -> list[tuple[ModelSpec, str]]:
    """Optional remote models whose key is not set, with the reason: left out of the plan with a visible notice.
    A required model without its key is an error before any work starts."""
    from labscale.models.registry import missing_key, missing_key_error

    skipped = []
    for spec in exp.models:
        var = missing_key(spec)
        if var is None:
            continue
        if not spec.optional:
            raise missing_key_error(spec, var)
        skipped.append((spec, f"${var} is not set"))
    if len(skipped) == len(exp.models):
        raise ConfigError("every model was skipped (optional API models without keys)",
                          "set the API keys, or add a model that needs none")
    return skipped


def check_prices(exp: Experiment, backends: list[ModelBackend]) -> None:
    """With a cost_limit, every remote model needs a price (the limit could not be enforced otherwise)."""
    if exp.cost_limit is None:
        return
    for b in backends:
        if b.info.is_remote and b.info.price is None:
            raise ConfigError(f"cost_limit is set but no price is known for model '{b.info.name}'",
                              "add price: {input: <$ per 1M tokens>, output: <$ per 1M>} to its entry "
                              "(0 for a local server)")


def plan_run(exp: Experiment, spec: ModelSpec, backend: ModelBackend, task: Task, setting: Setting,
             test_set: list[Example]) -> RunPlan:
    """One run: every test prompt built, rendered and checked against the model's context."""
    protocol = protocol_for(task, setting, backend.info.supports_loglikelihood)
    decoding = _decoding(exp, setting)
    items = _items(task, setting, protocol, backend, test_set, exp.seed, decoding.max_new_tokens)
    run_id = sha({
        "format": PROMPT_FORMAT_VERSION, "parser": ANSWER_PARSER_VERSION, "model": spec.label,
        "fingerprint": backend.info.fingerprint,
        "task": task.name, "task_type": task.type, "metrics": task.metrics, "setting": setting.name,
        "protocol": protocol, "decoding": decoding.key(), "seed": exp.seed,
        "bootstrap": exp.bootstrap_samples,
        "items": sha([(it.example.id, it.prompt, it.continuations, it.example.target) for it in items]),
    })[:16]
    return RunPlan(run_id, spec, backend, task, setting, protocol, decoding, items, exp.seed)
