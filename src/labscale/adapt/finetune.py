"""Fine-tune a local model on a task with LoRA (or QLoRA: a 4-bit NF4 base with double quantization).

`FinetuneOptions` are the training options of config.FinetuneSpec (declared and validated there, shared with the
experiment file's `adaptations:` and the `labscale finetune` flags) plus the resolved base model and task.

`prepare_job` resolves and checks everything without loading weights: the base model (embedded: or hf:), the
hardware class and its price, the recipe (auto or named, with overrides), the training and validation examples
(rendered exactly as evaluation renders them, see data.py), the optimizer steps, the adapter's identity and its
folder. `run_job` then trains it in a session (session.py: announce, estimate / refuse, meter, budget stop,
canaries, card) with TRL's SFTTrainer (sft.py) or, with `dp`, DP-SGD (dp.py), and saves the best checkpoint as a
standard PEFT adapter in the folder, the `labscale.json` card last.

Identity = hash(base fingerprint, quantization, task, exact training/validation tokens, recipe, seed, processes,
and — when asked for — the DP settings and the canaries).
The default folder is `runs/adapters/<identity>`; a folder holding a finished adapter of the same identity is
reused as is. A folder with checkpoints of the same identity is resumed from its last complete checkpoint (the
Trainer restores optimizer, scheduler, RNG states and data position), so an interrupted run — Ctrl-C or kill -9 —
continues where it stopped when the same command is run again.

Privacy (optional): `dp` trains with DP-SGD instead of the Trainer (Opacus; see dp.py), and `canaries` adds secret
canaries to the training data and measures their exposure in the trained adapter (see canary.py); both go into
the card.

Multi-process: under `accelerate launch` (DDP; FSDP / DeepSpeed through accelerate configs, see
docs/finetune.md) every process runs this same code; the main process prints, measures energy and writes files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pydantic import ConfigDict, InstanceOf

from labscale.adapt import card as cards
from labscale.adapt.budget import Budget, Hardware, hardware_class
from labscale.adapt.canary import CanarySpec
from labscale.adapt.carbon import check_country
from labscale.adapt.data import SplitData, build_split, digest
from labscale.adapt.recipes import Recipe, apply_overrides, pick_recipe, size_class, task_kind
from labscale.adapt.session import (
    CHECKPOINTS,
    RUN_FILE,
    Clock,
    FinetuneResult,
    FinetuneSession,
    Say,
    is_main_process,
)
from labscale.adapt.session import read_json as _read_json
from labscale.adapt.session import stderr as _stderr
from labscale.adapt.tracking import check_tracking
from labscale.config import SEED, FinetuneSpec, ModelSpec
from labscale.errors import ConfigError
from labscale.hashing import sha
from labscale.models.hf import HFBackend
from labscale.settings.setting import PROMPT_FORMAT_VERSION
from labscale.tasks.base import Task

if TYPE_CHECKING:
    from labscale.adapt.dp import DPPlan
    from labscale.adapt.session import TrainingRun

__all__ = ["CHECKPOINTS", "FinetuneOptions", "FinetuneResult", "Job", "TrainingPlan", "finetune", "plan_training",
           "prepare_job", "run_job"]

ADAPT_FORMAT = 1  # bump when what training does for the same inputs changes
DEFAULT_ADAPTERS_DIR = Path("runs") / "adapters"


class FinetuneOptions(FinetuneSpec):
    """One fine-tuning: the training options (config.FinetuneSpec: bounds, defaults, descriptions) plus the base
    model and task, resolved. `quantization`, when set, overrides `model.quantization` (see `base`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model: ModelSpec
    task: InstanceOf[Task]  # the task object as is (pydantic would otherwise rebuild a dataclass field by field)
    seed: int = SEED
    out: Optional[Path] = None
    adapters_dir: Path = DEFAULT_ADAPTERS_DIR

    @classmethod
    def of(cls, spec: FinetuneSpec, model: ModelSpec, task: Task, out: Path | None = None,
           default_seed: int = 0, **kw) -> "FinetuneOptions":
        """The options of `spec` (a FinetuneSpec, or an AdaptationSpec) for `model` and `task`; `spec.seed`, or
        `default_seed` when it has none."""
        fields = spec.finetune_fields()
        fields["seed"] = default_seed if spec.seed is None else spec.seed
        return cls(**fields, model=model, task=task, out=out, **kw)

    @property
    def base(self) -> ModelSpec:
        """The model to train, with the quantization override applied."""
        if self.quantization is None or self.quantization == self.model.quantization:
            return self.model
        return self.model.model_copy(update={"quantization": self.quantization})


@dataclass
class Job:
    options: FinetuneOptions
    backend: HFBackend
    hardware: Hardware
    usd_per_hour: float
    recipe: Recipe
    train: SplitData
    dev: SplitData
    steps: int
    world_size: int
    identity: str
    out: Path
    state: str  # "new" | "resume" | "done"
    checkpoint: Path | None = None
    dp: DPPlan | None = None
    canaries: CanarySpec | None = None
    country: str = "USA"  # the options' country, checked and upper-cased

    @property
    def quantization(self) -> str:
        return self.options.base.quantization

    def budget(self) -> Budget:
        return Budget(self.options.budget_usd, self.options.co2_cap_kg, self.usd_per_hour, self.world_size)


# ------------------------------------------------------------------------------------------------------ prepare


def _base_backend(spec: ModelSpec) -> HFBackend:
    from labscale.models.registry import resolve_model

    prefix = spec.id.partition(":")[0]
    if prefix not in ("embedded", "hf"):
        raise ConfigError(f"cannot fine-tune '{spec.id}'", "fine-tune a local model: embedded:<name> or "
                                                           "hf:<hub id or local path>")
    backend = resolve_model(spec)
    assert isinstance(backend, HFBackend)
    return backend


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (the Trainer writes it last)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _folder_state(out: Path, identity: str) -> tuple[str, Path | None]:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'{out}' is a file", "pass a folder with --out")
    card = cards.read_card(out)
    if card is not None:
        if card.get("identity") == identity and cards.is_finished(out):
            return "done", None
        raise ConfigError(f"'{out}' already holds an adapter trained with other settings "
                          f"(identity {card.get('identity')}; this run is {identity})",
                          "pass another --out, or delete that folder to train again")
    run = _read_json(out / CHECKPOINTS / RUN_FILE)
    if run is not None:
        if run.get("identity") != identity:
            raise ConfigError(f"'{out}' holds an unfinished training run with other settings "
                              f"(identity {run.get('identity')}; this run is {identity})",
                              "pass another --out, or delete that folder to start over")
        return "resume", _last_checkpoint(out / CHECKPOINTS)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty", "pass another --out (an empty or new folder)")
    return "new", None


@dataclass
class TrainingPlan:
    """What a fine-tuning resolves before it needs any data: the base backend, hardware and price, the recipe."""

    backend: HFBackend
    hardware: Hardware
    usd_per_hour: float
    recipe: Recipe
    country: str


def plan_training(options: FinetuneOptions) -> TrainingPlan:
    """Resolve and check the model, hardware, price, recipe (with overrides), tracking and country of a fine-tuning
    (tokenizer and config only): everything `prepare_job` checks before it reads the data."""
    check_tracking(options.log)
    country = check_country(options.country)
    backend = _base_backend(options.base)
    hw = hardware_class(options.hardware)
    price = hw.usd_per_hour if options.price_per_hour is None else options.price_per_hour
    recipe = pick_recipe(options.recipe, size_class(backend.info.parameters), task_kind(options.task.type),
                         options.base.quantization, hw.name)
    overrides = dict(options.overrides)
    if options.max_steps is not None:
        overrides["max_steps"] = options.max_steps
    return TrainingPlan(backend, hw, price, apply_overrides(recipe, overrides), country)


def prepare_job(options: FinetuneOptions, world_size: int | None = None, train: SplitData | None = None) -> Job:
    """Resolve a fine-tuning job (tokenizer and config only; no weights). The options' values were validated by
    FinetuneSpec; this checks what needs the model, the data or the machine. `train`: training rows built by the
    caller (rationale distillation's predict + explain rows) instead of the task's train split."""
    plan = plan_training(options)
    backend, hw, price, recipe, country = plan.backend, plan.hardware, plan.usd_per_hour, plan.recipe, plan.country
    quant = options.base.quantization
    canaries = None
    if options.canaries:
        canaries = CanarySpec(options.canaries, options.canary_repeats, options.canary_candidates, options.seed)
    if train is None:
        train = build_split(backend, options.task, "train", options.seed, recipe.max_seq_len, options.train_limit)
    dev = build_split(backend, options.task, "dev", options.seed, recipe.max_seq_len)
    if canaries is not None:
        from labscale.adapt.canary import insert

        train = insert(train, backend, canaries)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    steps = recipe.steps(len(train.examples), world)
    dp = None
    if options.dp is not None:
        from labscale.adapt.dp import plan_dp

        if options.log != "none":
            raise ConfigError(f"--log {options.log} is not available with --dp", "use --log none")
        dp = plan_dp(options.dp, recipe, len(train.examples), steps, world)

    identity = sha({
        "format": ADAPT_FORMAT, "prompt_format": PROMPT_FORMAT_VERSION, "base": backend.info.fingerprint,
        "quantization": quant, "task": options.task.name, "data": digest(train, dev),
        "recipe": recipe.training_fields(), "steps": steps, "seed": options.seed, "processes": world,
        **({"dp": dp.identity()} if dp is not None else {}),
        **({"canaries": canaries.identity()} if canaries is not None else {}),
    })[:16]
    out = Path(options.out) if options.out is not None else Path(options.adapters_dir) / identity
    state, checkpoint = _folder_state(out, identity)
    return Job(options, backend, hw, price, recipe, train, dev, steps, world, identity, out, state, checkpoint, dp,
               canaries, country)


# ---------------------------------------------------------------------------------------------------------- run


def run_job(job: Job, say: Say = _stderr, callbacks: tuple = (), keep_model: bool = False,
            clock: Clock = time.monotonic) -> FinetuneResult:
    """Train (or resume, or reuse) the adapter of a prepared job; returns its folder and card. `callbacks`: extra
    TrainerCallbacks (also called by the DP loop); `clock`: the session's clock (session.py)."""
    if job.state == "done":
        if is_main_process():
            say(f"adapter already trained with these settings: {job.out} (identity {job.identity}) — reusing it")
        return FinetuneResult(job.out, cards.read_card(job.out) or {}, True)
    session = FinetuneSession(job, say, clock)
    training: TrainingRun
    if job.dp is not None:
        from labscale.adapt.dp import DPRun

        training = DPRun(job, callbacks)
    else:
        from labscale.adapt.sft import SFTRun

        training = SFTRun(job, callbacks)
    return session.run(training, keep_model)


def finetune(options: FinetuneOptions, say: Say = _stderr, **kw) -> FinetuneResult:
    return run_job(prepare_job(options), say, **kw)
