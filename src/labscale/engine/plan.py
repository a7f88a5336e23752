"""Runs (model × task × setting) and their prompts: everything checked before any work starts.

`plan_run` builds and renders every test prompt of one run and checks it against the model's context; the
experiment runner (engine/experiment.py) calls it for every model × task × setting while validating, and for
adapted models after the adapt phase. Anything wrong surfaces as a LabscaleError, before the database is opened,
so bad input never leaves a half-written database behind.

Context rule: a prompt whose tokens plus the generation budget (max_new_tokens; cot_max_new_tokens for cot) exceed
the model's context length — or, for log-likelihood scoring, whose context plus longest choice does — is an
error that counts the examples that do not fit, names the first few, and says which max_input_tokens would make
them fit. labscale never truncates a prompt silently: only a task's explicit `max_input_tokens` cuts inputs
(settings/truncate.py), and each run records how many it cut (`input_limit` in its task info).

Output budget: on a generate task, a max_new_tokens under a quarter of the median reference length (in the model's
tokens, over the run's test examples) is recorded with the run (`output_budget`) and warned about.

Retrieval (rag:K[:retriever]): the task's collection is indexed once per (collection, retriever) — `load_index`
reads the cached index, or builds and caches it — and shared by every model's run; the K best passages of every
test example come from one batched search (query: `retrieval.query_for(example)`). They go into the prompt as
settings/setting.py's numbered passage block and travel with each item (`Item.retrieved`) to the runner, which
scores retrieval and stores the passage ids with each prediction. Passages are never cut and never dropped: a
prompt that does not fit with its K passages is an error naming the largest K at which every example fits. The run
id includes the collection hash, the retriever and its index version; the run record keeps them
(`task_info["retrieval"]`).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from typing import Any, Callable

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
    select_shots,
)
from labscale.settings.truncate import cut_input
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
    truncated: bool = False  # its input was cut to the task's max_input_tokens
    retrieved: list | None = None  # rag: the retrieval Hits in the prompt, best first


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
    output_budget: dict | None = None  # set when max_new_tokens is far below the references (_output_budget)
    retrieval: dict | None = None  # rag: collection, retriever, index version (see `retrieve`)

    @property
    def label(self) -> str:
        return f"{self.model.label} · {self.task.name} · {self.setting.name}"

    @property
    def requests(self) -> int:
        """Model requests of this run (one per example; one per choice for log-likelihood)."""
        return sum(max(1, len(it.continuations)) for it in self.items)

    def input_limit(self) -> dict | None:
        """The task's max_input_tokens and how many of this run's test inputs it cut, or None without it."""
        if self.task.max_input_tokens is None:
            return None
        return {"max_input_tokens": self.task.max_input_tokens, "truncate": self.task.truncate,
                "truncated": sum(it.truncated for it in self.items), "of": len(self.items)}

    def record(self) -> dict:
        """The run row the store keeps (everything but results)."""
        info = self.backend.info
        return {
            "id": self.id, "task": self.task.name, "model": self.model.label, "model_fingerprint": info.fingerprint,
            "setting": self.setting.name, "protocol": self.protocol, "n_examples": len(self.items), "seed": self.seed,
            "decoding": self.decoding.key(), "task_info": {
                **self.task.info(), "labels": list(self.task.labels), "instruction": self.task.instruction,
                **({"input_limit": self.input_limit()} if self.input_limit() else {}),
                **({"output_budget": self.output_budget} if self.output_budget else {}),
                **({"retrieval": self.retrieval} if self.retrieval else {}),
                **({"compiled": self.setting.card} if self.setting.card else {})},
            "model_info": {**asdict(info), "spec": self.model.model_dump()},
        }


def _decoding(exp: Experiment, setting: Setting) -> DecodingParams:
    g = exp.generation
    budget = g.cot_max_new_tokens if setting.kind == "cot" else g.max_new_tokens
    return DecodingParams(max_new_tokens=budget, temperature=g.temperature, top_p=g.top_p, stop=tuple(g.stop),
                          seed=exp.seed)


def _fit(task: Task, backend: ModelBackend) -> Callable[[Example], Example]:
    """Each example with its input cut to the task's max_input_tokens for this model (as is without the option)."""
    limit = task.max_input_tokens
    if limit is None:
        return lambda ex: ex

    def fit(ex: Example) -> Example:
        cut = cut_input(backend, ex.input, limit, task.truncate)
        return ex if cut is None else replace(ex, input=cut)

    return fit


_NAMED = 3  # examples named in a context error

# One index per (collection hash, retriever) and one search per (index, K, queries), shared by every model's run.
_INDEXES: dict[tuple[str, str], Any] = {}  # retrieval Retrievers (with `manifest`, `reused`)
_HITS: dict[tuple[str, str, int, str], list] = {}


def task_collection(task: Task, setting: Setting):
    """The collection a rag setting searches for `task`, or a one-line error when it has none."""
    if task.collection is None:
        raise ConfigError(f"setting '{setting.name}' needs a document collection but task '{task.name}' has none",
                          f"name one on the task: `collection: {{path: docs/}}` (a folder of .txt/.md files, or a "
                          ".jsonl/.csv with a text column; see docs/rag.md), or drop {setting.name}")
    return task.collection()


def retrieve(task: Task, setting: Setting, examples: list[Example]) -> tuple[list[list], dict]:
    """The K best passages of every example (one batched search, memoised) and the retrieval's provenance."""
    from labscale.retrieval import load_index, query_for

    collection = task_collection(task, setting)
    key = (collection.hash, setting.retriever)
    if key not in _INDEXES:
        _INDEXES[key] = load_index(collection, setting.retriever)
    index = _INDEXES[key]
    queries = [query_for(ex) for ex in examples]
    hits_key = (*key, setting.passages, sha(queries))
    if hits_key not in _HITS:
        _HITS[hits_key] = index.search(queries, setting.passages)
    manifest = index.manifest
    info = {"retriever": setting.retriever, "k": setting.passages, "collection": collection.info(),
            "index_version": sha(manifest["version"])[:8], "index_built_at": manifest.get("built_at"),
            "index_build_s": manifest.get("build_s"), "index_reused": bool(getattr(index, "reused", False)),
            **({"encoder_truncated": manifest["truncated"]} if "truncated" in manifest else {})}
    return _HITS[hits_key], info


def _prompt(task: Task, setting: Setting, protocol: str, backend: ModelBackend, ex: Example, seed: int, fit,
            budget: int, hits) -> tuple[str, list[str], int, int]:
    """(prompt, continuations, prompt tokens, tokens needed in the context)."""
    if protocol == "loglikelihood":
        prompt, continuations = loglikelihood_prompt(task, setting, ex, seed, fit, hits)
        tokens = backend.count_tokens(prompt)
        return prompt, continuations, tokens, tokens + max(backend.count_tokens(c) for c in continuations)
    prompt = backend.render(chat_prompt(task, setting, ex, seed, fit, hits))
    tokens = backend.count_tokens(prompt)
    return prompt, [], tokens, tokens + budget


def _items(task: Task, setting: Setting, protocol: str, backend: ModelBackend, examples: list[Example],
           seed: int, budget: int, retrieved: list[list] | None = None) -> list[Item]:
    items, misfits = [], []
    ctx = backend.info.context_length
    fit = _fit(task, backend)
    for i, ex in enumerate(examples):
        hits = retrieved[i] if retrieved is not None else None
        prompt, continuations, tokens, need = _prompt(task, setting, protocol, backend, ex, seed, fit, budget, hits)
        if need > ctx:
            misfits.append((ex, need))
        items.append(Item(ex, prompt, tokens, continuations, truncated=fit(ex) is not ex, retrieved=hits))
    if misfits and retrieved is not None:
        raise _passages_error(task, setting, protocol, backend, budget, examples, misfits, fit, seed, retrieved)
    if misfits:
        raise _context_error(task, setting, protocol, backend, budget, len(examples), misfits, fit, seed)
    return items


def _passages_error(task: Task, setting: Setting, protocol: str, backend: ModelBackend, budget: int,
                    examples: list[Example], misfits: list[tuple[Example, int]], fit, seed: int,
                    retrieved: list[list]) -> ModelError:
    """Passages are never cut or dropped: the error names the largest K at which every example fits."""
    ctx = backend.info.context_length
    k_fit = 0
    for k in range(setting.passages - 1, 0, -1):
        if all(_prompt(task, setting, protocol, backend, ex, seed, fit, budget, hits[:k])[3] <= ctx
               for ex, hits in zip(examples, retrieved)):
            k_fit = k
            break
    named = ", ".join(f"'{ex.id}' ({need})" for ex, need in misfits[:_NAMED])
    more = f", … ({len(misfits) - _NAMED} more)" if len(misfits) > _NAMED else ""
    fewer = f"rag:{k_fit}" + (f":{setting.retriever}" if setting.name.count(":") == 2 else "")
    use = f"use {fewer} (the most passages every example fits), " if k_fit else ""
    return ModelError(
        f"{len(misfits)} of {len(examples)} examples of task '{task.name}' ({setting.name}) do not fit model "
        f"'{backend.info.name}' (context {ctx} tokens) with their {setting.passages} passages; tokens needed: "
        f"{named}{more} (passages are never cut or dropped)",
        f"{use}smaller passages (`collection: {{max_words: 100}}` on the task), a lower max_new_tokens, or a model "
        "with a longer context")


def _context_error(task: Task, setting: Setting, protocol: str, backend: ModelBackend, budget: int, n: int,
                   misfits: list[tuple[Example, int]], fit, seed: int) -> ModelError:
    """How many examples do not fit, the first few by name, and the max_input_tokens that would make them fit."""
    ctx = backend.info.context_length
    what = "context plus its longest choice" if protocol == "loglikelihood" else f"prompt plus max_new_tokens={budget}"
    named = ", ".join(f"'{ex.id}' ({need})" for ex, need in misfits[:_NAMED])
    more = f", … ({len(misfits) - _NAMED} more)" if len(misfits) > _NAMED else ""
    # Room for each input (the test input and one per shot): the context less what the rest of the prompt needs,
    # shared by the inputs; the worst of the misfits decides.
    room = min((ctx - need + sum(backend.count_tokens(fit(x).input) for x in inputs)) // len(inputs)
               for ex, need in misfits for inputs in [[*select_shots(task, setting, ex, seed), ex]])
    if task.max_input_tokens is None:
        fix = (f"set `max_input_tokens: {room}` on the task to cut long inputs (see README), " if room > 0 else "") + \
            "use fewer shots, a lower max_new_tokens, or a model with a longer context"
    else:
        fix = (f"lower the task's max_input_tokens to {room}, " if 0 < room < task.max_input_tokens else "") + \
            "use fewer shots, a lower max_new_tokens, or a model with a longer context"
    return ModelError(
        f"{len(misfits)} of {n} examples of task '{task.name}' ({setting.name}) do not fit model "
        f"'{backend.info.name}', which has a context of {ctx} tokens; tokens needed ({what}): {named}{more}", fix)


BUDGET_RATIO = 4  # warn when max_new_tokens is under 1/4 of the median reference length


def _output_budget(task: Task, protocol: str, backend: ModelBackend, examples: list[Example],
                   budget: int) -> dict | None:
    """For a generate task: the median reference length in the model's tokens, when max_new_tokens is under a
    quarter of it (outputs would be cut short, and scores understate the model); None otherwise."""
    if task.type != "generate" or protocol != "generate" or not examples:
        return None
    median = int(statistics.median(backend.count_tokens(ex.target) for ex in examples))
    if budget * BUDGET_RATIO >= median:
        return None
    return {"max_new_tokens": budget, "median_target_tokens": median}


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
    if setting.deferred:
        raise ConfigError(f"setting '{setting.name}' is planned once its prompt is compiled (the adapt phase)")
    protocol = protocol_for(task, setting, backend.info.supports_loglikelihood)
    decoding = _decoding(exp, setting)
    retrieved, retrieval = retrieve(task, setting, test_set) if setting.kind == "rag" else (None, None)
    items = _items(task, setting, protocol, backend, test_set, exp.seed, decoding.max_new_tokens, retrieved)
    limit: dict[str, Any] = {"input_limit": [task.max_input_tokens, task.truncate]} if task.max_input_tokens else {}
    if retrieval:  # the index the passages came from (the prompts hold the passages themselves)
        limit["retrieval"] = [retrieval["collection"]["hash"], retrieval["retriever"], retrieval["index_version"]]
    if setting.compiled:
        limit["compiled"] = setting.compiled
    run_id = sha({**limit,
        "format": PROMPT_FORMAT_VERSION, "parser": ANSWER_PARSER_VERSION, "model": spec.label,
        "fingerprint": backend.info.fingerprint,
        "task": task.name, "task_type": task.type, "metrics": task.metrics, "setting": setting.name,
        "protocol": protocol, "decoding": decoding.key(), "seed": exp.seed,
        "bootstrap": exp.bootstrap_samples,
        "items": sha([(it.example.id, it.prompt, it.continuations, it.example.target) for it in items]),
    })[:16]
    budget = _output_budget(task, protocol, backend, test_set, decoding.max_new_tokens)
    if budget:
        budget["field"] = "cot_max_new_tokens" if setting.kind == "cot" else "max_new_tokens"
    return RunPlan(run_id, spec, backend, task, setting, protocol, decoding, items, exp.seed, budget, retrieval)
