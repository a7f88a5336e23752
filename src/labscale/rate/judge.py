"""An LLM as judge on the raters' items: any model of the experiment rates them, its answers stored as a rater
(`judge:<model>`, source "judge") beside the human ratings, so the report puts both side by side with their
agreement.

- absolute: one prompt per item with the A–D definitions; the first standalone A/B/C/D of the answer is the grade.
- pairwise: each pair is asked in both orders (the first output shown first, then second), which cancels the
  judge's position bias: the report combines the two answers (rate/stats.py `judge_outcomes`): the same winner
  both times wins, disagreeing orders count as a tie.
- Every call goes through the generation cache (engine/cache.py), greedy, so a re-run repeats no call and a killed
  judge resumes. An answer that names no grade / choice is a parse failure: stored with its raw text, no rating,
  and its rate is reported. Prompts longer than the judge's context are skipped and counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from labscale.errors import LabscaleError
from labscale.rate.items import Item
from labscale.rate.page import DEFINITIONS

JUDGE_MAX_NEW_TOKENS = 16

ABSOLUTE_PROMPT = """You are grading a response to an instruction. Grades:
A: {A}
B: {B}
C: {C}
D: {D}

Instruction: {instruction}

Input:
{input}

Response:
{output}

Answer with one letter only: A, B, C or D."""

PAIRWISE_PROMPT = """You are comparing two responses to the same instruction.

Instruction: {instruction}

Input:
{input}

Response 1:
{first}

Response 2:
{second}

Which response is better? Answer with one of: 1, 2, tie, both bad."""


def parse_grade(text: str) -> str | None:
    """The first standalone A–D (e.g. "B", "Grade: C", "(A) because…"); None when there is none."""
    m = re.search(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])", text.strip())
    return m.group(1) if m else None


def parse_choice(text: str) -> str | None:
    """'first' | 'second' | 'tie' | 'both_bad' from the judge's answer; None when it names none."""
    t = text.strip().lower()
    m = re.search(r"both\s*(?:are\s*)?bad|tie|(?<!\d)[12](?!\d)", t)
    if not m:
        return None
    word = m.group(0)
    if word.startswith("both"):
        return "both_bad"
    return {"tie": "tie", "1": "first", "2": "second"}[word]


@dataclass
class JudgeSummary:
    judge: str
    items: int
    prompts: int
    parse_failures: int
    skipped: int  # too long for the judge's context
    new_calls: int
    cached_calls: int


def judge_spec(store, exp_id: int, label: str):
    """The ModelSpec of the experiment's model `label` (as stored with its runs)."""
    from labscale.config import ModelSpec
    from labscale.errors import did_you_mean

    runs = store.experiment_runs(exp_id)
    for r in runs:
        if r["model"] == label:
            spec = json.loads(r["model_json"]).get("spec")
            if spec:
                return ModelSpec(**spec)
    labels = list(dict.fromkeys(r["model"] for r in runs))
    raise LabscaleError(f"--judge '{label}' is not a model of this experiment",
                        f"{did_you_mean(label, labels)}use one of: {', '.join(labels)}")


def prompts_for(item: Item, mode: str) -> list[tuple[str, str, str | None]]:
    """(prompt text, left run, right run) per judge call for `item`."""
    base = {"instruction": item.instruction or "(none)", "input": item.input}
    if mode == "absolute":
        return [(ABSOLUTE_PROMPT.format(**DEFINITIONS, **base, output=item.outputs[0]), item.run_id, None)]
    a, b = item.outputs
    other = str(item.other_run_id)
    return [(PAIRWISE_PROMPT.format(**base, first=a, second=b), item.run_id, other),
            (PAIRWISE_PROMPT.format(**base, first=b, second=a), other, item.run_id)]


def run_judge(db: Path, label: str, mode: str, task: str | None, experiment: str | None,
              say: Callable[[str], None] = print) -> JudgeSummary:
    from labscale.engine.cache import Counts, GenerationCache
    from labscale.engine.store import open_store
    from labscale.models.base import DecodingParams
    from labscale.models.registry import resolve_model
    from labscale.rate.server import prepare

    exp_id, items = prepare(db, mode, task, experiment)
    store = open_store(db)
    try:
        spec = judge_spec(store, exp_id, label)
        backend = resolve_model(spec)
        info = backend.info
        calls, skipped = [], 0
        for item in items:
            for text, left, right in prompts_for(item, mode):
                rendered = backend.render([{"role": "user", "content": text}])
                tokens = backend.count_tokens(rendered)
                if info.context_known and tokens + JUDGE_MAX_NEW_TOKENS > info.context_length:
                    skipped += 1
                    continue
                calls.append((item, rendered, tokens, left, right))
        say(f"judge {label}: {len(items)} {mode} items, {len(calls)} prompts"
            + (f" ({skipped} longer than its context, skipped)" if skipped else ""))
        counts = Counts()
        cached = GenerationCache(store, counts).generate(
            backend, [(c[1], c[2]) for c in calls], DecodingParams(max_new_tokens=JUDGE_MAX_NEW_TOKENS),
            spec.batch_size)
        backend.close()
        row = store.start_rating_session(exp_id, f"judge:{label}", mode, task or "*", "judge", 0)
        rows, failures = [], 0
        for pos, ((item, _, _, left, right), key) in enumerate(zip(calls, cached.keys)):
            answer = cached.text(pos)
            if answer is None:
                continue  # the request failed: retried on the next run
            parsed = parse_grade(answer) if mode == "absolute" else parse_choice(answer)
            rating = parsed if mode == "absolute" or parsed is None else \
                {"first": "left", "second": "right"}.get(parsed, parsed)
            failures += rating is None
            rows.append({"position": pos, "item": key[:12], "example_id": item.example_id, "run_id": left,
                         "other_run_id": right, "rating": rating, "raw": answer})
        store.put_ratings(row["id"], rows)
    finally:
        store.close()
    return JudgeSummary(label, len(items), len(calls), failures, skipped, counts.new, counts.cached)
