"""Instruction distillation (LaMini-LM, Wu et al. 2023): the teacher writes an instruction dataset, the student is
fine-tuned on it. `method: distill` with `instructions:` in an experiment, or `labscale distill instructions`.

1. Generation. Each generation prompt shows three seed instructions in `<example>…</example>` tags and asks the
   teacher for `per_prompt` (LaMini: 20) diverse new ones (LaMini's example-guided prompt, `GENERATION_PROMPT`);
   a `topic_share` of the prompts are topic-guided: the same plus ` with the topics "A, B, C"` from the topic
   list. Seeds, topics and the topic-guided choice of prompt i are drawn with a seeded RNG of (seed, i), so the
   prompts — and their cache keys — are the same on every run. Prompts go out in rounds of
   ceil(count / per_prompt) until `count` instructions are kept, at most `MAX_ROUNDS` rounds.
2. Filters (self-instruct, Wang et al. 2023; Alpaca): an instruction of ≤ 3 or > 150 words, one with a keyword
   of the blacklist (things a text model cannot do: image, graph, file, draw, plot, …), one that does not start
   with a letter or digit, an exact duplicate, and a near duplicate — ROUGE-L F1 > 0.7 (rouge-score, no
   stemming) against any kept or seed instruction — are rejected, and so is a last example cut off by
   max_new_tokens (no closing tag); every reason is counted.
3. Responses. The teacher answers every kept instruction (and, with `include_seeds`, every seed) with LaMini's
   request to respond as concisely as possible (a system turn), greedy; empty responses are dropped and counted.
4. The dataset: `data.jsonl` (id, instruction, response, instruction_source = example-guided | topic-guided |
   seed, topics, the generation prompt it came from, the response's finish reason) and its card `dataset.json`
   (teacher, prompts, counts, filter counts, tokens, $ cost, energy, time) — stored so that it can be rated.
5. The student is fine-tuned on the pairs with the usual machinery (finetune.py): each pair is a generate example
   whose prompt is the instruction alone, rendered with the student's chat template — a model without one gets
   labscale's plain `User: … / Assistant:` format (render.py), the very format evaluation uses, rather than
   LaMini's Alpaca wrapper, so that training and evaluation prompts agree; a seeded `dev_fraction` of the pairs is
   the dev split for early stopping. The student is then evaluated on every task of the experiment under the
   `distilled` setting (the LaMini suite: `tasks: [lamini-suite]`).

Identity, resume and budget work as for task distillation (distill.py): every teacher call goes through the
generation cache; the folder (default `runs/distilled/<identity>`) holds the dataset and the student; an identical
re-run reuses both; `budget_usd` covers the teacher (estimated before any call: the first round of generation
prompts and a response to each instruction to keep, each at its whole max_new_tokens) and the student.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from labscale.adapt.adaptation import AdaptContext, Adapted
from labscale.adapt.budget import BudgetExceeded
from labscale.adapt.data import DISTILLED
from labscale.adapt.distill import (
    DATA_FILE,
    DATASET_CARD,
    DEFAULT_DISTILL_DIR,
    DISTILL_FORMAT,
    DistilledStudent,
    STUDENT_DIR,
    Teacher,
    ask_teacher,
    check_estimate,
    check_folder,
    check_teacher_price,
    finished_student,
    identity_fields,
    ledger_name,
    run_student,
    student_options,
    teacher_card,
    teacher_cost,
    write_jsonl,
)
from labscale.adapt.finetune import plan_training
from labscale.adapt.session import read_json
from labscale.atomic import write_atomic
from labscale.config import FinetuneSpec, InstructionsSpec, ModelSpec
from labscale.efficiency.cost import SpendingCap, cost_usd
from labscale.engine.cache import generation_key
from labscale.errors import DataError, ModelError
from labscale.example import Example
from labscale.hashing import sha
from labscale.models.base import DecodingParams
from labscale.tasks.base import Task

__all__ = ["InstructionDistillation", "filter_instructions", "parse_instructions", "read_lines", "rouge_l"]

MAX_ROUNDS = 4
EXAMPLES_PER_PROMPT = 3
TOPICS_PER_PROMPT = 3
MIN_WORDS, MAX_WORDS = 3, 150  # kept: more than 3 words, at most 150
SIMILARITY = 0.7  # ROUGE-L F1 above which an instruction is a near duplicate
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")  # self-instruct's list
PACKAGED_SEEDS = "distill_seeds.txt"
PACKAGED_TOPICS = "distill_topics.txt"
GENERATION_PROMPT = (
    "{examples}\n"
    "Generate {n} diverse examples that are similar to the provided examples{topics}.\n"
    "You do not need to provide a response to the generated examples.\n"
    "Each example must include an instruction.\n"
    "Each generated instruction can be either an imperative sentence or a question.\n"
    'Each example must start with the label "<example>" and end with the label "</example>".'
)
TOPICS_CLAUSE = ' with the topics "{topics}"'
RESPOND_SYSTEM = "Respond to the instruction as concisely as possible."
SOURCES = ("example-guided", "topic-guided", "seed")


# -------------------------------------------------------------------------------------------------- the inputs


def read_lines(path: str | None, base_dir: Path, packaged: str, what: str) -> tuple[list[str], str]:
    """(entries, source) of a seed or topic file: .txt one per line ('#' comments), or .jsonl / .json with an
    `instruction` (seeds) / `topic` field, or a list of strings. Empty or malformed: a one-line DataError."""
    if path is None:
        text = resources.files("labscale.data").joinpath(packaged).read_text(encoding="utf-8")
        source = f"labscale's packaged {what} (labscale/data/{packaged})"
        name = packaged
    else:
        file = (base_dir / path).expanduser()
        if not file.is_file():
            raise DataError(f"{what} file '{path}' does not exist", f"pass a .txt file with one {what[:-1]} per line")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{what} file '{path}' cannot be read as UTF-8 text ({type(e).__name__})",
                            "save it as UTF-8 text") from None
        source, name = str(file), file.name
    key = "instruction" if what == "seeds" else "topic"
    entries: list[str] = []
    if name.endswith((".jsonl", ".json")):
        try:
            items = json.loads(text) if name.endswith(".json") else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise DataError(f"{what} file '{path}' is not valid JSON ({e})", f"write one {what[:-1]} per line in a "
                            ".txt file, or JSON objects with an `instruction` field") from None
        if not isinstance(items, list):
            raise DataError(f"{what} file '{path}' holds no list", f"write a JSON list of {what}")
        for i, item in enumerate(items):
            value = item.get(key) if isinstance(item, dict) else item
            if not isinstance(value, str):
                raise DataError(f"{what} file '{path}', entry {i + 1}: no `{key}` text", f"give every entry a `{key}`")
            entries.append(value)
    else:
        entries = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    entries = list(dict.fromkeys(" ".join(e.split()) for e in entries if e.strip()))
    need = EXAMPLES_PER_PROMPT if what == "seeds" else 1
    if len(entries) < need:
        raise DataError(f"{what} file '{path or packaged}' has {len(entries)} {what} (at least {need} needed)",
                        f"add {what} to it, one per line")
    return entries, source


# ----------------------------------------------------------------------------------- generation and filtering


def generation_prompt(seeds: list[str], topics: list[str], i: int, seed: int, per_prompt: int,
                      topic_share: float) -> tuple[str, str, list[str], list[str]]:
    """(prompt text, source, seed examples, topics) of generation prompt i — drawn from (seed, i) alone."""
    rng = random.Random(f"{seed}:lamini:{i}")
    examples = rng.sample(seeds, EXAMPLES_PER_PROMPT)
    picked = rng.sample(topics, min(TOPICS_PER_PROMPT, len(topics))) if topics and rng.random() < topic_share else []
    text = GENERATION_PROMPT.format(examples="\n".join(f"<example>{e}</example>" for e in examples), n=per_prompt,
                                    topics=TOPICS_CLAUSE.format(topics=", ".join(picked)) if picked else "")
    return text, "topic-guided" if picked else "example-guided", examples, picked


_EXAMPLE = re.compile(r"<example>(.*?)(?=</example>|<example>|\Z)", re.DOTALL | re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s*")
_LABEL = re.compile(r"^\s*(?:instruction|example|question)\s*\d*\s*:\s*", re.IGNORECASE)


def parse_instructions(text: str, finished: bool = True) -> tuple[list[str], int]:
    """(instructions, unfinished) of a generation output: the text of each `<example>` tag (a missing closing tag
    ends at the next tag or the end), without numbering or an `Instruction:` label, whitespace collapsed. When the
    output was cut by max_new_tokens (`finished` False), a last example without its closing tag is cut off too:
    it is dropped and counted as unfinished (0 or 1)."""
    matches = list(_EXAMPLE.finditer(text))
    unfinished = 0
    if not finished and matches and not re.match(r"\s*</example>", text[matches[-1].end():], re.IGNORECASE):
        matches, unfinished = matches[:-1], 1
    out = []
    for m in matches:
        s = _LABEL.sub("", _NUMBERING.sub("", m.group(1).strip()))
        out.append(" ".join(s.split()))
    return out, unfinished


def rouge_l(scorer, a: str, b: str) -> float:
    return scorer.score(a, b)["rougeL"].fmeasure


def _normal(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


_BLACK = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)


def filter_instructions(candidates: list[str], kept: list[str], reference: list[str], limit: int | None,
                        reasons: Counter, scorer=None) -> list[int]:
    """Indices of the candidates that pass the filters (module docstring), appended to `kept` in order until it
    holds `limit`; every rejection is counted in `reasons` (too_short, too_long, keyword, punctuation,
    duplicate, similar; surplus: passed after the limit was reached). `reference`: instructions new ones must
    not repeat or paraphrase besides `kept` (the seeds)."""
    if scorer is None:
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(["rougeL"], use_stemmer=False)
    seen = {_normal(s) for s in [*kept, *reference]}
    accepted = []
    for i, c in enumerate(candidates):
        words = len(c.split())
        reason = None
        if words <= MIN_WORDS:
            reason = "too_short"
        elif words > MAX_WORDS:
            reason = "too_long"
        elif _BLACK.search(c):
            reason = "keyword"
        elif not c[0].isalnum():
            reason = "punctuation"
        elif _normal(c) in seen:
            reason = "duplicate"
        elif any(rouge_l(scorer, other, c) > SIMILARITY for other in [*kept, *reference]):
            reason = "similar"
        elif limit is not None and len(kept) >= limit:
            reason = "surplus"
        if reason:
            reasons[reason] += 1
            continue
        kept.append(c)
        seen.add(_normal(c))
        accepted.append(i)
    return accepted


# ------------------------------------------------------------------------------------------------ the adaptation


def pairs_task(rows: list[dict], seed: int, dev_fraction: float) -> Task:
    """The instruction/response pairs as a generate task: prompt = the instruction alone; a seeded dev split."""
    examples = [Example(id=r["id"], input=r["instruction"], target=r["response"]) for r in rows]
    if len(examples) < 2:
        raise DataError(f"instruction distillation kept {len(examples)} instruction/response pair(s): too few to "
                        "train and validate on", "raise count, or check the teacher's outputs in data.jsonl")
    n_dev = min(len(examples) - 1, max(1, round(len(examples) * dev_fraction)))
    dev = set(random.Random(f"{seed}:dev").sample([e.id for e in examples], n_dev))
    return Task(name="instructions", description="instruction/response pairs written by the teacher",
                type="generate", instruction="", metrics=["rougeL"], main_metric="rougeL",
                source="generated by the teacher (labscale distill instructions)", license="generated",
                load=lambda: examples, split_by=lambda ex: "dev" if ex.id in dev else "train")


@dataclass
class InstructionRun:
    """The instruction-distilled student evaluated on one task of the experiment (one per task; trained once)."""

    core: "InstructionDistillation"
    task: Task
    first: bool
    kind: str = "distill"

    @property
    def label(self) -> str:
        return self.core.label

    @property
    def identity(self) -> str:
        return self.core.identity

    @property
    def reused(self) -> bool:
        return self.core.reused

    def estimate(self) -> str:
        if self.first:
            return self.core.estimate()
        return f"distill {self.label} (instructions): the same student, evaluated on {self.task.name} too"

    def run(self, ctx: AdaptContext) -> Adapted:
        spec, backend, card, reused = self.core.train(ctx)
        return Adapted(spec, backend, self.task, DISTILLED, card, reused or not self.first)


class InstructionDistillation(DistilledStudent):
    """The teacher writes instructions and responses; the student learns them (see the module docstring)."""

    kind = "distill"

    def __init__(self, label: str, spec: FinetuneSpec, ispec: InstructionsSpec, teacher: Teacher, student: ModelSpec,
                 seed: int, out: Path | None = None, base_dir: Path = Path(".")):
        self.label, self.spec, self.ispec, self.teacher, self.student, self.seed = label, spec, ispec, teacher, \
            student, seed
        check_teacher_price(teacher)
        self.seeds, self.seeds_source = read_lines(ispec.seeds, base_dir, PACKAGED_SEEDS, "seeds")
        self.topics, self.topics_source = read_lines(ispec.topics, base_dir, PACKAGED_TOPICS, "topics")
        if ispec.topic_share == 0:
            self.topics = []
        self.round_size = math.ceil(ispec.count / ispec.per_prompt)
        self.gen_decoding = DecodingParams(max_new_tokens=ispec.generation_tokens, temperature=ispec.temperature,
                                           seed=seed)
        self.resp_decoding = DecodingParams(max_new_tokens=ispec.response_tokens)
        self.plan = plan_training(student_options(spec, student, pairs_task(
            [{"id": "a", "instruction": "a", "response": "a"}, {"id": "b", "instruction": "b", "response": "b"}],
            seed, ispec.dev_fraction), Path("."), seed))
        self.data_identity = sha({
            "format": DISTILL_FORMAT, "mode": "instructions", "teacher": teacher.backend.info.fingerprint,
            "seeds": self.seeds, "topics": self.topics, "prompt": GENERATION_PROMPT, "topics_clause": TOPICS_CLAUSE,
            "respond": RESPOND_SYSTEM, "filters": [MIN_WORDS, MAX_WORDS, SIMILARITY, BLACKLIST, MAX_ROUNDS],
            "options": ispec.model_dump(mode="json", exclude={"seeds", "topics", "dev_fraction"}), "seed": seed,
            "generation": self.gen_decoding.key(), "response": self.resp_decoding.key(),
        })[:16]
        self.identity = sha({"data": self.data_identity, "dev_fraction": ispec.dev_fraction,
                             **identity_fields(spec, self.plan, student), "seed": seed})[:16]
        self.out = Path(out) if out is not None else DEFAULT_DISTILL_DIR / self.identity
        check_folder(self.out, self.data_identity, DATASET_CARD)
        self._card = finished_student(self.out, self.identity)
        self._trained: tuple | None = None
        self._dataset: dict | None = None
        self.estimated_usd = self._estimate_usd()

    # --------------------------------------------------------------------------------------------- estimate

    def _gen_prompts(self, start: int, n: int) -> list[tuple[str, int, str, list[str], list[str]]]:
        out = []
        for i in range(start, start + n):
            text, source, examples, topics = generation_prompt(self.seeds, self.topics, i, self.seed,
                                                               self.ispec.per_prompt, self.ispec.topic_share)
            rendered = self.teacher.backend.render([{"role": "user", "content": text}])
            out.append((rendered, self.teacher.backend.count_tokens(rendered), source, examples, topics))
        return out

    def _respond_prompt(self, instruction: str) -> str:
        return self.teacher.backend.render([{"role": "system", "content": RESPOND_SYSTEM},
                                            {"role": "user", "content": instruction}])

    def _estimate_usd(self) -> float | None:
        price = self.teacher.backend.info.price
        if price is None:
            return None
        gen = sum(cost_usd(price, t, self.ispec.generation_tokens) or 0.0 for _, t, *_ in
                  self._gen_prompts(0, self.round_size))
        longest = self.teacher.backend.count_tokens(self._respond_prompt(" ".join(["instruction"] * MAX_WORDS)))
        n = self.ispec.count + (len(self.seeds) if self.ispec.include_seeds else 0)
        return gen + n * (cost_usd(price, longest, self.ispec.response_tokens) or 0.0)

    def estimate(self) -> str:
        head = f"distill {self.label} (instructions) from teacher {self.teacher.label}"
        if self.reused:
            return f"{head}: identical distilled student exists ({self.out / STUDENT_DIR}), reusing it"
        if self.dataset_ready():
            teacher = f"teacher's dataset exists ({self.out / DATA_FILE}), no teacher calls"
        else:
            n = self.ispec.count + (len(self.seeds) if self.ispec.include_seeds else 0)
            check_estimate(self.label, self.estimated_usd, self.spec.budget_usd, self.round_size + n)
            cost = "no API cost (local)" if self.estimated_usd is None else \
                f"API cost ~${self.estimated_usd:.4f} (one round; at most {MAX_ROUNDS} rounds)"
            teacher = (f"teacher writes {self.ispec.count} instructions ({self.round_size} generation prompts per "
                       f"round, {self.ispec.topic_share:.0%} topic-guided) and {n} responses; {cost}")
        return (f"{head}: {teacher}, then the student trains with recipe {self.plan.recipe.name} "
                f"(budget ${self.spec.budget_usd:g} for teacher and student together)")

    def evaluated_on(self, tasks: list[Task]) -> list[InstructionRun]:
        return [InstructionRun(self, t, i == 0) for i, t in enumerate(tasks)]

    # ------------------------------------------------------------------------------------------------- run

    def dataset(self, ctx: AdaptContext) -> dict:
        """The instruction dataset: read back when this identity's exists, else generated through the cache."""
        if self._dataset is not None:
            return self._dataset
        if self.dataset_ready():
            card = read_json(self.out / DATASET_CARD)
            rows = [json.loads(line) for line in (self.out / DATA_FILE).read_text().splitlines() if line.strip()]
            ctx.say(f"teacher's instruction dataset exists: {self.out / DATA_FILE} — no teacher calls")
            self._dataset = {"card": card, "rows": rows}
            return self._dataset
        self._dataset = self._generate(ctx)
        return self._dataset

    def _ask(self, ctx, cap, prompts, decoding, what):
        labelled = ask_teacher(ctx, self.teacher, prompts, decoding, cap, self.plan.country,
                               self.out / ledger_name(self.data_identity), what)
        if labelled.failures:
            reason = next(iter(labelled.failures.values()))
            raise ModelError(f"{len(labelled.failures)} of {len(prompts)} teacher calls failed after retries "
                             f"(first: {reason})", "run the same command again: finished calls are stored and only "
                             "the failed ones are retried")
        return labelled

    def _generate(self, ctx: AdaptContext) -> dict:
        from rouge_score.rouge_scorer import RougeScorer

        ispec = self.ispec
        ctx.say(f"teacher {self.teacher.label} writes {ispec.count} instructions ({ispec.per_prompt} asked per "
                f"prompt) → {self.out}")
        self.out.mkdir(parents=True, exist_ok=True)
        cap = SpendingCap(self.spec.budget_usd)
        scorer = RougeScorer(["rougeL"], use_stemmer=False)
        kept: list[str] = []
        origin: list[dict] = []
        reasons: Counter = Counter()
        generated = 0
        rows_used: list = []
        new = cached = 0
        wall = 0.0
        rounds = 0
        for r in range(MAX_ROUNDS):
            if len(kept) >= ispec.count:
                break
            rounds += 1
            prompts = self._gen_prompts(r * self.round_size, self.round_size)
            labelled = self._ask(ctx, cap, [(p, t) for p, t, *_ in prompts], self.gen_decoding,
                                 f"generation round {r + 1}")
            rows_used += labelled.rows
            new, cached, wall = new + labelled.counts.new, cached + labelled.counts.cached, wall + labelled.wall_s
            finish = {row["key"]: row["finish_reason"] for row in labelled.rows}
            keys = [generation_key(self.teacher.backend.info.fingerprint, p, self.gen_decoding.key())
                    for p, *_ in prompts]
            for k, (text, key, (_, _, source, examples, topics)) in enumerate(zip(labelled.texts, keys, prompts)):
                candidates, unfinished = parse_instructions(text or "", finished=finish.get(key) != "length")
                if unfinished:
                    reasons["unfinished"] += unfinished
                generated += len(candidates) + unfinished
                for i in filter_instructions(candidates, kept, self.seeds, ispec.count, reasons, scorer):
                    origin.append({"instruction_source": source, "topics": topics or None,
                                   "generation_prompt": r * self.round_size + k, "instruction": candidates[i]})
            ctx.say(f"  round {r + 1}: {len(kept)}/{ispec.count} instructions kept ({generated} generated so far)")
        pairs = origin + ([{"instruction_source": "seed", "topics": None, "generation_prompt": None,
                            "instruction": s} for s in self.seeds] if ispec.include_seeds else [])
        labelled = self._ask(ctx, cap, [(p, self.teacher.backend.count_tokens(p)) for p in
                                        (self._respond_prompt(x["instruction"]) for x in pairs)],
                             self.resp_decoding, "responses")
        rows_used += labelled.rows
        new, cached, wall = new + labelled.counts.new, cached + labelled.counts.cached, wall + labelled.wall_s
        rows, empty, truncated = [], 0, 0
        finish = {row["key"]: row["finish_reason"] for row in labelled.rows}
        fp, params = self.teacher.backend.info.fingerprint, self.resp_decoding.key()
        counters: Counter[str] = Counter()
        for pair, text in zip(pairs, labelled.texts):
            response = (text or "").strip()
            if not response:
                empty += 1
                continue
            reason = finish.get(generation_key(fp, self._respond_prompt(pair["instruction"]), params))
            truncated += reason == "length"
            tag = {"example-guided": "ex", "topic-guided": "topic", "seed": "seed"}[pair["instruction_source"]]
            counters[tag] += 1
            rows.append({"id": f"{tag}-{counters[tag]}", "instruction": pair["instruction"], "response": response,
                         "instruction_source": pair["instruction_source"], "topics": pair["topics"],
                         "generation_prompt": pair["generation_prompt"], "finish_reason": reason})
        by_source = Counter(r["instruction_source"] for r in rows)
        cost = teacher_cost(self.teacher, rows_used, self.plan.usd_per_hour)
        labelled.counts.new, labelled.counts.cached, labelled.wall_s = new, cached, wall
        card = {
            "labscale_distill_dataset": 1, "identity": self.data_identity, "mode": "instructions",
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "prompts": {"generation": GENERATION_PROMPT, "topics_clause": TOPICS_CLAUSE, "respond": RESPOND_SYSTEM,
                        "examples_per_prompt": EXAMPLES_PER_PROMPT, "topics_per_prompt": TOPICS_PER_PROMPT},
            "seeds": {"source": self.seeds_source, "count": len(self.seeds)},
            "topics": {"source": self.topics_source, "count": len(self.topics)},
            "options": ispec.model_dump(mode="json"),
            "generation": {"rounds": rounds, "prompts": rounds * self.round_size, "generated": generated,
                           "kept": len(origin), "filtered": dict(sorted(reasons.items())),
                           "decoding": self.gen_decoding.key()},
            "responses": {"asked": len(pairs), "empty": empty, "truncated": truncated,
                          "decoding": self.resp_decoding.key()},
            "data": {"inputs": len(pairs), "kept": len(rows), "dropped": {"empty_response": empty},
                     "dropped_total": empty, "dropped_share": empty / len(pairs) if pairs else 0.0,
                     "by_source": {s: by_source.get(s, 0) for s in SOURCES}, "file": DATA_FILE},
            "teacher_score": None,
            "accounting": {"teacher": teacher_card(self.teacher, cost, labelled, None),
                           "budget_usd": self.spec.budget_usd},
        }
        write_jsonl(self.out / DATA_FILE, rows)
        write_atomic(self.out / DATASET_CARD, json.dumps(card, indent=2, default=str) + "\n")
        f = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"
        ctx.say(f"teacher calls: {new} new, {cached} cached · {generated} instructions generated, {len(origin)} kept "
                f"(filtered: {f}) · {len(rows)} pairs ({empty} empty responses dropped) · ${cost['usd']:.4f} "
                f"(API ${cost['api_usd']:.4f})")
        return {"card": card, "rows": rows}

    def train(self, ctx: AdaptContext) -> tuple:
        """(run spec, backend, card, reused) of the student, trained once per process."""
        from labscale.models.adapter import AdapterBackend

        if self._trained is not None:
            return self._trained
        if self._card is not None:
            ctx.say(f"distilled student already trained with these settings: {self.out / STUDENT_DIR} "
                    f"(identity {self.identity}) — reusing it")
            spec = self.student.model_copy(update={"id": f"adapter:{(self.out / STUDENT_DIR).resolve()}",
                                                   "name": self.label})
            self._trained = (spec, AdapterBackend(spec, str(self.out / STUDENT_DIR)), self._card, True)
            return self._trained
        data = self.dataset(ctx)
        if not self.teacher.backend.info.is_remote:
            self.teacher.backend.close()
        teacher_usd = data["card"]["accounting"]["teacher"]["usd"]
        remaining = self.spec.budget_usd - teacher_usd
        if remaining <= 0:
            raise BudgetExceeded(f"the teacher cost ${teacher_usd:.4f} of the ${self.spec.budget_usd:g} budget: "
                                 "nothing is left to train the student", "raise budget_usd (--budget)")
        task = pairs_task(data["rows"], self.seed, self.ispec.dev_fraction)
        options = student_options(self.spec.model_copy(update={"train_limit": None}), self.student, task,
                                  self.out / STUDENT_DIR, self.seed, remaining)
        distillation = {**data["card"], "identity": self.identity, "data_identity": self.data_identity,
                        "setting": DISTILLED.name, "folder": str(self.out)}
        self._trained = run_student(ctx, options, None, distillation, self.label, self.student)
        return self._trained
