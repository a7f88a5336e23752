"""The experiment file: schema (pydantic), loading, and one-line errors for every way it can be wrong."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labscale.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    batch_size: int = Field(16, ge=1, description="local: forward batch; API: requests per stored batch")
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
    context_length: Optional[int] = Field(None, ge=1, description="API model context (default: the price table's)")
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


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(64, ge=1)
    cot_max_new_tokens: int = Field(256, ge=1, description="budget for the cot setting's reasoning + answer")
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = []


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
    seed: int = 0
    generation: GenerationSpec = GenerationSpec()
    bootstrap_samples: int = Field(1000, ge=100)
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


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "union")))
    msg = first["msg"].removeprefix("Value error, ")
    where = f"at '{loc}'" if loc else "at the top level"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
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
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file '{path}' does not exist", "check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise ConfigError(f"malformed YAML in '{path}'{where}: {problem}", "fix the YAML syntax") from None
    return parse_experiment(data, base_dir=path.resolve().parent)
