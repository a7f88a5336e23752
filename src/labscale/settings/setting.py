"""Parse setting names and build prompts for one example.

Formats (the same for every model; chat models see them through their own chat template):

* generate / classify tasks — one user turn: ``{instruction}\n\n{input}``. few-shot:K adds K earlier
  user/assistant turns with train examples and their targets. cot appends the reasoning request and the
  answer-line rule; the final answer is read from the last line starting with ``Answer:``.
* multiple-choice, log-likelihood protocol — lm-evaluation-harness's plain format, so acc/acc_norm compare with
  published numbers: context = ``{input}`` (few-shot: K solved ``{input}{delimiter}{choice}`` blocks joined
  by a blank line first), continuation = ``{delimiter}{choice}``. No chat template, as in lm-eval's default.
* multiple-choice, generative protocol (cot, or backends without log-likelihoods) — the question with lettered
  options (A-Z: a task with more than 26 choices is a ConfigError here, before the database opens), answered with
  a letter; labscale.answers reads the letter back.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from labscale.errors import ConfigError, DataError, did_you_mean
from labscale.models.base import Message
from labscale.tasks.base import Task
from labscale.example import LETTERS, Example

# Bump when prompt construction changes, so stored runs are not mistaken for new ones (it is part of every run id
# and every adapter identity: fine-tuned models are trained on exactly these prompts).
PROMPT_FORMAT_VERSION = 1

COT_SUFFIX = (
    "Think step by step and explain your reasoning briefly. "
    'Then give your final answer on a last line that starts with "Answer:".'
)


@dataclass(frozen=True)
class Setting:
    name: str  # as written: "zero-shot", "few-shot:3", "cot"
    kind: str  # "zero-shot" | "few-shot" | "cot"
    shots: int = 0


_NUMBERS = {w: i for i, w in enumerate("one two three four five six seven eight nine ten".split(), 1)}


def parse_setting(name: str) -> Setting:
    if name in ("zero-shot", "cot"):
        return Setting(name, name)
    m = re.fullmatch(r"few-shot:(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return Setting(name, "few-shot", int(m.group(1)))
    raise ConfigError(f"unknown setting '{name}'", f"{_suggest_setting(name)}use zero-shot, few-shot:K (K >= 1) or cot")


def _suggest_setting(name: object) -> str:
    """"did you mean …? " for a misspelt setting: few-shot:K from "3-shot", "fewshot:3", "three-shot", …"""
    if not isinstance(name, str):
        return ""
    m = re.fullmatch(r"(?:few[-_ ]?shots?[-_: =]*)?(\d+|[a-z]+)[-_ ]?shots?|few[-_ ]?shots?[-_: =]*(\d+)",
                     name.strip().lower())
    if m:
        k = m.group(1) or m.group(2)
        k = int(k) if k.isdigit() else _NUMBERS.get(k)
        if k == 0:
            return "did you mean 'zero-shot'? "
        if k:
            return f"did you mean 'few-shot:{k}'? "
    return did_you_mean(name, ["zero-shot", "cot", "few-shot:1"])


def protocol_for(task: Task, setting: Setting, supports_loglikelihood: bool) -> str:
    """'loglikelihood' for multiple choice where the backend can score it (not cot), else 'generate'."""
    if task.type == "multiple_choice" and setting.kind != "cot" and supports_loglikelihood:
        return "loglikelihood"
    return "generate"


def check_shots(task: Task, setting: Setting) -> None:
    if setting.shots:
        n_train = len(task.splits["train"])
        if n_train == 0:
            raise DataError(
                f"{setting.name} needs {setting.shots} examples but task '{task.name}' has no train split",
                "use zero-shot, or give the task train data (e.g. `data: {train: train.jsonl, test: test.jsonl}`, "
                "or train rows in its split column)",
            )
        unlabelled = sum(1 for ex in task.splits["train"]
                         if (ex.gold is None if task.type == "multiple_choice" else not ex.target.strip()))
        if unlabelled:
            raise DataError(
                f"{setting.name} needs labelled train examples but {unlabelled} of task '{task.name}''s "
                f"{n_train} train examples have no target", "label them, or use zero-shot (an unlabelled train "
                "split is for a distillation teacher to label)")
        if setting.shots > n_train:
            raise DataError(
                f"{setting.name} needs {setting.shots} examples but task '{task.name}' has only {n_train} in its train split",
                f"use few-shot:{n_train} or fewer" if n_train else "use zero-shot, or give the task train examples",
            )


def select_shots(task: Task, setting: Setting, example: Example, seed: int) -> list[Example]:
    """K train examples, drawn per test example from (seed, example id): deterministic and independent of order."""
    if not setting.shots:
        return []
    check_shots(task, setting)
    rng = random.Random(f"{seed}:{task.name}:{example.id}")
    return rng.sample(task.splits["train"], setting.shots)


def check_letters(task: Task, example: Example) -> None:
    """The letter protocol names options A-Z: more choices than letters is an error while prompts are built."""
    if len(example.choices) > len(LETTERS):
        raise ConfigError(
            f"example '{example.id}' of task '{task.name}' has {len(example.choices)} choices, more than the "
            f"{len(LETTERS)} letters (A-Z) the letter protocol can name",
            "score it by log-likelihood (a local model and a setting other than cot) or give it at most 26 choices",
        )


def lettered(example: Example) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(example.choices))
    return f"{example.input}\n{options}"


def _user_text(task: Task, example: Example, mc_letters: bool) -> str:
    if mc_letters:
        check_letters(task, example)
    body = lettered(example) if mc_letters else example.input
    parts = [task.instruction, body] if task.instruction else [body]
    if mc_letters:
        letters = ", ".join(LETTERS[: len(example.choices)])
        parts.append(f"Answer with the letter of the correct option ({letters}).")
    return "\n\n".join(parts)


def _answer_text(task: Task, example: Example, mc_letters: bool) -> str:
    return LETTERS[example.gold] if mc_letters else example.target


Fit = Callable[[Example], Example]  # e.g. the input cut to max_input_tokens (settings/truncate.py)


def _as_is(example: Example) -> Example:
    return example


def chat_prompt(task: Task, setting: Setting, example: Example, seed: int, fit: Fit = _as_is) -> list[Message]:
    """Messages for the generative protocol (generate, classify, and lettered multiple choice). `fit` maps each
    example (the test example and every shot) before its input goes into the prompt."""
    mc = task.type == "multiple_choice"
    messages: list[Message] = []
    for shot in select_shots(task, setting, example, seed):
        shot = fit(shot)
        messages.append({"role": "user", "content": _user_text(task, shot, mc)})
        messages.append({"role": "assistant", "content": _answer_text(task, shot, mc)})
    text = _user_text(task, fit(example), mc)
    if setting.kind == "cot":
        text = f"{text}\n\n{COT_SUFFIX}"
    messages.append({"role": "user", "content": text})
    return messages


def loglikelihood_prompt(task: Task, setting: Setting, example: Example, seed: int,
                         fit: Fit = _as_is) -> tuple[str, list[str]]:
    """(context, continuations) in lm-evaluation-harness's format; `fit` as for chat_prompt."""
    blocks = [
        f"{s.input}{task.target_delimiter}{s.choices[s.gold]}"
        for s in map(fit, select_shots(task, setting, example, seed))
    ]
    context = task.fewshot_delimiter.join([*blocks, fit(example).input])
    return context, [f"{task.target_delimiter}{c}" for c in example.choices]
