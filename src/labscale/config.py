"""The experiment file: schema (pydantic), loading, and one-line errors for every way it can be wrong."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labscale.errors import ConfigError


class _Strict(BaseModel):
    # inf / nan pass `ge` / `gt` bounds otherwise (`.inf` is valid YAML): no field of labscale takes them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Seeds feed Python's random, numpy and torch generators and SQLite INTEGER columns: 0 … 2**32 - 1 fits them all.
MAX_SEED = 2**32 - 1
SEED = Field(0, ge=0, le=MAX_SEED, description="few-shot draws, sampling, bootstrap (0 … 4294967295)")
MAX_TOKENS = 2**20  # far beyond any model's context; keeps token arithmetic and JSON integers small
# The bootstrap holds n_boot × n resample indices in memory: 10,000 × 10,000 examples is 800 MB.
MAX_BOOTSTRAP = 10_000


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


# Fields of a model entry that only remote (API) backends take; models/registry.py checks them per backend.
API_FIELDS = ("base_url", "price", "context_length", "token_limit_field")


class ModelSpec(_Strict):
    """A model entry. The short form `- embedded:smollm2-135m-instruct` is the same as `- id: embedded:…`.

    The fields after `revision` apply to `openai:<model>` (any OpenAI-compatible API)."""

    id: str = Field(description="embedded:<name> | hf:<hub id or local path> | openai:<model>")
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

    @property
    def label(self) -> str:
        return self.name or self.id

    def resolved(self, base_dir: str | Path) -> "ModelSpec":
        """`hf:` and `adapter:` paths relative to the experiment file (`base_dir`), like data paths; the display
        name stays as written. Other ids, and paths that do not exist there, are returned unchanged."""
        prefix, _, rest = self.id.partition(":")
        if prefix in ("hf", "adapter") and rest.startswith("."):
            candidate = (Path(base_dir) / rest).resolve()
            if candidate.exists():
                return self.model_copy(update={"id": f"{prefix}:{candidate}", "name": self.label})
        return self


class TaskSpec(_Strict):
    """A task defined in the experiment file over a local CSV/JSONL/JSON/Parquet file or an HF dataset id."""

    name: str
    data: str = Field(description="path (relative to the experiment file) or hf:<dataset id>[:<split>]")
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
    groups: list[str] = Field([], description="columns to break every metric down by (per group, worst group, gap)")
    label_aliases: dict[str, list[str]] = Field({}, description="classify: other phrasings that count as a label")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_written(cls, v):
        """`labels: [0, 1]` are the labels "0" and "1" (YAML reads them as numbers)."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v]
        return v


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    cot_max_new_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="budget for the cot setting's reasoning + "
                                    "answer")
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = []

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("an empty stop string would cut every output to nothing; remove it")
        return v


class DPSpec(_Strict):
    """DP-SGD on the LoRA parameters: per-sample clipping at `max_grad_norm`, noise calibrated so that the whole
    training spends at most `epsilon` at `delta` (default: 1 / (2 × training examples); δ ≥ 1 / n is refused)."""

    epsilon: float = Field(gt=0)
    delta: Optional[float] = Field(None, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)


class AdaptationSpec(_Strict):
    """A fine-tuning declared in the experiment: `model` is trained on `task` (LoRA / QLoRA, see docs/finetune.md)
    and evaluated under the `finetuned` setting. An identical earlier adapter is reused."""

    model: str = Field(description="a model of this experiment (its name or id), or embedded:/hf: id")
    task: str = Field(description="a task of this experiment")
    name: Optional[str] = Field(None, description="the fine-tuned model's column in reports (default: the model's)")
    quantization: Optional[Literal["none", "8bit", "4bit"]] = Field(
        None, description="of the base during training and evaluation (default: the model entry's)")
    recipe: str = "auto"
    overrides: dict[str, Any] = Field({}, description="recipe fields, e.g. {lora_r: 8, learning_rate: 1e-4}")
    max_steps: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, description="default: the experiment's seed")
    out: Optional[str] = Field(None, description="adapter folder (default: runs/adapters/<identity>)")
    budget_usd: float = Field(25.0, gt=0, description="refuse / stop before the training would cost more")
    co2_cap_kg: Optional[float] = Field(None, gt=0)
    hardware: Literal["auto", "cpu", "t4", "a100"] = "auto"
    price_per_hour: Optional[float] = Field(None, ge=0, description="US $ per device-hour (default: by hardware)")
    country: str = Field("USA", description="ISO 3166 alpha-3 code for the grid carbon intensity")
    log: Literal["none", "wandb", "mlflow"] = "none"
    dp: Optional[DPSpec] = Field(None, description="differentially private training (Opacus, LoRA weights only)")
    canaries: int = Field(0, ge=0, description="secret canaries inserted into the training data; their exposure "
                                               "is measured after training")
    canary_repeats: int = Field(4, ge=1, description="copies of each canary in the training data")
    canary_candidates: int = Field(1000, ge=1, description="random same-format secrets each canary is ranked against")


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[Union[str, TaskSpec]] = Field(min_length=1)
    settings: list[str] = Field(["zero-shot"], min_length=1)
    limit: Optional[int] = Field(None, ge=1, description="test examples per task (the first N of the seeded split)")
    seed: int = SEED
    generation: GenerationSpec = GenerationSpec()
    bootstrap_samples: int = Field(1000, ge=100, le=MAX_BOOTSTRAP)
    cost_limit: Optional[float] = Field(
        None, gt=0, description="US dollars: API requests stop before this experiment's API cost would exceed it"
    )
    adaptations: list[AdaptationSpec] = Field([], description="fine-tunings, evaluated as the finetuned setting")
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
            ("task", [t if isinstance(t, str) else t.name for t in self.tasks]),
            ("setting", self.settings),
        ):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what} listed twice: {', '.join(sorted(dup))}")
        self._check_adaptations()
        return self

    def _check_adaptations(self) -> None:
        tasks = [t if isinstance(t, str) else t.name for t in self.tasks]
        models = {m.label: m for m in self.models} | {m.id: m for m in self.models}
        seen = set()
        for a in self.adaptations:
            if a.task not in tasks:
                raise ValueError(f"adaptation task '{a.task}' is not one of this experiment's tasks")
            spec = models.get(a.model)
            if spec is None and a.model.partition(":")[0] not in ("embedded", "hf"):
                raise ValueError(f"adaptation model '{a.model}' is neither a model of this experiment nor an "
                                 "embedded:/hf: id")
            label = a.name or (spec.label if spec else a.model)
            if (label, a.task) in seen:
                raise ValueError(f"two adaptations of '{label}' on task '{a.task}'; give one a `name`")
            seen.add((label, a.task))

    def config_hash(self) -> str:
        """Hash of everything that determines results (not the display-only base_dir). An experiment without
        adaptations hashes as it did before they existed."""
        blob = json.dumps(self.model_dump(mode="json", exclude=None if self.adaptations else {"adaptations"}),
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Names pydantic puts in an error's location for the member of a Union it tried (`tasks.0.str`, `tasks.0.TaskSpec`)
_BRANCHES = {"str", "int", "float", "bool", "list[str]", "TaskSpec", "ModelSpec", "Price", "DPSpec"}


def _relevant(errors: list[dict]) -> list[dict]:
    """For a Union field (a task is a name or a mapping), the errors of the branch the user meant: a mapping's
    errors, not "should be a valid string"."""
    def branch(e):
        return next((str(p) for p in e["loc"] if str(p) in _BRANCHES), None)

    deeper = [e for e in errors if branch(e) not in (None, "str", "int", "float", "bool", "list[str]")]
    plain = [e for e in errors if branch(e) is None]
    return plain or deeper or errors


def _format_validation_error(err: ValidationError) -> str:
    errors = _relevant(err.errors())
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]
                   if not str(p).startswith(("function-", "union")) and str(p) not in _BRANCHES)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "string_type" and isinstance(first.get("input"), (bool, int, float)):
        kind = {"bool": "a boolean", "int": "a number", "float": "a number"}[type(first["input"]).__name__]
        msg += f" (YAML read {first['input']!r} as {kind}: quote it, e.g. '{first['input']}')"
    where = f"at '{loc}'" if loc else "at the top level"
    extra = f" ({len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid experiment file {where}: {msg}{extra}"


def parse_experiment(data: object, base_dir: Path = Path(".")) -> Experiment:
    if not isinstance(data, dict):
        raise ConfigError("the experiment file must be a YAML mapping", "start from examples/quickstart.yaml")
    try:
        return Experiment(**data, base_dir=base_dir)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e), "see the experiment file format in the README") from None
    except TypeError as e:  # e.g. a key that is not a string
        raise ConfigError(f"invalid experiment file: {e}", "see the experiment file format in the README") from None


def load_experiment(path: str | Path) -> Experiment:
    from labscale.yamlio import load_yaml

    data = load_yaml(path, "experiment file")
    return parse_experiment(data, base_dir=Path(path).resolve().parent)
