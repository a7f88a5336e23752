"""Prompt compilation: search a prompt's instruction and demonstrations against the task's metric on its dev split.

A *program* is what the `optimized` setting evaluates: an instruction and a tuple of demonstrations (user/assistant
turns before the input), in the zero-shot format of settings/setting.py. Splits stay clean: demonstrations come from
the train split only, every selection is made on the dev split, and the test split is never read here except for
the length of its longest inputs (token counts only, so that a chosen program fits the model's context on every
example the evaluation will show it; no test label or output is looked at). Every model call — teacher answers,
student answers on dev, proposer calls — goes through the experiment's generation cache (engine/cache.py), so a
killed compilation resumes without repeating a finished call, and the same compilation run twice is decided by the
same cached answers. The search is deterministic given the seed (sampling proposers are seeded per call).

Three algorithms, each a small re-implementation (no DSPy dependency; what is simplified is said):

fewshot — BootstrapFewShotWithRandomSearch, from DSPy (Khattab et al. 2023, "DSPy: Compiling Declarative Language
    Model Calls into Self-Improving Pipelines", arXiv:2310.03714).
    * BootstrapFewShot: a teacher (the compiled model unless `teacher` names another) answers train examples, in
      order, with a LabeledFewShot prompt (the task's instruction and `max_labeled_demos` train examples with their
      gold answers, sampled once, never including the example itself — as DSPy's teacher does); an answer is kept as
      a *bootstrapped* demonstration when the task's main metric accepts it (its one-example score is above 0, as
      DSPy's truthy metric, or at least `demo_threshold`), until `max_bootstrapped_demos` are kept (one pass,
      DSPy's max_rounds=1). The demo's answer is the teacher's output verbatim (its "trace"). Then up to
      `max_labeled_demos` other train examples with their gold answers are added (*labeled* demos).
    * Random search: the candidates are DSPy's: seed -3 the zero-shot program (the task's own prompt), -2 labeled
      demos only (a seeded sample), -1 BootstrapFewShot over the train order as is, and seeds 0..T-1 over a
      seeded shuffle of train with a random number (1..max_bootstrapped_demos) of bootstrapped demos. Every
      candidate is scored on dev; the best wins, ties going to the earlier (so a search that finds nothing better
      keeps the zero-shot prompt).
    Simplified / changed: candidates are scored on the **dev** split (DSPy defaults to train); labeled demos are
    counted separately from bootstrapped ones (up to 4 + 4 by default; DSPy's max_labeled_demos caps both); the
    bootstrap walks at most `train_limit` train examples; one predictor (no multi-module traces).

instruction — an OPRO / COPRO-style loop (Yang et al. 2023, "Large Language Models as Optimizers",
    arXiv:2309.03409; COPRO is DSPy's coordinate-ascent instruction optimizer). The seed instruction is the task's
    own, scored on dev. Each round a proposer model (the compiled model unless `proposer` names another) gets a
    meta-prompt holding the `history` best earlier instructions with their dev scores, sorted worst to best (OPRO's
    order), and `exemplars` train inputs with their answers (a different seeded sample per call, as OPRO re-samples
    exemplars), and writes one instruction between <INS> and </INS>; `instructions_per_round` such calls per round,
    sampled at `proposer_temperature` with a seed per call, until T instructions were proposed. Every new, distinct
    instruction is scored on dev and joins the history; the best on dev wins (ties: the earlier, so the seed
    instruction wins unless beaten). Simplified: a few rounds of a few proposals (OPRO: 8 per step for ~100+ steps),
    one fixed meta-prompt wording, no demonstrations in the meta-prompt beyond the exemplars.

full — MIPRO-lite (Opsahl-Ong et al. 2024, "Optimizing Instructions and Demonstrations for Multi-Stage Language
    Model Programs", arXiv:2406.11695): instruction and demonstration candidates are proposed first (the seed
    instruction plus `instructions_per_round` proposals from the meta-prompt above; demo sets from the fewshot
    generator: zero-shot, labeled, bootstrapped unshuffled and seeded random bootstraps), then T (instruction, demo
    set) configurations — a seeded sample of their product, the seed instruction with no demos always among them —
    are searched jointly by successive halving (Jamieson & Talwalkar 2016) over minibatches of dev: every
    surviving configuration is scored on the first `minibatch` dev examples, the better half survives, the
    minibatch doubles, until one survives or the minibatch reaches the whole dev set; the survivors are scored on
    all of dev and the best wins. Simplified: no Bayesian optimization (MIPRO uses Optuna's TPE over minibatch
    scores) and no program / data summaries in the proposer's prompt.

A candidate program that would not fit the model's context (prompt plus max_new_tokens) for the task's longest
inputs loses demonstrations from its end until it fits. Failed calls (API errors after retries) score as wrong
answers and are never accepted as demonstrations. When the compilation's cost passes its budget, the search stops
and the best program scored on all of dev so far is kept (`stopped: "budget"` in the card).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable

from labscale.answers import parse_answer
from labscale.efficiency.cost import cost_usd
from labscale.engine.cache import CachedCalls, GenerationCache
from labscale.example import UNPARSEABLE, Demo, Example, Outcome
from labscale.hashing import sha
from labscale.models.base import DecodingParams, ModelBackend
from labscale.settings.setting import Setting, chat_prompt, gold_answer, lettered
from labscale.tasks.base import Task

# Bump when a search decision changes: it is part of every compiled prompt's identity.
# 2: a bare leading "INS" (a tag the proposer half wrote) is dropped from proposals.
ALGORITHM_VERSION = 2
DEFAULT_TRIALS = {"fewshot": 4, "instruction": 4, "full": 6}
LONGEST = 8  # the task's longest inputs (by characters) whose token counts decide whether a program fits
EXEMPLAR_CHARS = 400  # an exemplar input longer than this is cut (with "…") in the proposer's meta-prompt

Say = Callable[[str], None]


class BudgetStop(Exception):
    """The compilation's cost passed its budget: stop searching, keep the best program so far."""


@dataclass(frozen=True)
class Program:
    instruction: str
    demos: tuple[Demo, ...] = ()
    origin: str = ""

    @property
    def key(self) -> str:
        return sha([self.instruction, [(d.example.id, d.answer, d.kind) for d in self.demos]])

    def setting(self, name: str = "optimized", mode: str = "", trials: int = 0, identity: str = "candidate",
                card: dict | None = None) -> Setting:
        return Setting(name, "optimized", mode=mode, trials=trials, instruction=self.instruction, demos=self.demos,
                       compiled=identity, card=card)


@dataclass
class Trial:
    program: Program
    score: float  # NaN when undefined
    n: int
    stats: list = field(default_factory=list, repr=False)


@dataclass
class Role:
    """One model's part in the compilation (student, teacher or proposer) and the calls it made."""

    name: str
    backend: ModelBackend
    batch_size: int
    usd_per_hour: float
    keys: set = field(default_factory=set)
    rows: dict = field(default_factory=dict)  # key -> (prompt_tokens, new_tokens, compute_s)
    new: int = 0
    cached: int = 0
    failed: int = 0

    def record(self, calls: CachedCalls, new: int, cached: int, failed: int) -> None:
        self.new, self.cached, self.failed = self.new + new, self.cached + cached, self.failed + failed
        for key in calls.keys:
            row = calls.rows.get(key)
            if row is not None:
                self.keys.add(key)
                self.rows[key] = (row["prompt_tokens"], row["new_tokens"], row["compute_s"])

    def usd(self) -> float:
        info = self.backend.info
        if info.price is not None:
            return sum(cost_usd(info.price, p, n) or 0.0 for p, n, _ in self.rows.values())
        if info.is_remote:
            return 0.0  # an API without a known price: counted as $0 (tokens are still reported)
        return self.compute_s() / 3600 * self.usd_per_hour

    def compute_s(self) -> float:
        return sum(c for _, _, c in self.rows.values())

    def summary(self) -> dict:
        """Distinct calls used; `new` of them made by this invocation (a key is generated once, then cached),
        the rest found in the cache (an earlier attempt, another setting, another experiment)."""
        info = self.backend.info
        return {"model": info.name, "fingerprint": info.fingerprint, "calls": len(self.keys), "new": self.new,
                "cached": len(self.keys) - self.new, "failed": self.failed,
                "prompt_tokens": sum(p for p, _, _ in self.rows.values()),
                "new_tokens": sum(n for _, n, _ in self.rows.values()),
                "compute_s": round(self.compute_s(), 3), "usd": self.usd(),
                "priced_by": "api price" if info.price is not None else
                ("unknown api price" if info.is_remote else "local compute hours × price per hour")}


def parse_instruction(text: str) -> str | None:
    """The proposer's instruction: what stands between <INS> and </INS> (or after <INS>, when cut short), else the
    whole reply; quotes and a leading 'Instruction:' removed. None when it is empty or implausible (under 8 or
    over 2,000 characters)."""
    m = re.search(r"<\s*INS\s*>(.*?)(?:<\s*/\s*INS\s*>|$)", text, re.S | re.I)
    ins = m.group(1) if m else text
    ins = re.sub(r"^\s*<?\s*/?\s*INS\s*>?\s*:?\s+", "", ins.strip())  # a tag the proposer half wrote: "INS …"
    ins = re.sub(r"^\s*(new\s+)?instruction\s*:\s*", "", ins.strip(), flags=re.I).strip().strip("\"'`").strip()
    ins = re.sub(r"[ \t]+", " ", ins)
    return ins if 8 <= len(ins) <= 2000 else None


def _cut(text: str, n: int = EXEMPLAR_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


class Compiler:
    """One compilation of one (model, task): the three searches over a shared, cached scorer."""

    def __init__(self, task: Task, student: Role, teacher: Role, proposer: Role, cache: GenerationCache,
                 decoding: DecodingParams, proposer_decoding: DecodingParams, train: list[Example],
                 dev: list[Example], longest: list[Example], options, seed: int, budget_usd: float,
                 fit: Callable[[Example], Example] = lambda ex: ex, say: Say = lambda m: None):
        from labscale.metrics.registry import get_metric

        self.task, self.student, self.teacher, self.proposer = task, student, teacher, proposer
        self.cache, self.decoding, self.proposer_decoding = cache, decoding, proposer_decoding
        self.train, self.dev, self.longest = train, dev, longest
        self.o, self.seed, self.budget_usd, self.fit, self.say = options, seed, budget_usd, fit, say
        self.metric = get_metric(task.main_metric)
        self.seed_program = Program(task.instruction, tuple(task.demos), "zero-shot (the task's prompt)")
        self.trials: list[dict] = []  # every scored candidate, in order (the card's trajectory)
        self.proposals: list[dict] = []  # every proposer call: its reply and the instruction read from it
        self._scores: dict[tuple[str, tuple[str, ...]], Trial] = {}
        self._teacher_answers: dict[str, str | None] = {}
        self._fits: dict[str, bool] = {}
        self.stopped: str | None = None

    # -- model calls -------------------------------------------------------------------------------------------

    def spent_usd(self) -> float:
        return sum(r.usd() for r in self.roles())

    def roles(self) -> list[Role]:
        """The distinct roles (a model that is both student and teacher is one role, its calls counted once)."""
        roles: dict[int, Role] = {}
        for r in (self.student, self.teacher, self.proposer):
            roles.setdefault(id(r), r)
        return list(roles.values())

    def _generate(self, role: Role, prompts: list[str], decoding: DecodingParams) -> list[str | None]:
        """Texts for rendered prompts through the cache (None where the call failed). Callers record what they
        learnt from them, then call `check_budget`."""
        if not prompts:
            return []
        counts = self.cache.counts
        before = (counts.new, counts.cached, counts.failed)
        calls = self.cache.generate(role.backend, [(p, role.backend.count_tokens(p)) for p in prompts], decoding,
                                    role.batch_size)
        role.record(calls, counts.new - before[0], counts.cached - before[1], counts.failed - before[2])
        return [calls.text(i) for i in range(len(prompts))]

    def check_budget(self) -> None:
        """BudgetStop once the calls used so far cost more than the budget (after their results are recorded, so
        the batch that crossed it still counts)."""
        if self.spent_usd() > self.budget_usd:
            raise BudgetStop

    def render(self, program: Program, example: Example, backend: ModelBackend | None = None) -> str:
        backend = backend or self.student.backend
        return backend.render(chat_prompt(self.task, program.setting(), example, self.seed, self.fit))

    # -- fitting the context -----------------------------------------------------------------------------------

    def fits(self, program: Program) -> bool:
        if program.key not in self._fits:
            backend = self.student.backend
            ctx = backend.info.context_length
            self._fits[program.key] = not backend.info.context_known or all(
                backend.count_tokens(self.render(program, ex)) + self.decoding.max_new_tokens <= ctx
                for ex in self.longest)
        return self._fits[program.key]

    def fitted(self, program: Program) -> Program:
        """The program, less demonstrations from its end until it fits the context on the longest inputs."""
        while program.demos and not self.fits(program):
            program = Program(program.instruction, program.demos[:-1], program.origin + " (trimmed to fit)")
        return program

    # -- scoring -----------------------------------------------------------------------------------------------

    def outcome(self, example: Example, text: str | None) -> Outcome:
        if text is None:
            return Outcome(example, "", UNPARSEABLE, failed="the call failed")
        return Outcome(example, text, parse_answer(self.task, example, text, cot=False))

    def _value(self, stats) -> float:
        value = self.metric.aggregate(stats)
        return float("nan") if value is None else float(value)

    def score_many(self, programs: list[Program], examples: list[Example]) -> list[Trial]:
        """Each program's main-metric score on `examples` (one batched, cached generate for all of them)."""
        ids = tuple(ex.id for ex in examples)
        todo = list({p.key: p for p in programs if (p.key, ids) not in self._scores}.values())
        prompts = [self.render(p, ex) for p in todo for ex in examples]
        texts = self._generate(self.student, prompts, self.decoding)
        for i, p in enumerate(todo):
            part = texts[i * len(examples):(i + 1) * len(examples)]
            stats = self.metric.stats([self.outcome(ex, t) for ex, t in zip(examples, part)])
            trial = Trial(p, self._value(stats), len(examples), stats.tolist())
            self._scores[(p.key, ids)] = trial
            self.trials.append({"origin": p.origin, "instruction": p.instruction,
                                "demos": [d.example.id for d in p.demos], "n": len(examples),
                                "score": None if math.isnan(trial.score) else trial.score})
            self.say(f"  candidate {len(self.trials)}: {p.origin}, {len(p.demos)} demos — {self.task.main_metric} "
                     f"{'n/a' if math.isnan(trial.score) else f'{trial.score:.3f}'} on {len(examples)} dev examples")
        self.check_budget()
        return [self._scores[(p.key, ids)] for p in programs]

    def score(self, program: Program, examples: list[Example] | None = None) -> Trial:
        return self.score_many([program], self.dev if examples is None else examples)[0]

    def best_on_dev(self) -> Trial:
        """After a budget stop: the best program scored on all of dev so far (the task's own prompt, unscored,
        when none was)."""
        ids = tuple(ex.id for ex in self.dev)
        done = [t for (_, on), t in self._scores.items() if on == ids]
        return self.best(done) if done else Trial(self.seed_program, float("nan"), 0)

    @staticmethod
    def best(trials: list[Trial]) -> Trial:
        """Highest score, ties to the earliest; NaN scores lose."""
        return max(enumerate(trials), key=lambda it: (not math.isnan(it[1].score),
                                                       -math.inf if math.isnan(it[1].score) else it[1].score,
                                                       -it[0]))[1]

    # -- BootstrapFewShot --------------------------------------------------------------------------------------

    def teacher_program(self) -> Program:
        """LabeledFewShot over train (DSPy's default teacher): max_labeled_demos gold demos sampled once."""
        rng = random.Random(f"{self.seed}:teacher")
        shots = rng.sample(self.train, min(self.o.max_labeled_demos, len(self.train)))
        return Program(self.task.instruction, tuple(Demo(ex, gold_answer(self.task, ex), "labeled") for ex in shots),
                       "teacher")

    def teacher_answers(self, examples: list[Example]) -> list[str | None]:
        """The teacher's answer to each train example (its own demo left out of its prompt), cached."""
        todo = [ex for ex in examples if ex.id not in self._teacher_answers]
        if todo:
            base = self.teacher_program()
            prompts = []
            for ex in todo:
                own = Program(base.instruction, tuple(d for d in base.demos if d.example.id != ex.id), "teacher")
                prompts.append(self.render(own, ex, self.teacher.backend))
            for ex, text in zip(todo, self._generate(self.teacher, prompts, self.decoding)):
                self._teacher_answers[ex.id] = text
            self.check_budget()
        return [self._teacher_answers[ex.id] for ex in examples]

    def accepts(self, example: Example, text: str | None) -> bool:
        """Does the task's main metric accept this answer (one-example score above 0, or >= demo_threshold)?"""
        if text is None or not text.strip():
            return False
        value = self._value(self.metric.stats([self.outcome(example, text)]))
        if math.isnan(value):
            return False
        return value >= self.o.demo_threshold if self.o.demo_threshold is not None else value > 0

    def bootstrap(self, order: list[Example], k_boot: int, rng: random.Random) -> tuple[Demo, ...]:
        """Up to k_boot accepted teacher answers walking `order`, then up to max_labeled_demos labeled others."""
        boot: list[Demo] = []
        step = max(1, self.teacher.batch_size)
        for start in range(0, len(order), step):
            if len(boot) >= k_boot:
                break
            chunk = order[start:start + step]
            for ex, text in zip(chunk, self.teacher_answers(chunk)):
                if len(boot) < k_boot and self.accepts(ex, text):
                    boot.append(Demo(ex, text.strip(), "bootstrapped"))  # type: ignore[union-attr]
        used = {d.example.id for d in boot}
        rest = [ex for ex in self.train if ex.id not in used]
        labeled = rng.sample(rest, min(self.o.max_labeled_demos, len(rest)))
        return tuple(boot) + tuple(Demo(ex, gold_answer(self.task, ex), "labeled") for ex in labeled)

    def demo_candidates(self, n: int) -> list[Program]:
        """DSPy's random-search candidates: zero-shot, labeled only, bootstrap (train order), then n seeded ones."""
        return [self.seed_program, *self._demo_candidates(n)]

    def random_search(self, trials: int) -> Trial:
        """BootstrapFewShotWithRandomSearch on dev: candidates built and scored one by one (a budget stop keeps
        the best scored so far)."""
        scored: list[Trial] = []
        try:
            scored.append(self.score(self.seed_program))
            for program in self._demo_candidates(trials):
                scored.append(self.score(program))
        except BudgetStop:
            self.stopped = "budget"
            return self.best_on_dev()
        return self.best(scored)

    def _demo_candidates(self, n: int):
        """The candidates after the zero-shot one, built one at a time (so a budget stop builds no more)."""
        o, ins = self.o, self.task.instruction
        if not self.train:
            return
        rng = random.Random(f"{self.seed}:labeled")
        labeled = rng.sample(self.train, min(o.max_labeled_demos, len(self.train)))
        if labeled:
            yield self.fitted(Program(ins, tuple(Demo(ex, gold_answer(self.task, ex), "labeled") for ex in labeled),
                                      "labeled demos only"))
        if not o.max_bootstrapped_demos:
            return
        yield self.fitted(Program(ins, self.bootstrap(list(self.train), o.max_bootstrapped_demos,
                                                      random.Random(f"{self.seed}:-1")), "bootstrap (train order)"))
        for s in range(n):
            rng = random.Random(f"{self.seed}:{s}")
            order = list(self.train)
            rng.shuffle(order)
            size = rng.randint(1, o.max_bootstrapped_demos)
            yield self.fitted(Program(ins, self.bootstrap(order, size, rng), f"bootstrap seed {s} ({size} bootstrapped)"))

    # -- instruction proposals (OPRO / COPRO) ------------------------------------------------------------------

    def meta_prompt(self, history: list[tuple[str, float | None]], exemplars: list[Example]) -> str:
        """OPRO's meta-prompt: earlier instructions with scores (worst to best), exemplars, the request."""
        metric = self.task.main_metric
        parts = ["You write instructions for a language model. The model reads the instruction, then one input, "
                 "and answers it."]
        if history:
            scored = any(s is not None for _, s in history)
            parts.append(f"Earlier instructions with their scores on development data ({metric}, higher is better), "
                         "from worst to best:" if scored else "The current instruction:")
            for ins, s in history:
                parts.append(f"Instruction: {ins}" + (f"\nScore: {s:.2f}" if s is not None else ""))
        if exemplars:
            parts.append("Example inputs with their correct answers:")
            mc = self.task.type == "multiple_choice"
            for ex in exemplars:
                text = lettered(ex) if mc and ex.choices else ex.input
                parts.append(f"Input: {_cut(text)}\nAnswer: {_cut(gold_answer(self.task, ex), 200)}")
        parts.append("Write one new instruction that is different from every instruction above and would score "
                     "higher. Keep what the best instructions say about the answer format. Reply with the "
                     "instruction alone, between <INS> and </INS>.")
        return "\n\n".join(parts)

    def _history(self, trials: list[Trial]) -> list[tuple[str, float | None]]:
        """The `history` best distinct instructions, worst first (OPRO shows the top ones, ascending)."""
        best: dict[str, float] = {}
        for t in trials:
            s = -math.inf if math.isnan(t.score) else t.score
            best[t.program.instruction] = max(best.get(t.program.instruction, -math.inf), s)
        ranked = sorted(best.items(), key=lambda kv: kv[1])[-self.o.history:]
        return [(ins, None if s == -math.inf else s) for ins, s in ranked]

    def propose(self, history: list[tuple[str, float | None]], call: int, seen: set[str]) -> str | None:
        """One proposer call (seeded exemplars and sampling seed per call); the new instruction or None."""
        rng = random.Random(f"{self.seed}:propose:{call}")
        exemplars = rng.sample(self.train, min(self.o.exemplars, len(self.train)))
        backend = self.proposer.backend
        while True:  # drop exemplars, then the oldest history, until the meta-prompt fits the proposer
            prompt = backend.render([{"role": "user", "content": self.meta_prompt(history, exemplars)}])
            if not backend.info.context_known or backend.count_tokens(prompt) + \
                    self.proposer_decoding.max_new_tokens <= backend.info.context_length:
                break
            if exemplars:
                exemplars = exemplars[:-1]
            elif len(history) > 1:
                history = history[1:]
            else:
                break  # checked when validating: the bare meta-prompt fits
        decoding = DecodingParams(self.proposer_decoding.max_new_tokens, self.proposer_decoding.temperature,
                                  self.proposer_decoding.top_p, self.proposer_decoding.stop,
                                  seed=(self.seed * 1009 + call) % (2**32))
        text = self._generate(self.proposer, [prompt], decoding)[0]
        ins = parse_instruction(text) if text is not None else None
        fresh = ins is not None and ins not in seen
        self.proposals.append({"call": call, "reply": text, "instruction": ins if fresh else None,
                               "rejected": None if fresh else ("failed call" if text is None else
                                                               "duplicate" if ins is not None else "unreadable")})
        self.check_budget()
        return ins if fresh else None

    def instruction_search(self, trials: int, demos: tuple[Demo, ...] | None = None) -> Trial:
        """OPRO-style rounds of `instructions_per_round` proposals until `trials` were proposed; best on dev."""
        demos = tuple(self.task.demos) if demos is None else demos
        scored: list[Trial] = []
        try:
            scored.append(self.score(Program(self.task.instruction, demos, self.seed_program.origin)))
            seen = {self.task.instruction}
            call, rnd = 0, 0
            while call < trials:
                rnd += 1
                history = self._history(scored)
                new = []
                for _ in range(min(self.o.instructions_per_round, trials - call)):
                    ins = self.propose(history, call, seen)
                    call += 1
                    if ins is not None:
                        seen.add(ins)
                        new.append(self.fitted(Program(ins, demos, f"proposal {call} (round {rnd})")))
                scored += self.score_many(new, self.dev)
        except BudgetStop:
            self.stopped = "budget"
            return self.best_on_dev()
        return self.best(scored)

    # -- full: MIPRO-lite --------------------------------------------------------------------------------------

    def full_search(self, trials: int) -> Trial:
        """Instruction and demo-set candidates, then successive halving of T configurations over dev minibatches."""
        survivors: list[Program] = []
        try:
            seen = {self.task.instruction}
            instructions = [self.task.instruction]
            history: list[tuple[str, float | None]] = [(self.task.instruction, None)]
            for call in range(self.o.instructions_per_round):
                ins = self.propose(history, call, seen)
                if ins is not None:
                    seen.add(ins)
                    instructions.append(ins)
            # at least the zero-shot, labeled and bootstrapped demo sets, more when T allows
            n_sets = max(3, math.ceil(trials / len(instructions)))
            demo_sets = [p.demos for p in self.demo_candidates(max(0, n_sets - 3))][:n_sets]
            demo_sets = list({tuple((d.example.id, d.answer) for d in ds): ds for ds in demo_sets}.values())
            configs = [(i, j) for i in range(len(instructions)) for j in range(len(demo_sets))]
            first, rest = configs[0], configs[1:]
            random.Random(f"{self.seed}:configs").shuffle(rest)
            chosen = [first] + rest[:max(0, trials - 1)]
            survivors = [self.fitted(Program(instructions[i], demo_sets[j],
                                             f"instruction {i} × demo set {j}" if (i, j) != (0, 0)
                                             else self.seed_program.origin)) for i, j in chosen]
            m = self.o.minibatch
            while len(survivors) > 1 and m < len(self.dev):
                rung = self.score_many(survivors, self.dev[:m])
                order = sorted(range(len(rung)), key=lambda k: (math.isnan(rung[k].score),
                                                                -(0 if math.isnan(rung[k].score) else rung[k].score),
                                                                k))
                survivors = [survivors[k] for k in sorted(order[:math.ceil(len(survivors) / 2)])]
                m *= 2
            return self.best(self.score_many(survivors, self.dev))
        except BudgetStop:
            self.stopped = "budget"
            return self.best_on_dev()

    def compile(self, mode: str, trials: int) -> Trial:
        trials = trials or DEFAULT_TRIALS[mode]
        if mode == "fewshot":
            return self.random_search(trials)
        if mode == "instruction":
            return self.instruction_search(trials)
        return self.full_search(trials)
