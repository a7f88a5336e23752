"""Prompt compilation as an adaptation of an experiment (see adapt/adaptation.py): the `optimized` settings.

`compile_adaptations(exp, tasks, models, backends)` builds one `CompileAdaptation` per model × task × optimized
setting while the experiment validates (before the database opens): it checks the task's splits (dev for
selection; train for demonstrations), resolves the teacher and the proposer (experiment models by name or id, or
embedded:/hf:/openai: ids) and checks that the proposer can write an instruction (its context holds the meta-prompt
and its output budget). Its `run` compiles the prompt (adapt/compile.py) with every call through the experiment's
generation cache, or reuses an identical compiled prompt, and hands the planner the same model under the setting
as written (e.g. `optimized:fewshot`) with the compiled instruction and demonstrations: the test split is then
evaluated exactly like every other setting.

Identity: a hash of the algorithm version, the mode and trial budget, the options (all but `country`, which only
prices carbon), the fingerprints of the student, teacher and proposer, the task (name, type, instruction, fixed
demos, labels, main metric, input limit), the train pool and dev examples (ids, inputs, targets), the longest
inputs the fit check uses, the decoding parameters, the prompt-format and answer-parser versions and the seed.
The compiled prompt is stored with its provenance and cost in `runs/compiled/<identity>.json` (beside fine-tuned
adapters in runs/adapters/); an identical re-run reads it and makes no call. The same record is kept with every
evaluated run (`task_info["compiled"]`), so the report and `labscale export-prompt` need only the database.

Cost: every call the compilation used (from the cache's stored rows, so a resumed or reused compilation reports
the same numbers): calls, prompt and new tokens, model compute seconds; $ = API tokens × price for priced models,
local compute hours × the hardware's price per hour (adapt/budget.py) for local ones; wall time, and energy and
CO2eq measured by CodeCarbon (offline) over the invocation that compiled (an earlier, killed attempt is not
counted; a reused prompt has none). The budget (`optimize.budget_usd`) is checked before anything runs for priced
models (worst case: every call at the longest prompt and the whole output budget) and after every batch: past it,
the search stops and keeps the best prompt scored so far.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from labscale.adapt.adaptation import AdaptContext, Adapted
from labscale.adapt.compile import ALGORITHM_VERSION, DEFAULT_TRIALS, LONGEST, Compiler, Program, Role
from labscale.answers import ANSWER_PARSER_VERSION
from labscale.config import Experiment, ModelSpec, OptimizeSpec
from labscale.errors import ConfigError, DataError, LabscaleError, ModelError, did_you_mean
from labscale.example import Demo, Example
from labscale.hashing import sha
from labscale.models.base import DecodingParams, ModelBackend
from labscale.settings.setting import PROMPT_FORMAT_VERSION, Setting, parse_setting
from labscale.tasks.base import Task

__all__ = ["COMPILED_DIR", "CompileAdaptation", "compile_adaptations", "program_of"]

COMPILED_DIR = Path("runs") / "compiled"
ALGORITHMS = {"fewshot": "BootstrapFewShotWithRandomSearch (DSPy) on dev",
              "instruction": "OPRO/COPRO-style instruction search on dev",
              "full": "MIPRO-lite: instructions × demo sets, successive halving on dev minibatches"}


class BudgetExceeded(LabscaleError):
    """The worst case of a compilation's priced calls is over its budget."""


def _decoding(exp: Experiment) -> DecodingParams:
    g = exp.generation  # the evaluation's own (non-cot) decoding: dev scores are measured as the test run will be
    return DecodingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                          stop=tuple(g.stop), seed=exp.seed)


def _fit(task: Task, backend: ModelBackend):
    """Inputs cut to the task's max_input_tokens for this model, exactly as the evaluation cuts them."""
    from dataclasses import replace

    from labscale.settings.truncate import cut_input

    if task.max_input_tokens is None:
        return lambda ex: ex

    def fit(ex: Example) -> Example:
        cut = cut_input(backend, ex.input, task.max_input_tokens, task.truncate)
        return ex if cut is None else replace(ex, input=cut)

    return fit


def _examples_sha(examples: list[Example]) -> str:
    return sha([(e.id, e.input, e.target, list(e.choices)) for e in examples])


def _pick_model(exp: Experiment, name: str | None, role: str, student: tuple[ModelSpec, ModelBackend],
                evaluated: list[tuple[ModelSpec, ModelBackend]],
                extra: dict[str, tuple[ModelSpec, ModelBackend]]) -> tuple[ModelSpec, ModelBackend]:
    """The teacher / proposer: the student (None), an evaluated model by name or id, or a bare model id (one
    backend per id, shared by every compilation: `extra`)."""
    from labscale.models.registry import missing_key, resolve_model

    if name is None:
        return student
    for spec, backend in evaluated:
        if name in (spec.label, spec.id):
            return spec, backend
    listed = next((m for m in exp.models if name in (m.label, m.id)), None)
    if listed is not None:  # an optional API model left out for lack of a key
        var = missing_key(listed)
        raise ModelError(f"optimize.{role} '{name}' cannot generate: its API key ${var} is not set",
                         f"export {var}=…, or name another {role} (default: the model being compiled)")
    if name.partition(":")[0] not in ("embedded", "hf", "openai"):
        raise ConfigError(f"optimize.{role} '{name}' is neither a model of this experiment nor a model id",
                          f"{did_you_mean(name, [m.label for m in exp.models])}name a model of the experiment, or "
                          "an embedded:/hf:/openai: id")
    if name not in extra:
        spec = ModelSpec(id=name).resolved(exp.base_dir)
        var = missing_key(spec)
        if var:
            raise ModelError(f"optimize.{role} '{name}' cannot generate: its API key ${var} is not set",
                             f"export {var}=…, or name another {role}")
        extra[name] = (spec, resolve_model(spec))
    return extra[name]


def _usd_per_hour(o: OptimizeSpec) -> float:
    from labscale.adapt.budget import hardware_class

    return o.price_per_hour if o.price_per_hour is not None else hardware_class(o.hardware).usd_per_hour


def _longest(task: Task) -> list[Example]:
    """The task's longest inputs over every split (by characters, options included): what the fit check renders."""
    return sorted(task.examples, key=lambda e: -(len(e.input) + sum(len(c) + 4 for c in e.choices)))[:LONGEST]


def _demo_record(d: Demo) -> dict:
    return {"id": d.example.id, "kind": d.kind, "input": d.example.input, "output": d.answer,
            **({"choices": list(d.example.choices)} if d.example.choices else {})}


def program_of(card: dict, task: Task) -> Program:
    """The compiled program a stored card describes, its demonstrations rebuilt from the task's train split (or
    its fixed demos); DataError when the task no longer holds them as compiled."""
    train = {e.id: e for e in task.splits["train"]}
    fixed = {d.example.id: d for d in task.demos}
    demos = []
    for d in card["demos"]:
        if d["kind"] == "fixed" and d["id"] in fixed:
            demos.append(fixed[d["id"]])
            continue
        ex = train.get(d["id"])
        if ex is None or ex.input != d["input"]:
            raise DataError(f"compiled prompt {card['identity']}: demo '{d['id']}' is not in task "
                            f"'{task.name}''s train split as compiled", "delete the compiled file to recompile")
        demos.append(Demo(ex, d["output"], d["kind"]))
    return Program(card["instruction"], tuple(demos), card.get("origin", ""))


class CompileAdaptation:
    """Compiles one (model, task) prompt for one optimized setting."""

    kind = "compile"

    def __init__(self, exp: Experiment, spec: ModelSpec, backend: ModelBackend, task: Task, setting: Setting,
                 teacher: tuple[ModelSpec, ModelBackend], proposer: tuple[ModelSpec, ModelBackend]):
        self.exp, self.spec, self.backend, self.task, self.setting = exp, spec, backend, task, setting
        self.label = spec.label
        self.teacher, self.proposer = teacher, proposer
        self.o = exp.optimize
        self.mode = setting.mode
        self.trials = setting.trials or DEFAULT_TRIALS[self.mode]
        self.decoding = _decoding(exp)
        self.proposer_decoding = DecodingParams(max_new_tokens=self.o.proposer_max_new_tokens,
                                                temperature=self.o.proposer_temperature, top_p=1.0,
                                                stop=("</INS>",), seed=exp.seed)
        self._check_task()
        self.dev = task.split("dev", self.o.dev_limit)
        self.train = task.splits["train"][: self.o.train_limit]
        self.longest = _longest(task)
        self.usd_per_hour = _usd_per_hour(self.o)
        self._check_proposer()
        self.identity = self._identity()
        self.path = COMPILED_DIR / f"{self.identity}.json"

    # -- validation --------------------------------------------------------------------------------------------

    def _check_task(self) -> None:
        from labscale.metrics.registry import get_metric

        task, name = self.task, self.setting.name
        if not task.splits["dev"]:
            raise DataError(f"{name} selects prompts on the dev split, but task '{task.name}' has an empty dev "
                            "split", "give the task dev data (`data: {train: …, dev: …, test: …}`, dev rows in its "
                            "split column, or split_fractions with a dev share), or drop the optimized setting")
        if self.mode in ("fewshot", "full") and not task.splits["train"]:
            raise DataError(f"{name} draws demonstrations from the train split, but task '{task.name}' has none",
                            "give the task train data, or use optimized:instruction")
        if not get_metric(task.main_metric).higher_is_better:
            raise ConfigError(f"{name} maximises the main metric, but '{task.main_metric}' of task '{task.name}' is "
                              "lower-is-better", "set a higher-is-better main_metric on the task")

    def _check_proposer(self) -> None:
        """A proposer must be able to write an instruction: the bare meta-prompt plus its output budget fit."""
        if self.mode == "instruction" or self.mode == "full":
            spec, backend = self.proposer
            info = backend.info
            if not info.context_known:
                return
            compiler = self._compiler(None)
            bare = backend.render([{"role": "user", "content": compiler.meta_prompt(
                [(self.task.instruction, None)], [])}])
            need = backend.count_tokens(bare) + self.o.proposer_max_new_tokens
            if need > info.context_length:
                raise ModelError(f"optimize.proposer '{spec.label}' cannot generate an instruction for task "
                                 f"'{self.task.name}': its context of {info.context_length} tokens does not hold "
                                 f"the meta-prompt plus proposer_max_new_tokens={self.o.proposer_max_new_tokens} "
                                 f"({need} tokens)", "lower optimize.proposer_max_new_tokens, or name a proposer "
                                 "with a longer context")

    def _identity(self) -> str:
        options = self.o.model_dump(mode="json", exclude={"country"})
        t = self.task
        return sha({
            "kind": "compile", "algorithm": ALGORITHM_VERSION, "mode": self.mode, "trials": self.trials,
            "options": options, "student": self.backend.info.fingerprint,
            "teacher": self.teacher[1].info.fingerprint, "proposer": self.proposer[1].info.fingerprint,
            "task": {"name": t.name, "type": t.type, "instruction": t.instruction, "labels": list(t.labels),
                     "aliases": {k: list(v) for k, v in t.label_aliases.items()}, "metric": t.main_metric,
                     "demos": [(d.example.input, d.answer) for d in t.demos],
                     "input_limit": [t.max_input_tokens, t.truncate] if t.max_input_tokens else None},
            "train": _examples_sha(self.train), "dev": _examples_sha(self.dev),
            "longest": [e.id for e in self.longest], "decoding": self.decoding.key(),
            "proposer_decoding": self.proposer_decoding.key(), "format": PROMPT_FORMAT_VERSION,
            "parser": ANSWER_PARSER_VERSION, "seed": self.exp.seed,
        })[:16]

    # -- the adaptation interface ------------------------------------------------------------------------------

    def _stored(self) -> dict | None:
        try:
            card = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(card, dict) or card.get("identity") != self.identity:
            return None
        try:
            program_of(card, self.task)
        except (LabscaleError, KeyError, TypeError):
            return None
        return card

    @property
    def reused(self) -> bool:
        return self._stored() is not None

    def calls_bound(self) -> dict[str, int]:
        """Upper bounds of the calls each role may make."""
        o, dev, train, t = self.o, len(self.dev), len(self.train), self.trials
        if self.mode == "fewshot":
            return {"teacher": train if o.max_bootstrapped_demos else 0, "student": (3 + t) * dev, "proposer": 0}
        if self.mode == "instruction":
            return {"teacher": 0, "student": (1 + t) * dev, "proposer": t}
        rungs, alive, m = 0, t, o.minibatch
        while alive > 1 and m < dev:
            rungs, alive, m = rungs + alive * m, math.ceil(alive / 2), m * 2
        return {"teacher": train if o.max_bootstrapped_demos else 0, "student": rungs + alive * dev,
                "proposer": o.instructions_per_round}

    def _worst_usd(self) -> float:
        """Worst case of the priced (API) calls: every call at the longest prompt with the most demos, and the
        whole output budget."""
        from labscale.efficiency.cost import cost_usd

        bound = self.calls_bound()
        compiler = self._compiler(None)
        longest = compiler.render(compiler.seed_program, self.longest[0])
        per_prompt = self.backend.count_tokens(longest) * (1 + self.o.max_bootstrapped_demos +
                                                           self.o.max_labeled_demos)
        usd = 0.0
        for role, (_, backend), new in (("student", (self.spec, self.backend), self.decoding.max_new_tokens),
                                        ("teacher", self.teacher, self.decoding.max_new_tokens),
                                        ("proposer", self.proposer, self.o.proposer_max_new_tokens)):
            if backend.info.price is not None and bound[role]:
                usd += bound[role] * (cost_usd(backend.info.price, per_prompt, new) or 0.0)
        return usd

    def estimate(self) -> str:
        where = f"compile {self.setting.name} for {self.label} on {self.task.name}"
        if self.reused:
            return f"{where}: identical compiled prompt exists ({self.path}), reusing it"
        bound = self.calls_bound()
        worst = self._worst_usd()
        if worst > self.o.budget_usd:
            raise BudgetExceeded(f"{where}: its priced calls could cost up to ${worst:.2f}, over the budget "
                                 f"optimize.budget_usd=${self.o.budget_usd:g}",
                                 "raise optimize.budget_usd, lower the trial budget (optimized:<mode>:T), "
                                 "optimize.dev_limit or the demo counts")
        calls = ", ".join(f"{k} ≤ {v}" for k, v in bound.items() if v)
        return (f"{where}: {ALGORITHMS[self.mode]}, T={self.trials}, on {len(self.train)} train / {len(self.dev)} "
                f"dev examples — up to {sum(bound.values())} model calls ({calls}), budget "
                f"${self.o.budget_usd:g} (local compute at ${self.usd_per_hour:g}/h"
                + (f"; priced calls at most ${worst:.4f}" if worst else "") + ")")

    def _roles(self) -> tuple[Role, Role, Role]:
        roles: dict[int, Role] = {}

        def role(name: str, spec: ModelSpec, backend: ModelBackend) -> Role:
            if id(backend) not in roles:
                roles[id(backend)] = Role(name, backend, spec.batch_size, self.usd_per_hour)
            return roles[id(backend)]

        return (role("student", self.spec, self.backend), role("teacher", *self.teacher),
                role("proposer", *self.proposer))

    def _compiler(self, ctx: AdaptContext | None) -> Compiler:
        student, teacher, proposer = self._roles()
        cache = ctx.cache if ctx is not None else None
        return Compiler(self.task, student, teacher, proposer, cache, self.decoding,  # type: ignore[arg-type]
                        self.proposer_decoding, self.train, self.dev, self.longest, self.o, self.exp.seed,
                        self.o.budget_usd, fit=_fit(self.task, self.backend),
                        say=ctx.say if ctx is not None else (lambda m: None))

    def compiler(self, ctx: AdaptContext) -> Compiler:
        """A compiler over `ctx`'s cache (for recomputing a stored program's dev score)."""
        return self._compiler(ctx)

    def run(self, ctx: AdaptContext) -> Adapted:
        card = self._stored()
        reused = card is not None
        if card is None:
            card = self._compile(ctx)
        program = program_of(card, self.task)
        summary = {**card, "reused": reused}
        setting = program.setting(self.setting.name, self.mode, self.trials, self.identity, summary)
        if reused:
            ctx.say(f"  reused {self.path}: dev {card['metric']} {_fmt(card['dev']['score'])}, no call made")
        return Adapted(self.spec, self.backend, self.task, setting, summary, reused)

    def _compile(self, ctx: AdaptContext) -> dict:
        from labscale.adapt.carbon import CarbonMeter
        from labscale.atomic import write_atomic

        compiler = self._compiler(ctx)
        meter = CarbonMeter(self.o.country)
        try:
            meter.start()
        except Exception:  # noqa: BLE001 - energy is reported as unmeasured, the compilation goes on
            meter = CarbonMeter(self.o.country, enabled=False)
        started = time.time()
        try:
            best = compiler.compile(self.mode, self.trials)
        finally:
            kwh, kg = meter.stop()
            for role in compiler.roles():  # free the teacher's / proposer's weights (they reload when needed)
                if role.backend is not self.backend:
                    role.backend.close()
        wall = time.time() - started
        card = self._card(compiler, best, wall, kwh if meter.enabled else None, kg if meter.enabled else None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(card, indent=2, sort_keys=True, default=str))
        c = card["cost"]
        ctx.say(f"  compiled: dev {card['metric']} {_fmt(card['dev']['score'])} ({card['origin']}), "
                f"{len(card['demos'])} demos, instruction {'changed' if card['instruction_changed'] else 'kept'}; "
                f"{c['calls']} calls ({c['new']} new, {c['cached']} cached), ${c['usd']:.4f}, {wall:.0f}s"
                + (" — stopped at the budget" if card["stopped"] else "") + f"; {self.path}")
        return card

    def _card(self, compiler: Compiler, best, wall_s: float, kwh: float | None, kg: float | None) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        from labscale.adapt.carbon import carbon_intensity

        try:
            labscale_version = version("labscale")
        except PackageNotFoundError:
            labscale_version = None

        roles = {r.name: r for r in compiler.roles()}
        summaries = {name: r.summary() for name, r in roles.items()}
        keys = set().union(*(r.keys for r in roles.values()))
        program = best.program
        return {
            "identity": self.identity, "labscale": labscale_version, "algorithm": ALGORITHM_VERSION, "mode": self.mode,
            "algorithm_name": ALGORITHMS[self.mode], "trials": self.trials, "setting": self.setting.name,
            "task": self.task.name, "task_type": self.task.type, "labels": list(self.task.labels),
            "model": self.label, "fingerprint": self.backend.info.fingerprint,
            "teacher": self.teacher[0].label, "proposer": self.proposer[0].label,
            "options": self.o.model_dump(mode="json"), "seed": self.exp.seed,
            "metric": self.task.main_metric,
            "dev": {"score": None if math.isnan(best.score) else best.score, "n": best.n,
                    "examples_sha": _examples_sha(self.dev)},
            "train_pool": len(self.train), "seed_instruction": self.task.instruction,
            "instruction": program.instruction, "instruction_changed": program.instruction != self.task.instruction,
            "demos": [_demo_record(d) for d in program.demos], "origin": program.origin,
            "candidates": len(compiler.trials), "trajectory": compiler.trials, "proposals": compiler.proposals,
            "stopped": compiler.stopped,
            "cost": {"calls": len(keys), "new": sum(r.new for r in roles.values()),
                     "cached": len(keys) - sum(r.new for r in roles.values()),
                     "failed": sum(r.failed for r in roles.values()),
                     "prompt_tokens": sum(s["prompt_tokens"] for s in summaries.values()),
                     "new_tokens": sum(s["new_tokens"] for s in summaries.values()),
                     "compute_s": round(sum(s["compute_s"] for s in summaries.values()), 3),
                     "usd": sum(s["usd"] for s in summaries.values()), "usd_per_hour": self.usd_per_hour,
                     "wall_s": round(wall_s, 3), "energy_kwh": kwh, "co2eq_kg": kg, "country": self.o.country,
                     "carbon_intensity_g_per_kwh": carbon_intensity(self.o.country),
                     "energy_source": "CodeCarbon (offline) over the compiling invocation" if kwh is not None
                     else "not measured"},
            "roles": summaries, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "file": str(self.path),
        }


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def compile_adaptations(exp: Experiment, tasks: list[Task], models: list[ModelSpec],
                        backends: list[ModelBackend]) -> list[CompileAdaptation]:
    """One validated CompileAdaptation per evaluated model × task × optimized setting (no weights loaded)."""
    settings = [s for s in map(parse_setting, exp.settings) if s.deferred]
    if not settings:
        return []
    evaluated = list(zip(models, backends))
    extra: dict[str, tuple[ModelSpec, ModelBackend]] = {}
    out = []
    for spec, backend in evaluated:
        teacher = _pick_model(exp, exp.optimize.teacher, "teacher", (spec, backend), evaluated, extra)
        proposer = _pick_model(exp, exp.optimize.proposer, "proposer", (spec, backend), evaluated, extra)
        for task in tasks:
            for setting in settings:
                out.append(CompileAdaptation(exp, spec, backend, task, setting, teacher, proposer))
    return out
