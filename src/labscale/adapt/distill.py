"""Task distillation: a teacher answers a task's train inputs, and a student is fine-tuned on its answers.

An adaptation (adapt/adaptation.py) of `method: distill` with `task:` (instruction distillation is
instructions.py), also `labscale distill task`:

1. the teacher (any backend: `openai:`, `hf:`, `embedded:`, `adapter:`) answers the first `train_limit` inputs of
   the task's seeded train split with the task's own prompt (`teacher_setting`: zero-shot, few-shot:K or cot; the
   generative protocol — multiple choice by letter), greedy unless the experiment's decoding says otherwise. Every
   call goes through the generation cache (engine/cache.py), batch by batch, so a killed run resumes without
   repeating a call;
2. its answers are parsed as evaluation parses them (answers.py); an unparseable or empty answer is dropped and
   counted. The teacher's own score on the inputs it labelled (where the task has gold labels) is the ceiling a
   student can hope to reach by imitation, and is recorded with a bootstrap CI;
3. the labelled inputs become the student's training targets (a copy of the task whose train split holds the
   teacher's answers; dev and test keep their gold labels, so early stopping and scoring are on gold), and the
   student is fine-tuned with the usual machinery (finetune.py: recipes, LoRA / QLoRA, completion-only loss,
   dev-loss early stopping, budget guard, card). It is evaluated under the `distilled` setting with the zero-shot
   prompt it was trained on;
4. rationales (Hsieh et al. 2023, "Distilling Step-by-Step!"): with `rationales: true` the teacher answers with
   the cot prompt; its reasoning (the text before the final `Answer:` line) becomes a second training row per
   example, the *explain* prompt (the predict prompt plus "Explain the answer step by step.", data.py), beside the
   *predict* row (the label). The loss is α · L_predict + (1 − α) · L_explain as in the authors' code
   (`TaskPrefixTrainer`, α = 0.5), each a token mean: row weights α·T/T_predict and (1 − α)·T/T_explain (T: the
   completion tokens of the training rows, T_predict / T_explain those of each kind) make the step's token-mean
   loss that mixture in expectation. The student is evaluated on predict only.

Identity = hash(format, teacher fingerprint, teacher setting, decoding, the rendered teacher prompts, the train
inputs, answer-parser and prompt-format versions, student fingerprint and quantization, the resolved recipe, the
training options, rationales and α). The folder (`out`, default `runs/distilled/<identity>`) holds `data.jsonl`
(one row per labelled input: teacher output, the target kept or why it was dropped, the gold answer), its card
`dataset.json`, and the student adapter in `student/` (its `labscale.json` card gains a `distillation` section).
An identical re-run reuses the adapter; a run that stopped after labelling reuses the dataset without reading the
cache; one that stopped while labelling finds the finished calls in the cache.

Budget. `budget_usd` covers the teacher and the student together. Before any teacher call, the teacher's API cost
is estimated as every prompt's tokens × the input price + max_new_tokens × the output price (`estimate()`
refuses when that is over the budget); while labelling, the spending cap (efficiency/cost.py) admits each batch
only if its worst case still fits. The teacher's cost = its API cost (tokens reported × price) + for a local
teacher its compute time (the stored per-call compute seconds) × the hardware's price per hour; its energy and
CO2eq are measured by CodeCarbon while labelling (segments interrupted by kill -9 are not counted; Ctrl-C and
errors are). The student's training then gets what is left of the budget, enforced by the fine-tuning session.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from labscale.adapt import card as cards
from labscale.adapt.adaptation import AdaptContext, Adapted
from labscale.adapt.budget import BudgetExceeded
from labscale.adapt.data import DISTILLED, EXPLAIN_REQUEST, IGNORE, SplitData, TrainExample, encode_explain, has_target
from labscale.adapt.finetune import FinetuneOptions, TrainingPlan, plan_training, prepare_job, run_job
from labscale.adapt.session import read_json
from labscale.atomic import write_atomic
from labscale.config import Experiment, FinetuneSpec, ModelSpec
from labscale.efficiency.cost import CostLimitReached, SpendingCap, cost_usd
from labscale.engine.cache import Counts, GenerationCache
from labscale.errors import ConfigError, DataError, ModelError
from labscale.example import UNPARSEABLE, Example, Outcome
from labscale.hashing import sha
from labscale.models.base import DecodingParams, ModelBackend
from labscale.settings.setting import PROMPT_FORMAT_VERSION, Setting, chat_prompt, check_shots, parse_setting
from labscale.tasks.base import Task

__all__ = ["DISTILLED", "DEFAULT_DISTILL_DIR", "Teacher", "TaskDistillation", "resolve_teacher", "teacher_card"]

DISTILL_FORMAT = 1  # bump when what distillation does for the same inputs changes
DEFAULT_DISTILL_DIR = Path("runs") / "distilled"
DATA_FILE = "data.jsonl"
DATASET_CARD = "dataset.json"
TEACHER_LEDGER = "teacher-ledger-{identity}.json"  # the energy of the teacher's calls, segment by segment
STUDENT_DIR = "student"
PROGRESS_EVERY_S = 30.0

Say = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ the teacher


@dataclass
class Teacher:
    spec: ModelSpec
    backend: ModelBackend

    @property
    def label(self) -> str:
        return self.spec.label

    def describe(self) -> dict:
        info = self.backend.info
        price = None if info.price is None else {"input": info.price.input, "output": info.price.output,
                                                 "source": info.price.source}
        return {"id": self.spec.id, "name": info.name, "fingerprint": info.fingerprint, "backend": info.backend,
                "parameters": info.parameters, "is_remote": info.is_remote, "price_per_million": price}


def resolve_teacher(exp: Experiment | None, teacher: str, backends: Sequence[ModelBackend] = ()) -> Teacher:
    """The teacher: the experiment's model named `teacher` (by name or id; its backend reused from `backends`,
    the experiment's resolved models), else the model id `teacher` itself. A missing key is a one-line error."""
    from labscale.models.registry import missing_key, missing_key_error, resolve_model

    found = next((m for m in exp.models if teacher in (m.label, m.id)), None) if exp is not None else None
    base = exp.base_dir if exp is not None else Path(".")
    spec = (found or ModelSpec(id=teacher)).resolved(base)
    if found is not None:
        backend = next((b for b in backends if b.info.name == spec.label), None)
        if backend is not None:
            return Teacher(spec, backend)
    var = missing_key(spec)
    if var is not None:
        err = missing_key_error(spec, var)
        raise ModelError(f"distillation teacher: {err.message}", err.hint)
    from labscale.secrets import register_env

    register_env(spec.api_key_env)  # its key never reaches an error text, the database or a card
    return Teacher(spec, resolve_model(spec))


def check_teacher_price(teacher: Teacher) -> None:
    """The budget covers the teacher's API cost, so an API teacher needs a price (0 for a local server)."""
    info = teacher.backend.info
    if info.is_remote and info.price is None:
        raise ConfigError(f"no price is known for the distillation teacher '{info.name}', so its API cost cannot "
                          "be held to the budget", "add price: {input: <$ per 1M tokens>, output: <$ per 1M>} to "
                          "its model entry (0 for a local server)")


# ----------------------------------------------------------------------------------- labelling through the cache


@dataclass
class Labelled:
    """What the teacher calls gave: the text of every prompt (None: failed), the stored rows, the call counts."""

    texts: list[str | None]
    rows: list  # the generations rows of the answered prompts
    counts: Counts
    failures: dict[str, str]
    kwh: float | None
    kg: float | None
    wall_s: float


def ask_teacher(ctx: AdaptContext, teacher: Teacher, prompts: list[tuple[str, int]], decoding: DecodingParams,
                cap: SpendingCap, country: str, ledger_path: Path | None, what: str) -> Labelled:
    """Every prompt through the experiment's generation cache under the spending cap `cap` (API cost; one cap per
    distillation, shared by all its calls), with CodeCarbon measuring a local teacher's energy into the ledger at
    `ledger_path` (its totals, every segment so far, are returned); progress through `ctx.say`."""
    from labscale.adapt.carbon import CarbonMeter
    from labscale.adapt.ledger import Ledger

    counts = Counts()
    cache = GenerationCache(ctx.store, counts, cap)
    total, done, last = len(prompts), [0], [time.monotonic()]
    started = time.monotonic()

    def advance(n: int) -> None:
        done[0] += n
        now = time.monotonic()
        if done[0] < total and now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            ctx.say(f"  teacher {what}: {done[0]}/{total} calls")

    local = not teacher.backend.info.is_remote
    meter = CarbonMeter(country, enabled=local)
    ledger = Ledger(ledger_path) if ledger_path is not None and local else None
    meter.start()
    try:
        calls = cache.generate(teacher.backend, prompts, decoding, teacher.spec.batch_size, advance)
    except CostLimitReached:
        raise BudgetExceeded(f"the teacher's API cost reached the adaptation budget ${cap.limit:g} while "
                             f"{what} ({counts.new} new calls stored, ${cap.spent:.4f} spent)",
                             "raise budget_usd (--budget) or lower train_limit / count; finished calls are stored "
                             "and not repeated") from None
    finally:
        kwh, kg = meter.stop()
        if ledger is not None:
            ledger.kwh, ledger.kg = kwh, kg
            ledger.save()
    texts = [calls.text(i) for i in range(len(prompts))]
    rows = [calls.rows[k] for k in dict.fromkeys(calls.keys) if k in calls.rows]
    return Labelled(texts, rows, counts, calls.failures, ledger.total_kwh() if ledger else None,
                    ledger.total_kg() if ledger else None, time.monotonic() - started)


def teacher_cost(teacher: Teacher, rows: list, usd_per_hour: float) -> dict:
    """The teacher's tokens and $ for the stored calls behind a dataset: API cost (tokens × price) and, for a local
    teacher, its compute (per-call compute seconds) at the hardware's price per hour."""
    info = teacher.backend.info
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    new_tokens = sum(r["new_tokens"] for r in rows)
    api = cost_usd(info.price, prompt_tokens, new_tokens) or 0.0
    compute_s = sum(r["compute_s"] for r in rows)
    compute_usd = 0.0 if info.is_remote else compute_s / 3600 * usd_per_hour
    return {"calls": len(rows), "prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
            "usage_estimated": sum(r["usage_estimated"] for r in rows), "api_usd": api, "compute_s": compute_s,
            "compute_usd": compute_usd, "usd": api + compute_usd,
            "usd_per_hour": None if info.is_remote else usd_per_hour}


def estimate_api_usd(teacher: Teacher, prompts: list[tuple[str, int]], max_new_tokens: int) -> float | None:
    """Worst-case API cost of `prompts` (each prompt's tokens and the whole max_new_tokens); None without a price."""
    price = teacher.backend.info.price
    if price is None:
        return None
    return sum(cost_usd(price, tokens, max_new_tokens) or 0.0 for _, tokens in prompts)


def check_estimate(label: str, usd: float | None, budget_usd: float, calls: int) -> None:
    if usd is not None and usd > budget_usd:
        raise BudgetExceeded(f"distillation of {label}: the teacher's estimated API cost ${usd:.4f} for {calls} "
                             f"calls exceeds the budget ${budget_usd:g}",
                             "raise budget_usd (--budget), lower train_limit / count or max_new_tokens, or pick a "
                             "cheaper teacher")


def teacher_card(teacher: Teacher, cost: dict, labelled: Labelled | None, previous: dict | None) -> dict:
    """The teacher's accounting for a card: cost (from the stored calls), energy (measured while labelling)."""
    if labelled is None and previous is not None:
        return previous
    assert labelled is not None
    return {**teacher.describe(), **cost, "energy_kwh": labelled.kwh, "co2eq_kg": labelled.kg,
            "calls_new": labelled.counts.new, "calls_cached": labelled.counts.cached,
            "labelling_wall_s": labelled.wall_s,
            "energy_note": "CodeCarbon while labelling (this machine)" if labelled.kwh is not None else
            "not measured: an API teacher runs on the provider's machines"}


# ------------------------------------------------------------------------------------------------ the student


def relabelled(task: Task, train: list[Example]) -> Task:
    """A copy of `task` whose train split is `train` (the teacher's answers as targets); dev and test unchanged."""
    copy = replace(task)
    copy.__dict__["splits"] = {**task.splits, "train": train}  # the cached_property, set before first use
    return copy


def ledger_name(identity: str) -> str:
    return TEACHER_LEDGER.format(identity=identity)


def check_folder(folder: Path, identity: str, card_file: str) -> None:
    """A distillation folder must be new, empty, or hold this identity's work (its dataset card, or only its
    teacher ledger: labelling was interrupted)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"'{folder}' is a file", "pass a folder with --out / out:")
    if not folder.is_dir() or {p.name for p in folder.iterdir()} <= {ledger_name(identity)}:
        return
    card = read_json(folder / card_file)
    if card is None or card.get("identity") != identity:
        found = card.get("identity") if card else None
        what = f"identity {found}" if found else "not a labscale distillation"
        raise ConfigError(f"'{folder}' already holds other work ({what}; this distillation is {identity})",
                          "pass another out / --out, or delete that folder to distil again")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def finished_student(folder: Path, identity: str) -> dict | None:
    """The card of a finished student adapter of this distillation identity, or None."""
    student = folder / STUDENT_DIR
    card = cards.read_card(student)
    if card is not None and cards.is_finished(student) and (card.get("distillation") or {}).get("identity") == \
            identity:
        return card
    return None


def student_options(spec: FinetuneSpec, student: ModelSpec, task: Task, out: Path, seed: int,
                    budget_usd: float | None = None) -> FinetuneOptions:
    values = spec.finetune_fields()
    values["seed"] = seed
    if budget_usd is not None:
        values["budget_usd"] = budget_usd
    return FinetuneOptions(**values, model=student, task=task, out=out)


def identity_fields(spec: FinetuneSpec, plan: TrainingPlan, student: ModelSpec) -> dict:
    """What of the training determines the student (not the budget, caps, tracking or prices)."""
    skip = {"budget_usd", "co2_cap_kg", "log", "country", "hardware", "price_per_hour", "recipe", "overrides",
            "max_steps", "quantization"}
    return {"student": plan.backend.info.fingerprint, "quantization": student.quantization if spec.quantization is
            None else spec.quantization, "recipe": plan.recipe.training_fields(),
            "training": {k: v for k, v in spec.model_dump(mode="json").items() if k in FinetuneSpec.model_fields
                         and k not in skip}}


def run_student(ctx: AdaptContext, options: FinetuneOptions, train: SplitData | None, distillation: dict,
                label: str, spec: ModelSpec) -> tuple[ModelSpec, ModelBackend, dict, bool]:
    """Train (or reuse) the student, add the distillation section to its card; (run spec, backend, card, reused)."""
    from labscale.models.adapter import AdapterBackend

    job = prepare_job(options, world_size=1, train=train)
    result = run_job(job, ctx.say)
    card = dict(result.card)
    accounting = card.get("accounting", {})
    student = {"usd": accounting.get("cost_usd"), "energy_kwh": accounting.get("energy_kwh"),
               "co2eq_kg": accounting.get("co2eq_kg"), "budget_usd": options.budget_usd}
    teacher = distillation["accounting"]["teacher"]
    distillation["accounting"]["student"] = student
    distillation["accounting"]["total_usd"] = (teacher.get("usd") or 0.0) + (student["usd"] or 0.0)
    card["distillation"] = distillation
    card["summary"] = {**card.get("summary", cards.summary(card)), "distill": distill_summary(distillation)}
    cards.write_card(job.out, card)
    run_spec = spec.model_copy(update={"id": f"adapter:{job.out.resolve()}", "name": label})
    return run_spec, AdapterBackend(run_spec, str(job.out)), card, result.reused


def distill_summary(d: dict) -> dict:
    """The figures the report shows for a distillation (card summary's `distill`)."""
    t, s = d["accounting"]["teacher"], d["accounting"].get("student", {})
    data, score = d.get("data", {}), d.get("teacher_score") or {}
    return {"mode": d["mode"], "teacher": t.get("name"), "teacher_fingerprint": t.get("fingerprint"),
            "labelled": data.get("inputs"), "kept": data.get("kept"), "dropped": data.get("dropped_total"),
            "dropped_share": data.get("dropped_share"), "teacher_metric": score.get("metric"),
            "teacher_score": score.get("value"), "teacher_ci_low": score.get("ci_low"),
            "teacher_ci_high": score.get("ci_high"), "teacher_scored_n": score.get("n"),
            "teacher_usd": t.get("usd"), "teacher_api_usd": t.get("api_usd"), "teacher_kwh": t.get("energy_kwh"),
            "teacher_co2eq_kg": t.get("co2eq_kg"), "student_usd": s.get("usd"), "student_kwh": s.get("energy_kwh"),
            "student_co2eq_kg": s.get("co2eq_kg"), "total_usd": d["accounting"].get("total_usd"),
            "rationales": bool(d.get("rationales")), "identity": d.get("identity")}


# ----------------------------------------------------------------------------------------- task distillation


def teacher_score(task: Task, examples: list[Example], texts: list[str], predictions: list[str], seed: int,
                  n_boot: int = 1000) -> dict | None:
    """The teacher's score on the inputs it labelled that have gold answers (the main metric; accuracy for
    multiple choice answered by letter), with a percentile-bootstrap CI; None when none has gold."""
    from labscale.metrics.registry import get_metric
    from labscale.metrics.stats import bootstrap_ci

    scored = [Outcome(ex, text, pred) for ex, text, pred in zip(examples, texts, predictions) if has_target(task, ex)]
    if not scored:
        return None
    name = "acc" if task.type == "multiple_choice" and "acc" in task.metrics else task.main_metric
    metric = get_metric(name)
    stats = metric.stats(scored)
    value = metric.aggregate(stats)
    low, high = bootstrap_ci(stats, metric.aggregate, n_boot=n_boot, seed=seed)
    finite = lambda x: None if x is None or math.isnan(x) else float(x)  # noqa: E731
    return {"metric": name, "value": finite(value), "ci_low": finite(low), "ci_high": finite(high),
            "n": len(scored), "of": len(examples)}


def rationale_of(text: str) -> str:
    """The reasoning of a cot answer: the text before its last `Answer:` line (the whole text without one)."""
    import re

    marks = list(re.finditer(r"answer\s*:", text, re.IGNORECASE))
    return (text[: marks[-1].start()] if marks else text).strip()


class DistilledStudent:
    """What task and instruction distillation share: a folder `out` holding the teacher's dataset (identified by
    `data_identity`) and, once trained, the student (`_card`, its card when finished)."""

    out: Path
    data_identity: str
    _card: dict | None

    @property
    def reused(self) -> bool:
        return self._card is not None

    def dataset_ready(self) -> bool:
        card = read_json(self.out / DATASET_CARD)
        return card is not None and card.get("identity") == self.data_identity and (self.out / DATA_FILE).is_file()


class TaskDistillation(DistilledStudent):
    """The teacher labels a task's train inputs; the student learns its answers (see the module docstring)."""

    kind = "distill"

    def __init__(self, label: str, spec: FinetuneSpec, teacher: Teacher, student: ModelSpec, task: Task,
                 setting: Setting, decoding: DecodingParams, seed: int, out: Path | None = None,
                 rationales: bool = False, alpha: float = 0.5, n_boot: int = 1000):
        self.label, self.spec, self.teacher, self.student, self.task = label, spec, teacher, student, task
        self.setting, self.decoding, self.seed = setting, decoding, seed
        self.rationales, self.alpha, self.n_boot = rationales, alpha, n_boot
        check_teacher_price(teacher)
        check_shots(task, setting)  # multiple choice: the teacher answers by letter (generation, via the cache)
        try:
            self.train = task.split("train", spec.train_limit)
        except DataError:
            raise DataError(f"task '{task.name}' has no train inputs for the teacher to label",
                            "give the task a train split (a train file, or train rows in its split column)") \
                from None
        self.plan = plan_training(student_options(spec, student, task, Path("."), seed))
        self.prompts = self._prompts()
        self.data_identity = sha({
            "format": DISTILL_FORMAT, "mode": "task", "teacher": teacher.backend.info.fingerprint,
            "task": task.name, "setting": setting.name, "decoding": decoding.key(),
            "prompts": sha([p for p, _ in self.prompts]), "prompt_format": PROMPT_FORMAT_VERSION,
            "inputs": sha([(ex.id, ex.input, list(ex.choices)) for ex in self.train]), "parser": _parser_version(),
            "rationales": rationales,
        })[:16]
        self.identity = sha({"data": self.data_identity, **identity_fields(spec, self.plan, student),
                             "seed": seed, **({"alpha": alpha} if rationales else {})})[:16]
        self.out = Path(out) if out is not None else DEFAULT_DISTILL_DIR / self.identity
        check_folder(self.out, self.data_identity, DATASET_CARD)
        self._card = finished_student(self.out, self.identity)
        self.estimated_usd = estimate_api_usd(teacher, self.prompts, decoding.max_new_tokens)

    def _prompts(self) -> list[tuple[str, int]]:
        from labscale.settings.truncate import cut_input

        backend, task = self.teacher.backend, self.task

        def fit(ex: Example) -> Example:
            if task.max_input_tokens is None:
                return ex
            cut = cut_input(backend, ex.input, task.max_input_tokens, task.truncate)
            return ex if cut is None else replace(ex, input=cut)

        out, misfits = [], []
        info = backend.info
        for ex in self.train:
            prompt = backend.render(chat_prompt(task, self.setting, ex, self.seed, fit))
            tokens = backend.count_tokens(prompt)
            if info.context_known and tokens + self.decoding.max_new_tokens > info.context_length:
                misfits.append(ex.id)
            out.append((prompt, tokens))
        if misfits:
            raise ModelError(f"{len(misfits)} of {len(self.train)} train inputs of task '{task.name}' do not fit the "
                             f"teacher '{info.name}' ({info.context_length} tokens with max_new_tokens="
                             f"{self.decoding.max_new_tokens}), e.g. '{misfits[0]}'",
                             "set max_input_tokens on the task, or lower max_new_tokens")
        return out

    def estimate(self) -> str:
        head = f"distill {self.label} on {self.task.name} from teacher {self.teacher.label}"
        if self.reused:
            return f"{head}: identical distilled student exists ({self.out / STUDENT_DIR}), reusing it"
        if self.dataset_ready():
            teacher = f"teacher's dataset exists ({self.out / DATA_FILE}), no teacher calls"
        else:
            check_estimate(self.label, self.estimated_usd, self.spec.budget_usd, len(self.prompts))
            cost = "no API cost (local)" if self.estimated_usd is None else \
                f"API cost at most ${self.estimated_usd:.4f}"
            teacher = (f"teacher labels {len(self.prompts)} train inputs ({self.setting.name}"
                       f"{', with rationales' if self.rationales else ''}; {cost})")
        return (f"{head}: {teacher}, then the student trains with recipe {self.plan.recipe.name} "
                f"(budget ${self.spec.budget_usd:g} for teacher and student together)")

    # ------------------------------------------------------------------------------------------------- run

    def run(self, ctx: AdaptContext) -> Adapted:
        from labscale.models.adapter import AdapterBackend

        if self._card is not None:
            ctx.say(f"distilled student already trained with these settings: {self.out / STUDENT_DIR} "
                    f"(identity {self.identity}) — reusing it")
            spec = self.student.model_copy(update={"id": f"adapter:{(self.out / STUDENT_DIR).resolve()}",
                                                   "name": self.label})
            return Adapted(spec, AdapterBackend(spec, str(self.out / STUDENT_DIR)), self.task, DISTILLED,
                           self._card, True)
        dataset = self.label_train(ctx)
        kept = [ex for ex, row in zip(self.train, dataset["rows"]) if row["dropped"] is None]
        if not kept:
            raise DataError(f"the teacher's answers to all {len(self.train)} train inputs of '{self.task.name}' "
                            "were unparseable or empty: nothing to train on", f"see {self.out / DATA_FILE}")
        targets = {row["id"]: row for row in dataset["rows"] if row["dropped"] is None}
        train = [self._with_target(ex, targets[ex.id]) for ex in kept]
        task = relabelled(self.task, train)
        teacher_usd = dataset["card"]["accounting"]["teacher"]["usd"]
        remaining = self.spec.budget_usd - teacher_usd
        if remaining <= 0:
            raise BudgetExceeded(f"the teacher cost ${teacher_usd:.4f} of the ${self.spec.budget_usd:g} budget: "
                                 "nothing is left to train the student", "raise budget_usd (--budget)")
        options = student_options(self.spec.model_copy(update={"train_limit": None}), self.student, task,
                                  self.out / STUDENT_DIR, self.seed, remaining)
        rows = self._rationale_rows(task, targets) if self.rationales else None
        distillation = {**dataset["card"], "identity": self.identity, "data_identity": self.data_identity,
                        "setting": DISTILLED.name, "folder": str(self.out)}
        if rows is not None:
            distillation["rationales"] = rows[1]
        run_spec, backend, card, reused = run_student(ctx, options, rows[0] if rows else None, distillation,
                                                      self.label, self.student)
        return Adapted(run_spec, backend, self.task, DISTILLED, card, reused)

    def _with_target(self, ex: Example, row: dict) -> Example:
        if self.task.type == "multiple_choice":
            return replace(ex, target=ex.choices[row["target_index"]], gold=row["target_index"])
        return replace(ex, target=row["target"])

    def label_train(self, ctx: AdaptContext) -> dict:
        """The teacher's dataset: read back when this identity's dataset exists, else labelled through the cache
        and written (`data.jsonl`, `dataset.json`)."""
        if self.dataset_ready():
            card = read_json(self.out / DATASET_CARD)
            rows = [json.loads(line) for line in (self.out / DATA_FILE).read_text().splitlines() if line.strip()]
            ctx.say(f"teacher's dataset exists: {self.out / DATA_FILE} — no teacher calls")
            return {"card": card, "rows": rows}
        ctx.say(f"teacher {self.teacher.label} labels {len(self.prompts)} train inputs of {self.task.name} "
                f"({self.setting.name}, max_new_tokens={self.decoding.max_new_tokens}) → {self.out}")
        self.out.mkdir(parents=True, exist_ok=True)
        labelled = ask_teacher(ctx, self.teacher, self.prompts, self.decoding, SpendingCap(self.spec.budget_usd),
                               self.plan.country, self.out / ledger_name(self.data_identity), "labelling")
        if labelled.failures:
            reason = next(iter(labelled.failures.values()))
            raise ModelError(f"{len(labelled.failures)} of {len(self.prompts)} teacher calls failed after retries "
                             f"(first: {reason})", "run the same command again: finished calls are stored and only "
                             "the failed ones are retried")
        if not self.teacher.backend.info.is_remote:
            self.teacher.backend.close()  # free its weights before the student loads (evaluation reloads them)
        from labscale.answers import parse_answer

        cot = self.setting.kind == "cot"
        texts = [t or "" for t in labelled.texts]
        predictions = [parse_answer(self.task, ex, text, cot=cot) for ex, text in zip(self.train, texts)]
        rows, dropped = [], {"unparseable": 0, "empty": 0}
        for ex, text, pred in zip(self.train, texts, predictions):
            reason = None
            if not text.strip():
                reason = "empty"
            elif pred == UNPARSEABLE or not pred.strip():
                reason = "unparseable"
            if reason:
                dropped[reason] += 1
            gold = has_target(self.task, ex)
            row: dict[str, Any] = {"id": ex.id, "input": ex.input, "teacher_output": text, "dropped": reason,
                   "target": None if reason else pred,
                   "gold": (ex.target if gold else None)}
            if self.task.type == "multiple_choice":
                row["target_index"] = None if reason else ex.choices.index(pred)
                row["gold_index"] = ex.gold if gold else None
            if gold and not reason:
                row["teacher_correct"] = (row["target_index"] == ex.gold) if self.task.type == "multiple_choice" \
                    else pred == ex.target if self.task.type == "classify" else None
            if self.rationales:
                row["rationale"] = rationale_of(text) if not reason else None
            rows.append(row)
        score = teacher_score(self.task, self.train, texts, predictions, self.seed, self.n_boot)
        cost = teacher_cost(self.teacher, labelled.rows, self.plan.usd_per_hour)
        total_dropped = sum(dropped.values())
        card = {
            "labscale_distill_dataset": 1, "identity": self.data_identity, "mode": "task",
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "task": {"name": self.task.name, "type": self.task.type, "split": "train",
                     "train_limit": self.spec.train_limit},
            "teacher_setting": self.setting.name, "decoding": self.decoding.key(),
            "data": {"inputs": len(self.train), "kept": len(self.train) - total_dropped, "dropped": dropped,
                     "dropped_total": total_dropped, "dropped_share": total_dropped / len(self.train),
                     "file": DATA_FILE},
            "teacher_score": score,
            "accounting": {"teacher": teacher_card(self.teacher, cost, labelled, None),
                           "budget_usd": self.spec.budget_usd},
        }
        write_jsonl(self.out / DATA_FILE, rows)
        write_atomic(self.out / DATASET_CARD, json.dumps(card, indent=2, default=str) + "\n")
        s = f"{score['metric']} {score['value']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}] on the " \
            f"{score['n']} with gold" if score and score["value"] is not None else "no gold answers to score"
        ctx.say(f"teacher calls: {labelled.counts.new} new, {labelled.counts.cached} cached · "
                f"{len(self.train) - total_dropped} kept, {total_dropped} dropped ({dropped['unparseable']} "
                f"unparseable, {dropped['empty']} empty) · teacher {s} · ${cost['usd']:.4f} "
                f"(API ${cost['api_usd']:.4f})")
        return {"card": card, "rows": rows}

    def _rationale_rows(self, task: Task, targets: dict) -> tuple[SplitData, dict]:
        """Predict and explain rows of the student (data.py), weighted so the loss is α·predict + (1−α)·explain."""
        from labscale.adapt.data import build_split

        backend = self.plan.backend
        predict = build_split(backend, task, "train", self.seed, self.plan.recipe.max_seq_len)
        explain: list[TrainExample] = []
        skipped = []
        by_id = {ex.id: ex for ex in task.split("train")}
        for ex_id, row in targets.items():
            if not row.get("rationale"):
                continue
            prompt, completion = encode_explain(backend, task, by_id[ex_id], self.seed, row["rationale"])
            if len(prompt) + len(completion) > self.plan.recipe.max_seq_len:
                skipped.append(ex_id)
                continue
            explain.append(TrainExample(f"{ex_id}:explain", prompt + completion, [IGNORE] * len(prompt) + completion))
        t_pred = sum(e.completion_tokens for e in predict.examples)
        t_expl = sum(e.completion_tokens for e in explain)
        total = t_pred + t_expl
        w_pred = self.alpha * total / t_pred if explain else 1.0
        w_expl = (1 - self.alpha) * total / t_expl if explain else 0.0
        rows = [replace(e, weight=w_pred) for e in predict.examples] + [replace(e, weight=w_expl) for e in explain]
        rows.sort(key=lambda e: e.id)
        info = {"alpha": self.alpha, "predict_rows": len(predict.examples), "explain_rows": len(explain),
                "explain_skipped_too_long": len(skipped), "predict_completion_tokens": t_pred,
                "explain_completion_tokens": t_expl, "weights": {"predict": w_pred, "explain": w_expl},
                "explain_prompt": f"the predict prompt + {EXPLAIN_REQUEST!r}",
                "loss": "α·L_predict + (1−α)·L_explain (Hsieh et al. 2023, TaskPrefixTrainer)"}
        return SplitData("train", rows, predict.skipped), info


def _parser_version() -> int:
    from labscale.answers import ANSWER_PARSER_VERSION

    return ANSWER_PARSER_VERSION


# ------------------------------------------------------------------------------------- from the experiment file


def decoding_of(exp: Experiment, setting: Setting) -> DecodingParams:
    g = exp.generation
    budget = g.cot_max_new_tokens if setting.kind == "cot" else g.max_new_tokens
    return DecodingParams(max_new_tokens=budget, temperature=g.temperature, top_p=g.top_p, stop=tuple(g.stop),
                          seed=exp.seed)


def student_spec(exp: Experiment | None, student: str, quantization: str | None) -> ModelSpec:
    from labscale.adapt.experiment import base_model_spec

    return base_model_spec(exp, student, quantization)


def distill_adaptations(exp: Experiment, tasks: list[Task], backends: Sequence[ModelBackend] = ()) -> list:
    """One validated adaptation per `method: distill` entry of the experiment (per evaluated task for instruction
    distillation: the same student, trained once); tokenizers and configs only, no weights, no teacher calls."""
    from labscale.config import DistillSpec

    by_name = {t.name: t for t in tasks}
    out: list = []
    for a in exp.adaptations:
        if not isinstance(a, DistillSpec):
            continue
        teacher = resolve_teacher(exp, a.teacher, backends)
        student = student_spec(exp, a.student, a.quantization)
        seed = exp.seed if a.seed is None else a.seed
        folder = None if a.out is None else (exp.base_dir / a.out).resolve()
        label = a.name or student.label
        if a.task is not None:
            setting = parse_setting(a.prompt_setting)
            out.append(TaskDistillation(label, a, teacher, student, by_name[a.task], setting,
                                        decoding_of(exp, setting), seed, folder, a.rationales, a.alpha,
                                        exp.bootstrap_samples))
        else:
            from labscale.adapt.instructions import InstructionDistillation

            assert a.instructions is not None  # DistillSpec: exactly one of task / instructions
            core = InstructionDistillation(label, a, a.instructions, teacher, student, seed, folder, exp.base_dir)
            out += core.evaluated_on(tasks)
    return out


# ------------------------------------------------------------------------------------ outside an experiment (CLI)

DEFAULT_DB = Path("runs") / "distill.db"


def run_distillation(spec, exp: Experiment | None = None, db: Path | None = None, say: Say = print,
                     max_new_tokens: int | None = None, data_only: bool = False):
    """One distillation (a config.DistillSpec) outside an experiment: `labscale distill task|instructions`.
    Teacher, student and task are looked up in `exp` (an Experiment, optional) like an experiment's adaptation
    would be; teacher calls go through the generation cache of database `db` (default runs/distill.db). Returns
    the Adapted student, or — with `data_only` (instructions) — the dataset. Refusals (bad input, budget) come
    before the database is opened; a new database that received no call is removed again."""
    from labscale.engine.store import check_db_path, open_store
    from labscale.tasks.registry import get_task

    db = Path(db) if db is not None else DEFAULT_DB
    check_db_path(db)
    teacher = resolve_teacher(exp, spec.teacher)
    student = student_spec(exp, spec.student, spec.quantization)
    check_student_local(student)
    seed = (exp.seed if exp is not None else 0) if spec.seed is None else spec.seed
    base = exp.base_dir if exp is not None else Path(".")
    folder = None if spec.out is None else (base / spec.out).resolve()
    label = spec.name or student.label
    adaptation: Any
    if spec.task is not None:
        entry = next((t for t in (exp.task_entries() if exp else []) if (t if isinstance(t, str) else t.name)
                      == spec.task), spec.task)
        task = get_task(entry, base, exp.tasks if exp else [], exp.task_options(spec.task) if exp else None)
        setting = parse_setting(spec.prompt_setting)
        decoding = decoding_of(exp, setting) if exp is not None else DecodingParams(
            max_new_tokens=256 if setting.kind == "cot" else 64, seed=seed)
        if max_new_tokens is not None:
            decoding = replace(decoding, max_new_tokens=max_new_tokens)
        adaptation = TaskDistillation(label, spec, teacher, student, task, setting, decoding, seed, folder,
                                      spec.rationales, spec.alpha, exp.bootstrap_samples if exp else 1000)
    else:
        from labscale.adapt.instructions import InstructionDistillation

        assert spec.instructions is not None
        adaptation = InstructionDistillation(label, spec, spec.instructions, teacher, student, seed, folder, base)
    say(adaptation.estimate())
    created = not db.exists()
    store = open_store(db)
    try:
        ctx = AdaptContext(store, say)
        if data_only:
            data = adaptation.label_train(ctx) if isinstance(adaptation, TaskDistillation) else \
                adaptation.dataset(ctx)
            return {**data, "folder": str(adaptation.out)}
        if isinstance(adaptation, TaskDistillation):
            return adaptation.run(ctx)
        spec_, backend, card, reused = adaptation.train(ctx)
        return Adapted(spec_, backend, None, DISTILLED, card, reused)  # type: ignore[arg-type]
    except BaseException:
        if created and not store.counts()["generations"]:
            store.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        raise
    finally:
        store.close()


def check_student_local(spec: ModelSpec) -> None:
    if spec.id.partition(":")[0] not in ("embedded", "hf"):
        raise ConfigError(f"cannot train '{spec.id}' as the student", "the student must be a local model: "
                          "embedded:<name> or hf:<hub id or local path>")
