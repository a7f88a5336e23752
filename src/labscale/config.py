"""The experiment file: schema (pydantic), loading, and one-line errors for every way it can be wrong."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from labscale.errors import ConfigError, did_you_mean
from labscale.taskgroups import TASK_GROUPS


class _Strict(BaseModel):
    # inf / nan pass `ge` / `gt` bounds otherwise (`.inf` is valid YAML): no field of labscale takes them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Seeds feed Python's random, numpy and torch generators and SQLite INTEGER columns: 0 … 2**32 - 1 fits them all.
MAX_SEED = 2**32 - 1
SEED = Field(0, ge=0, le=MAX_SEED, description="few-shot draws, sampling, bootstrap (0 … 4294967295)")
MIN_TEMPERATURE = 1e-3  # below this, softmax(logits / T) under- or overflows in float32
MAX_TOKENS = 2**20  # far beyond any model's context; keeps token arithmetic and JSON integers small
# The bootstrap holds n_boot × n resample indices in memory: 10,000 × 10,000 examples is 800 MB.
MAX_BOOTSTRAP = 10_000


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


# Fields of a model entry that only remote (API) backends take; models/registry.py checks them per backend.
API_FIELDS = ("base_url", "price", "context_length", "token_limit_field")


class LlamaServerSpec(_Strict):
    """How labscale runs llama.cpp's `llama-server` for a `llamacpp:` model (models/llamacpp.py)."""

    parallel: int = Field(1, ge=1, le=256, description="server slots (--parallel): requests decoded together by "
                          "continuous batching; on a 2-core laptop 1-2 is fastest")
    threads: Optional[int] = Field(None, ge=1, le=1024, description="CPU threads (-t; default: all cores)")
    context_length: Optional[int] = Field(None, ge=64, le=2**24, description="tokens per request (default: the "
                                          "model's training context, at most 8192); the KV cache holds parallel × this")
    gpu_layers: Optional[int] = Field(None, ge=0, le=100_000, description="layers offloaded to a GPU (-ngl) in a "
                                      "GPU build of llama.cpp; default: llama.cpp's")
    args: list[str] = Field([], description="more llama-server arguments, passed as written")
    startup_timeout_s: float = Field(300.0, gt=0, le=86_400, description="wait this long for the model to load")


class ModelSpec(_Strict):
    """A model entry. The short form `- embedded:smollm2-135m-instruct` is the same as `- id: embedded:…`.

    The fields after `revision` apply to `openai:<model>` (any OpenAI-compatible API; `timeout_s` and
    `max_retries` to `llamacpp:` too), `device_map` to local transformers models, `server` to `llamacpp:`; a field
    set on an entry whose backend does not take it is an error (models/registry.py)."""

    id: str = Field(description="embedded:<name> | hf:<hub id or local path> | openai:<model> | "
                    "llamacpp:<file.gguf or embedded:name> | adapter:<folder>")
    name: Optional[str] = Field(None, description="display name in reports (default: id)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    device: str = "auto"
    batch_size: int = Field(16, ge=1, le=4096, description="local: forward batch; API: requests per stored batch")
    revision: Optional[str] = None
    base_url: Optional[str] = Field(None, description="API endpoint (default: $OPENAI_BASE_URL, else OpenAI's)")
    api_key_env: Optional[str] = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key; null for servers without auth"
    )
    optional: bool = Field(False, description="skip the model with a notice when its API key is not set")
    concurrency: int = Field(8, ge=1, le=256, description="API requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="per API request")
    max_retries: int = Field(5, ge=0, le=20, description="retries on 429, 5xx, timeouts and malformed replies")
    price: Optional[Price] = Field(None, description="overrides the built-in price table")
    context_length: Optional[int] = Field(None, ge=1, le=2**31,
                                          description="API model context (default: the price table's)")
    token_limit_field: Optional[Literal["max_tokens", "max_completion_tokens"]] = Field(
        None, description="request field for the output budget (default: max_completion_tokens for OpenAI's "
        "reasoning models o1/o3/o4/gpt-5, else max_tokens, which every compatible server accepts)"
    )
    loglikelihood: Literal["none", "completions"] = Field(
        "none", description="completions: score multiple-choice tasks by log-likelihood through /v1/completions "
        "with echo and logprobs (vLLM, labscale serve); none: the letter protocol")
    loglikelihood_fallback: bool = Field(
        False, description="with loglikelihood: completions, an endpoint that gives no prompt log-probabilities "
        "falls back to the letter protocol (with a notice) instead of stopping with an error")
    device_map: Optional[Literal["auto"]] = Field(
        None, description="local models: auto spreads the weights over every visible GPU (then CPU memory) with "
        "accelerate, for a model bigger than one device")
    server: Optional[LlamaServerSpec] = Field(None, description="llamacpp: models: how llama-server runs")

    @property
    def label(self) -> str:
        return self.name or self.id

    def resolved(self, base_dir: str | Path) -> "ModelSpec":
        """`hf:`, `adapter:` and `llamacpp:` paths relative to the experiment file (`base_dir`), like data paths; the display
        name stays as written. Other ids, and paths that do not exist there, are returned unchanged."""
        prefix, _, rest = self.id.partition(":")
        if prefix in ("hf", "adapter", "llamacpp") and rest.startswith("."):
            candidate = (Path(base_dir) / rest).resolve()
            if candidate.exists():
                return self.model_copy(update={"id": f"{prefix}:{candidate}", "name": self.label})
        return self


class TaskOptions(_Strict):
    """Options any task takes, builtin or defined in the experiment file: on a task entry, or for every task under
    `task_defaults:` (an entry's own value wins). Declared here once; both places are this model."""

    max_input_tokens: Optional[int] = Field(
        None, ge=1, description="opt-in: cut each example's input (never the instruction or the answer cue) to at most "
        "this many tokens of the model's own tokenizer; recorded with the run and reported")
    truncate: Literal["middle", "end"] = Field(
        "middle", description="what max_input_tokens cuts: the input's middle (its head and tail are kept, joined by "
        "' […] ') or its end (' […]' marks the cut)")


TASK_OPTIONS = tuple(TaskOptions.model_fields)


class CollectionSpec(_Strict):
    """The documents a `rag:K` setting searches for a task (see docs/rag.md): a folder of .txt/.md files, one
    .txt/.md file, or a table (.jsonl / .csv / .json / .parquet) with one document per row."""

    path: str = Field(description="relative to the experiment file")
    text_column: str = Field("text", description="tables: the column holding each document's text")
    id_column: Optional[str] = Field(None, description="tables: document ids (default: the 0-based row number)")
    title_column: Optional[str] = Field(None, description="tables: document titles (optional)")
    max_words: int = Field(150, ge=1, le=100_000, description="chunk size in words")
    overlap: int = Field(30, ge=0, le=100_000, description="words shared by consecutive windows of a long paragraph")


class DemoSpec(_Strict):
    """A fixed demonstration shown before every prompt's input (e.g. a compiled prompt's, exported)."""

    input: str = Field(description="the example's input, as the task's input template renders it")
    output: str = Field(description="the answer shown for it, verbatim")
    choices: list[str] = Field([], description="multiple_choice: the options shown with the input")
    id: Optional[str] = Field(None, description="where the demonstration came from (provenance only)")


class TaskRef(TaskOptions):
    """A builtin task (or its `+names` variant) with options: `{name: mts-summarization, max_input_tokens: 512}`."""

    name: str
    instruction: Optional[str] = Field(None, description="replaces the builtin task's instruction")
    demos: list[DemoSpec] = Field([], description="fixed demonstrations before every input")
    collection: Optional[CollectionSpec] = Field(None, description="the documents rag:K searches (replaces the "
                                                 "builtin task's own)")


class DataSplits(_Strict):
    """One file (or hf: id) per split, instead of a seeded shuffle of one file. Any split may be left out: a
    test-only task is fine for zero-shot; few-shot needs `train`, fine-tuning `train` and `dev`."""

    train: Optional[str] = None
    dev: Optional[str] = None
    test: Optional[str] = None

    @model_validator(mode="after")
    def _some(self):
        if not (self.train or self.dev or self.test):
            raise ValueError("`data:` names no file; give at least `test: <file>`")
        return self


def _data_kind(v: Any) -> Optional[str]:
    if isinstance(v, (str, dict, DataSplits)):
        return "data-path" if isinstance(v, str) else "data-splits"
    return None


class TaskSpec(TaskOptions):
    """A task defined in the experiment file over a local CSV/JSONL/JSON/Parquet file or an HF dataset id."""

    name: str
    data: Annotated[
        Union[Annotated[str, Tag("data-path")], Annotated[DataSplits, Tag("data-splits")]],
        Discriminator(_data_kind, custom_error_type="data_type",
                      custom_error_message="`data:` should be a path or {train: …, dev: …, test: …}"),
    ] = Field(description="path (relative to the experiment file) or hf:<dataset id>[:<split>]; or one per split: "
              "{train: …, dev: …, test: …}")
    type: Literal["generate", "classify", "multiple_choice"]
    input: str = Field(description="Jinja2 template over the row's columns")
    target: str = Field(description="column holding the reference / label / gold choice")
    instruction: str = ""
    labels: list[str] = []
    choices: Optional[Union[str, list[str]]] = Field(
        None, description="multiple_choice: a column holding a list, or a list of columns"
    )
    metrics: Optional[list[str]] = None
    main_metric: Optional[str] = None
    id_column: Optional[str] = None
    description: str = ""
    license: str = "unknown"
    split_fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    split_column: Optional[str] = Field(
        None, description="column naming each row's split (train / dev / test; also training, validation, valid, "
        "val, development, testing), instead of split_fractions")
    groups: list[str] = Field([], description="columns to break every metric down by (per group, worst group, gap)")
    label_aliases: dict[str, list[str]] = Field({}, description="classify: other phrasings that count as a label")
    demos: list[DemoSpec] = Field([], description="fixed demonstrations before every input (e.g. an exported "
                                  "compiled prompt)")
    collection: Optional[CollectionSpec] = Field(None, description="the documents rag:K searches for this task")
    gold_passage: Optional[str] = Field(None, description="column naming each row's gold document or passage id "
                                        "(scores retrieval: recall_at_k, mrr)")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_written(cls, v):
        """`labels: [0, 1]` are the labels "0" and "1" (YAML reads them as numbers)."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v]
        return v

    @model_validator(mode="after")
    def _one_way_to_split(self):
        given = [w for w, on in (("split_fractions", "split_fractions" in self.model_fields_set),
                                 ("split_column", self.split_column is not None),
                                 ("data per split", isinstance(self.data, DataSplits))) if on]
        if len(given) > 1:
            raise ValueError(f"task '{self.name}' splits its data two ways ({' and '.join(given)}); keep one")
        return self


# A `tasks:` entry: a builtin task's name, a builtin task with options, or a task defined here. An entry with any
# field only a defined task has (data, type, input, …) is read as a definition, so its errors name its fields.
_SPEC_ONLY = frozenset(TaskSpec.model_fields) - frozenset(TaskRef.model_fields)


def _task_kind(v: Any) -> Optional[str]:
    if isinstance(v, str):
        return "task-name"
    if isinstance(v, TaskSpec) or (isinstance(v, dict) and _SPEC_ONLY & set(v)):
        return "task-spec"
    if isinstance(v, (dict, TaskRef)):
        return "task-builtin"
    return None


TaskEntry = Annotated[
    Union[Annotated[str, Tag("task-name")], Annotated[TaskRef, Tag("task-builtin")],
          Annotated[TaskSpec, Tag("task-spec")]],
    Discriminator(_task_kind, custom_error_type="task_entry",
                  custom_error_message="a task entry should be a task name or a mapping with `name:`"),
]
_TAGS: dict[str, Any] = {"task-name": str, "task-builtin": TaskRef, "task-spec": TaskSpec, "data-path": str,
                         "data-splits": DataSplits}


def task_name(entry: Union[str, TaskRef, TaskSpec]) -> str:
    return entry if isinstance(entry, str) else entry.name


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    cot_max_new_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="budget for the cot setting's reasoning + "
                                    "answer")
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = []

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampling(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:  # logits / 1e-100 overflow: sampling would fail after the work started
            raise ValueError(f"temperature {v:g} is too small to sample with; use 0 for greedy decoding or at least "
                             f"{MIN_TEMPERATURE:g}")
        return v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("an empty stop string would cut every output to nothing; remove it")
        return v


def _says(problem: str | None = None, *, message: str | None = None, example: str | None = None,
          hint: str | None = None, noun: str | None = None) -> dict:
    """How a bad value of an option is reported when it came from a command-line flag (see `flag_error`):
    "<flag> <value> <problem>", or a whole `message`; the hint is `hint`, else "e.g. <flag> <example>"; a value
    outside a Literal is "unknown <noun, default the flag> '<value>'"."""
    said = {"problem": problem, "message": message, "example": example, "hint": hint, "noun": noun}
    return {k: v for k, v in said.items() if v is not None}


class DPSpec(_Strict):
    """DP-SGD on the LoRA parameters: per-sample clipping at `max_grad_norm`, noise calibrated so that the whole
    training spends at most `epsilon` at `delta` (default: 1 / (2 × training examples); δ ≥ 1 / n is refused)."""

    epsilon: float = Field(gt=0, allow_inf_nan=False, description="the ε the whole training may spend",
                           json_schema_extra=_says("is not a positive number", example="8"))
    delta: Optional[float] = Field(None, gt=0, lt=1, description="δ, below 1/n (default 1/(2n), n = train examples)",
                                   json_schema_extra=_says("is not between 0 and 1",
                                                           hint="leave it out for 1/(2n), or e.g. 1e-5"))
    max_grad_norm: float = Field(1.0, gt=0, description="per-example clipping norm",
                                 json_schema_extra=_says("is not positive", example="1"))


MAX_CANARIES = 1000
CANARY_SPACE = 10**6  # six-digit secrets (adapt/canary.py)


class FinetuneSpec(_Strict):
    """How to fine-tune (LoRA / QLoRA, optionally DP; see docs/finetune.md): the options `labscale finetune` takes
    as flags and an experiment's `adaptations:` entries take as keys, declared and validated here only."""

    quantization: Optional[Literal["none", "8bit", "4bit"]] = Field(
        None, description="of the base during training and evaluation (default: the model entry's)")
    recipe: str = Field("auto", description="auto or a recipe name (see `labscale recipes`)")
    overrides: dict[str, Any] = Field({}, description="recipe fields, e.g. {lora_r: 8, learning_rate: 1e-4}")
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps (overrides epochs)",
                                     json_schema_extra=_says("is not a positive count", example="100"))
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED,
                                description="LoRA initialisation, dropout and data order (default: the "
                                            "experiment's seed; 0 for `labscale finetune`)")
    train_limit: Optional[int] = Field(None, ge=1, description="train on the first N examples of the task's seeded "
                                       "train split only (default: all) — quick runs, learning curves",
                                       json_schema_extra=_says("is not a positive count", example="64"))
    budget_usd: float = Field(25.0, gt=0, description="refuse / stop before the training would cost more",
                              json_schema_extra=_says(message="the budget must be a positive number of dollars",
                                                      example="25"))
    co2_cap_kg: Optional[float] = Field(None, gt=0, description="kg CO2eq cap",
                                        json_schema_extra=_says(message="the CO2 cap must be a positive number of "
                                                                        "kg", example="0.5"))
    hardware: Literal["auto", "cpu", "t4", "a100"] = Field(
        "auto", description="picks the recipe and the price", json_schema_extra=_says(noun="hardware class"))
    price_per_hour: Optional[float] = Field(None, ge=0, description="US $ per device-hour (default: by hardware)",
                                            json_schema_extra=_says(message="the price per hour cannot be negative",
                                                                    example="0.35"))
    country: str = Field("USA", description="ISO 3166 alpha-3 code for the grid carbon intensity")
    log: Literal["none", "wandb", "mlflow"] = Field(
        "none", description="experiment tracking: wandb (offline) or mlflow (SQLite beside the adapter)")
    dp: Optional[DPSpec] = Field(None, description="differentially private training (Opacus, LoRA weights only)")
    canaries: int = Field(0, ge=0, le=MAX_CANARIES, description="secret canaries inserted into the training data; "
                                                                "their exposure is measured after training",
                          json_schema_extra=_says("is out of range", hint=f"use 1 to {MAX_CANARIES} (0 for none)"))
    canary_repeats: int = Field(4, ge=1, description="copies of each canary in the training data",
                                json_schema_extra=_says("is not a positive count", example="4"))
    canary_candidates: int = Field(1000, ge=10, le=CANARY_SPACE // 2,
                                   description="random same-format secrets each canary is ranked against",
                                   json_schema_extra=_says("is out of range", hint=f"use 10 to {CANARY_SPACE // 2} "
                                                                                   "(the default is 1000)"))

    @classmethod
    def from_flags(cls, values: dict[str, Any], flags: dict[str, str]) -> "FinetuneSpec":
        """The options given on a command line (None: not given, i.e. the default); a bad value is a one-line
        error naming its flag (`flags`: field → flag, default `--field-name`)."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise flag_error(e, cls, flags) from None

    def finetune_fields(self) -> dict[str, Any]:
        """The FinetuneSpec fields of this object (of a subclass too), by name."""
        return {name: getattr(self, name) for name in FinetuneSpec.model_fields}


class AdaptationSpec(FinetuneSpec):
    """A fine-tuning declared in the experiment: `model` is trained on `task` (LoRA / QLoRA, see docs/finetune.md)
    and evaluated under the `finetuned` setting. An identical earlier adapter is reused."""

    method: Literal["finetune"] = Field("finetune", description="finetune (the default) | distill")
    model: str = Field(description="a model of this experiment (its name or id), or embedded:/hf: id")
    task: str = Field(description="a task of this experiment")
    name: Optional[str] = Field(None, description="the fine-tuned model's column in reports (default: the model's)")
    out: Optional[str] = Field(None, description="adapter folder (default: runs/adapters/<identity>)")


class OptimizeSpec(_Strict):
    """How `optimized` settings compile their prompts (adapt/compile.py; see docs/optimize.md). The mode and the
    trial budget T are the setting's: optimized[:fewshot|instruction|full[:T]]."""

    teacher: Optional[str] = Field(None, description="model answering train examples for bootstrapped demos: a "
                                   "model of this experiment (name or id) or an embedded:/hf:/openai: id (default: "
                                   "the model being compiled)")
    proposer: Optional[str] = Field(None, description="model writing candidate instructions (default: the model "
                                    "being compiled)")
    max_bootstrapped_demos: int = Field(4, ge=0, le=32, description="teacher answers the metric accepted")
    max_labeled_demos: int = Field(4, ge=0, le=32, description="train examples with their gold answers (also the "
                                   "teacher's own demonstrations)")
    train_limit: int = Field(64, ge=1, le=100_000, description="train examples the bootstrap may visit (the "
                             "first N of the seeded train split)")
    dev_limit: Optional[int] = Field(50, ge=1, le=100_000, description="dev examples every candidate is scored on "
                                     "(the first N of the seeded dev split; null: all)")
    demo_threshold: Optional[float] = Field(None, description="a teacher answer is kept when its main-metric score "
                                            "is at least this (default: above 0, i.e. correct for accuracy)")
    instructions_per_round: int = Field(2, ge=1, le=32, description="instructions the proposer writes per round")
    history: int = Field(8, ge=1, le=64, description="earlier instructions (best by dev score) the proposer sees")
    exemplars: int = Field(3, ge=0, le=16, description="train examples (input and answer) the proposer sees")
    proposer_temperature: float = Field(0.7, ge=0.0, le=2.0, description="sampling temperature of the proposer")
    proposer_max_new_tokens: int = Field(96, ge=8, le=4096)
    minibatch: int = Field(8, ge=1, le=100_000, description="full: dev examples of the first successive-halving rung")
    budget_usd: float = Field(5.0, gt=0, description="stop compiling (keeping the best prompt so far) once its "
                              "calls cost more: API tokens × price, local compute hours × price_per_hour")
    hardware: Literal["auto", "cpu", "t4", "a100"] = Field("auto", description="prices local compute")
    price_per_hour: Optional[float] = Field(None, ge=0, description="US $ per device-hour (default: by hardware)")
    country: str = Field("USA", description="ISO 3166 alpha-3 code for the grid carbon intensity (CodeCarbon)")


TEACHER_SETTING = r"^(zero-shot|cot|few-shot:[1-9][0-9]*)$"


class InstructionsSpec(_Strict):
    """LaMini-style instruction distillation (docs/distill.md): the teacher writes new instructions from seed
    examples (and topics), the filters drop short / long / unanswerable / near-duplicate ones, the teacher responds
    to each, and the student is fine-tuned on the pairs."""

    seeds: Optional[str] = Field(None, description="file of seed instructions: .txt (one per line) or .jsonl/.json "
                                 "with an `instruction` field (default: labscale's packaged seed set)")
    topics: Optional[str] = Field(None, description="file of topics, one per line (default: the packaged list)")
    count: int = Field(100, ge=1, le=1_000_000, description="generated instructions to keep (seeds not counted)",
                       json_schema_extra=_says("is not a positive count", example="100"))
    per_prompt: int = Field(20, ge=1, le=100, description="new instructions asked for in each generation prompt "
                            "(LaMini: 20)", json_schema_extra=_says("is out of range", hint="use 1 to 100"))
    topic_share: float = Field(0.5, ge=0, le=1, description="share of generation prompts that are topic-guided",
                               json_schema_extra=_says("is not between 0 and 1", example="0.5"))
    include_seeds: bool = Field(True, description="the seed instructions (with teacher responses) join the data")
    generation_tokens: int = Field(768, ge=16, le=MAX_TOKENS, description="max_new_tokens of a generation prompt",
                                   json_schema_extra=_says("is out of range", example="768"))
    response_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="max_new_tokens of a teacher response",
                                 json_schema_extra=_says("is out of range", example="256"))
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="teacher sampling temperature for generation "
                               "prompts (responses are greedy)",
                               json_schema_extra=_says("is out of range", hint="use 0 (greedy) to 2"))
    dev_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of pairs held out as the dev split (early "
                                "stopping)", json_schema_extra=_says("is out of range", hint="use e.g. 0.1"))


class DistillSpec(FinetuneSpec):
    """A distillation declared in the experiment (`method: distill`, docs/distill.md): `teacher` labels `task`'s
    train inputs (task distillation) or writes an instruction dataset (`instructions:`), and `student` is fine-tuned
    on the teacher's outputs; the student is evaluated under the `distilled` setting — on `task`, or on every task
    of the experiment after instruction distillation. Training options are FinetuneSpec's; `budget_usd` covers the
    teacher's cost and the student's training together."""

    method: Literal["distill"]
    teacher: str = Field(description="a model of this experiment (its name or id), or any model id")
    student: str = Field(description="the model to train: a model of this experiment, or an embedded:/hf: id")
    task: Optional[str] = Field(None, description="task distillation: a task of this experiment")
    instructions: Optional[InstructionsSpec] = Field(None, description="instruction distillation (LaMini)")
    teacher_setting: Optional[str] = Field(None, pattern=TEACHER_SETTING,
                                           description="the teacher's prompt: zero-shot (default), few-shot:K or "
                                                       "cot (the default with rationales)")
    rationales: bool = Field(False, description="distilling step-by-step: the teacher's cot rationale becomes a "
                             "second training prompt (explain) beside the label (predict)")
    alpha: float = Field(0.5, gt=0, lt=1, description="with rationales: loss = α·predict + (1 − α)·explain",
                         json_schema_extra=_says("is not between 0 and 1", example="0.5"))
    name: Optional[str] = Field(None, description="the distilled model's column in reports (default: the student's)")
    out: Optional[str] = Field(None, description="folder for the data and the student (default: "
                               "runs/distilled/<identity>)")

    @model_validator(mode="before")
    @classmethod
    def _student_not_model(cls, data):
        if isinstance(data, dict) and "model" in data and "student" not in data:
            raise ValueError("a distillation names the model it trains `student:` (and its teacher `teacher:`), "
                             "not `model:`")
        return data

    @model_validator(mode="after")
    def _one_source(self):
        if (self.task is None) == (self.instructions is None):
            raise ValueError("a distillation takes `task:` (task distillation) or `instructions:` (instruction "
                             "distillation), exactly one")
        if self.instructions is not None and (self.rationales or self.teacher_setting):
            raise ValueError("`rationales` and `teacher_setting` apply to task distillation (`task:`) only")
        if "alpha" in self.model_fields_set and not self.rationales:
            raise ValueError("`alpha` weighs the rationale loss: set `rationales: true`, or remove it")
        if self.rationales and self.teacher_setting not in (None, "cot"):
            raise ValueError("rationales come from the teacher's cot answers: use teacher_setting: cot (or leave it "
                             "out)")
        if self.instructions is not None and self.train_limit is not None:
            raise ValueError("`train_limit` limits the train inputs of task distillation; with `instructions:` use "
                             "`instructions.count`")
        if self.rationales and self.dp is not None:
            raise ValueError("rationale training does not support `dp`; drop one of them")
        return self

    @property
    def prompt_setting(self) -> str:
        return self.teacher_setting or ("cot" if self.rationales else "zero-shot")


def _adaptation_kind(v: Any) -> Optional[str]:
    if isinstance(v, (AdaptationSpec, DistillSpec)):
        return v.method
    if isinstance(v, dict):
        method = v.get("method", "finetune")
        return method if method in ("finetune", "distill") else None
    return None


AdaptationEntry = Annotated[
    Union[Annotated[AdaptationSpec, Tag("finetune")], Annotated[DistillSpec, Tag("distill")]],
    Discriminator(_adaptation_kind, custom_error_type="adaptation_method",
                  custom_error_message="an adaptation is a mapping whose `method` is finetune (the default) or "
                                       "distill"),
]
_TAGS_ADAPT = {"finetune": AdaptationSpec, "distill": DistillSpec}
# Adaptation fields added after files with adaptations existed: they hash only when set (see config_hash).
_LATER_ADAPTATION_FIELDS = ("method", "train_limit")


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    task_defaults: TaskOptions = Field(TaskOptions(), description="options for every task (an entry's own win)")
    settings: list[str] = Field(["zero-shot"], min_length=1)
    limit: Optional[int] = Field(None, ge=1, description="test examples per task (the first N of the seeded split)")
    seed: int = SEED
    generation: GenerationSpec = GenerationSpec()
    bootstrap_samples: int = Field(1000, ge=100, le=MAX_BOOTSTRAP)
    cost_limit: Optional[float] = Field(
        None, gt=0, description="US dollars: API requests stop before this experiment's API cost would exceed it"
    )
    adaptations: list[AdaptationEntry] = Field([], description="fine-tunings (evaluated as the finetuned "
                                               "setting) and distillations (the distilled setting)")
    reference: Optional[str] = Field(
        None, description="the model every other run is compared with for the report's verdicts (a model's name as "
        "the report shows it); default: the best run of each task")
    margin: Optional[Union[float, dict[str, float]]] = Field(
        None, description="how far from the reference still counts as good enough, in each task's main-metric units: "
        "one number for every task, or {default: 0.02, <task>: 1.5}; default 0")
    optimize: OptimizeSpec = Field(OptimizeSpec(), description="prompt compilation for the optimized settings")
    base_dir: Path = Field(Path("."), exclude=True, description="where relative data paths resolve")

    @field_validator("models", mode="before")
    @classmethod
    def _short_models(cls, v):
        if isinstance(v, list):
            return [{"id": m} if isinstance(m, str) else m for m in v]
        return v

    @model_validator(mode="after")
    def _unique(self):
        for what, names in (
            ("model", [m.label for m in self.models]),
            ("task", [task_name(t) for t in self.tasks]),
            ("setting", self.settings),
        ):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what} listed twice: {', '.join(sorted(dup))}")
        self._check_adaptations()
        self._check_task_options()
        self._check_verdict_options()
        return self

    def model_labels(self) -> list[str]:
        """The models' names as runs and reports show them: every model entry's, then every adaptation's."""
        labels = [m.label for m in self.models]
        by_key = {m.label: m.label for m in self.models} | {m.id: m.label for m in self.models}
        for a in self.adaptations:
            trained = a.model if isinstance(a, AdaptationSpec) else a.student
            labels.append(a.name or by_key.get(trained, trained))
        return list(dict.fromkeys(labels))

    def margin_for(self, task: str) -> float:
        """The verdict margin of `task` (main-metric units): its own entry, else `default`, else the number, else 0."""
        if isinstance(self.margin, dict):
            return float(self.margin.get(task, self.margin.get("default", 0.0)))
        return float(self.margin or 0.0)

    def _check_verdict_options(self) -> None:
        labels = self.model_labels()
        if self.reference is not None and self.reference not in labels:
            by_id = next((m.label for m in self.models if m.id == self.reference), None)
            guess = f"did you mean '{by_id}' (its name)? " if by_id else did_you_mean(self.reference, labels)
            raise ValueError(f"reference '{self.reference}' is not a model of this experiment; {guess}"
                             f"name one of: {', '.join(labels)}")
        margins = self.margin if isinstance(self.margin, dict) else {"margin": self.margin}
        tasks = [task_name(t) for t in self.tasks]
        for key, value in margins.items():
            if isinstance(self.margin, dict) and key != "default" and key not in tasks:
                raise ValueError(f"margin for '{key}', which is not a task of this experiment; "
                                 f"{did_you_mean(key, ['default', *tasks])}use default or one of: {', '.join(tasks)}")
            if value is not None and value < 0:
                where = "margin" if key == "margin" else f"margin of '{key}'"
                raise ValueError(f"{where} {value:g} is negative: a margin is how far from the reference still counts "
                                 "as good enough, in the task's main-metric units (e.g. 0.02)")

    def task_options(self, name: str) -> TaskOptions:
        """The options of task `name`: its entry's own fields over its group entry's (taskgroups.py) over
        `task_defaults`."""
        defaults = {k: getattr(self.task_defaults, k) for k in self.task_defaults.model_fields_set}
        layers = [defaults]
        for entry in (next((t for t in self.tasks if task_name(t) in TASK_GROUPS
                            and name in TASK_GROUPS[task_name(t)].members), None),
                      next((t for t in self.tasks if task_name(t) == name), None)):
            if entry is not None and not isinstance(entry, str):
                layers.append({k: getattr(entry, k) for k in TASK_OPTIONS if k in entry.model_fields_set})
        return TaskOptions(**{k: v for layer in layers for k, v in layer.items()})

    def task_entries(self) -> list[Union[str, TaskRef, TaskSpec]]:
        """The `tasks:` entries with every task group (taskgroups.py) replaced by its member tasks, each task once."""
        out: list[Union[str, TaskRef, TaskSpec]] = []
        for t in self.tasks:
            group = TASK_GROUPS.get(task_name(t)) if not isinstance(t, TaskSpec) else None
            out += list(group.members) if group else [t]
        unique: dict[str, Union[str, TaskRef, TaskSpec]] = {}
        for t in out:
            unique.setdefault(task_name(t), t)
        return list(unique.values())

    def _check_task_options(self) -> None:
        for t in self.tasks:
            if not isinstance(t, str) and "truncate" in t.model_fields_set and \
                    self.task_options(t.name).max_input_tokens is None:
                raise ValueError(f"task '{t.name}' sets `truncate` without `max_input_tokens`, so nothing is cut")
        if "truncate" in self.task_defaults.model_fields_set and not any(
                self.task_options(task_name(t)).max_input_tokens for t in self.tasks):
            raise ValueError("task_defaults sets `truncate` but no task has `max_input_tokens`, so nothing is cut")

    def _check_adaptations(self) -> None:
        tasks = [task_name(t) for t in self.task_entries()]
        models = {m.label: m for m in self.models} | {m.id: m for m in self.models}
        seen = set()
        for a in self.adaptations:
            if a.task is not None and a.task not in tasks:
                raise ValueError(f"adaptation task '{a.task}' is not one of this experiment's tasks")
            trained = a.model if isinstance(a, AdaptationSpec) else a.student
            role = "model" if isinstance(a, AdaptationSpec) else "distillation student"
            spec = models.get(trained)
            if spec is None and trained.partition(":")[0] not in ("embedded", "hf"):
                raise ValueError(f"adaptation {role} '{trained}' is neither a model of this experiment nor an "
                                 "embedded:/hf: id")
            if isinstance(a, DistillSpec) and spec is not None and spec.id.partition(":")[0] not in ("embedded", "hf"):
                raise ValueError(f"distillation student '{trained}' ({spec.id}) cannot be trained: the student must "
                                 "be a local model (embedded:<name> or hf:<id or folder>)")
            if isinstance(a, DistillSpec) and a.teacher not in models and ":" not in a.teacher:
                raise ValueError(f"distillation teacher '{a.teacher}' is neither a model of this experiment nor a "
                                 "model id (embedded:, hf:, adapter:, openai:)")
            label = a.name or (spec.label if spec else trained)
            key = (label, a.task or "instructions", a.method)
            if key in seen:
                what = f"task '{a.task}'" if a.task else "instructions"
                raise ValueError(f"two {a.method} adaptations of '{label}' on {what}; give one a `name`")
            seen.add(key)

    def config_hash(self) -> str:
        """Hash of everything that determines results (not the display-only base_dir). Fields added later hash
        only when set, so an experiment that does not use them hashes as it did before they existed."""
        # reference and margin only change how the report reads results, never a result: not hashed
        data = self.model_dump(mode="json", exclude={"reference", "margin", *(() if self.adaptations else
                                                                              ("adaptations",))})
        if not self.task_defaults.model_fields_set:
            data.pop("task_defaults")
        if not self.optimize.model_fields_set:
            data.pop("optimize")
        for entry, dumped in zip(self.tasks, data["tasks"]):
            if isinstance(dumped, dict):
                later = _LATER_TASK_FIELDS + (("instruction",) if isinstance(entry, TaskRef) else ())
                for key in later:
                    if isinstance(entry, str) or key not in entry.model_fields_set:
                        dumped.pop(key, None)
        for adaptation, dumped in zip(self.adaptations, data.get("adaptations", [])):
            if isinstance(adaptation, AdaptationSpec):
                for key in _LATER_ADAPTATION_FIELDS:
                    if key == "method" or key not in adaptation.model_fields_set:
                        dumped.pop(key, None)
        for model, dumped_model in zip(self.models, data["models"]):
            for key in LATER_MODEL_FIELDS:
                if key not in model.model_fields_set:
                    dumped_model.pop(key, None)
        blob = json.dumps(data, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_LATER_TASK_FIELDS = (*TASK_OPTIONS, "split_column", "demos", "collection", "gold_passage")
_TAGS.update(_TAGS_ADAPT)
# Model entry fields added after experiments were first stored: they hash only when set.
LATER_MODEL_FIELDS = ("loglikelihood", "loglikelihood_fallback", "device_map", "server")


def _unwrap(t: Any) -> Any:
    """Annotated[X, …] → X; Optional[X] → X (the one non-None member)."""
    while True:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
            continue
        if get_origin(t) is Union:
            members = [a for a in get_args(t) if a is not type(None)]
            if len(members) == 1:
                t = members[0]
                continue
        return t


def _fields_at(loc: tuple) -> list[str]:
    """The keys the experiment file allows at `loc` (the location of the mapping that holds an unknown key)."""
    t: Any = Experiment
    for part in loc:
        t = _unwrap(t)
        if isinstance(part, str) and part in _TAGS:
            t = _TAGS[part]
        elif isinstance(part, int) and get_origin(t) in (list, tuple):
            t = get_args(t)[0]
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return []
    t = _unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [name for name, f in t.model_fields.items() if not f.exclude]
    return []


def _loc_text(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in _TAGS and not str(p).startswith(("function-", "union")))


def _format_validation_error(err: ValidationError) -> tuple[str, str]:
    """(message, hint) for the first error; an unknown key gets the closest allowed key of its mapping."""
    hint = "see the experiment file format in the README"
    first = err.errors()[0]
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        *where, key = first["loc"]
        loc = _loc_text(tuple(where))
        at = f" at '{loc}'" if loc else ""
        allowed = _fields_at(tuple(where))
        suggestion = did_you_mean(key, allowed)
        if not suggestion and allowed:
            suggestion = f"keys allowed here: {', '.join(allowed)}; "
        return f"invalid experiment file: unknown key '{key}'{at}{extra}", suggestion + hint
    where_text = _loc_text(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "string_type" and isinstance(first.get("input"), (bool, int, float)):
        kind = {"bool": "a boolean", "int": "a number", "float": "a number"}[type(first["input"]).__name__]
        msg += f" (YAML read {first['input']!r} as {kind}: quote it, e.g. '{first['input']}')"
    place = f"at '{where_text}'" if where_text else "at the top level"
    return f"invalid experiment file {place}: {msg}{extra}", hint


def _nested_model(annotation) -> type[BaseModel] | None:
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def flag_error(err: ValidationError, model: type[BaseModel], flags: dict[str, str]) -> ConfigError:
    """A one-line error for the first problem of `err` (raised validating `model` from command-line flags),
    named by its flag and worded by the field's `_says` metadata."""
    first = err.errors()[0]
    loc = [p for p in first["loc"] if isinstance(p, str)]
    field = loc[-1] if loc else ""
    flag = flags.get(field, "--" + field.replace("_", "-"))
    info = None
    cls: type[BaseModel] | None = model
    for part in loc:
        info = cls.model_fields.get(part) if cls is not None else None
        cls = _nested_model(info.annotation) if info is not None else None
    said = info.json_schema_extra if info is not None and isinstance(info.json_schema_extra, dict) else {}
    value = first.get("input")
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    hint = str(said["hint"]) if "hint" in said else (f"e.g. {flag} {said['example']}" if "example" in said else None)
    if first["type"] == "literal_error":
        choices = str(first.get("ctx", {}).get("expected", "")).replace("'", "")
        return ConfigError(f"unknown {said.get('noun', flag)} '{value}'", f"use {choices}")
    if "message" in said:
        return ConfigError(str(said["message"]), hint)
    problem = said.get("problem") or f"is invalid: {first['msg'].removeprefix('Value error, ')}"
    return ConfigError(f"{flag} {shown} {problem}", hint)


def parse_experiment(data: object, base_dir: Path = Path(".")) -> Experiment:
    if not isinstance(data, dict):
        raise ConfigError("the experiment file must be a YAML mapping", "start from examples/quickstart.yaml")
    try:
        return Experiment(**data, base_dir=base_dir)
    except ValidationError as e:
        raise ConfigError(*_format_validation_error(e)) from None
    except TypeError as e:  # e.g. a key that is not a string
        raise ConfigError(f"invalid experiment file: {e}", "see the experiment file format in the README") from None


def load_experiment(path: str | Path) -> Experiment:
    from labscale.yamlio import load_yaml

    data = load_yaml(path, "experiment file")
    return parse_experiment(data, base_dir=Path(path).resolve().parent)
