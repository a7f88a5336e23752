"""Parse setting names and build prompts for one example.

Formats (the same for every model; chat models see them through their own chat template):

* generate / classify tasks — one user turn: ``{instruction}\n\n{input}``. few-shot:K adds K earlier
  user/assistant turns with train examples and their targets. cot appends the reasoning request and the
  answer-line rule; the final answer is read from the last line starting with ``Answer:``.
* multiple-choice, log-likelihood protocol — lm-evaluation-harness's plain format, so acc/acc_norm compare with
  published numbers: context = ``{input}`` (few-shot: K solved ``{input}{delimiter}{choice}`` blocks joined
  by a blank line first), continuation = ``{delimiter}{choice}``. No chat template, as in lm-eval's default.
* multiple-choice, generative protocol (cot, optimized, or backends without log-likelihoods) — the question with
  lettered options (A-Z: a task with more than 26 choices is a ConfigError here, before the database opens),
  answered with a letter; labscale.answers reads the letter back.
* rag:K[:retriever] — the zero-shot turn with the K retrieved passages before it, numbered so that an answer can
  cite them (RAG_TEMPLATE below): the closed-book prompt is unchanged and only the passage block is added, so
  zero-shot vs rag:K compares exactly "with or without the passages" (log-likelihood: the passage block, a blank
  line, then the input). The planner (engine/plan.py) retrieves them; nothing here searches.
* optimized[:fewshot|instruction|full[:T]] — a compiled prompt (adapt/compile.py): the zero-shot format with the
  compiled instruction in place of the task's and the compiled demonstrations as earlier user/assistant turns,
  fixed for every test example. Until compiled, the setting is `deferred` (planned after the adapt phase).
* a task's own fixed `demos` (a prompt exported by `labscale export-prompt`, or written by hand) come first, as
  user/assistant turns (solved blocks for log-likelihood), in every setting but a compiled one, which replaces them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

from labscale.errors import ConfigError, DataError, did_you_mean
from labscale.models.base import Message
from labscale.tasks.base import Task
from labscale.example import LETTERS, Demo, Example

# Bump when prompt construction changes, so stored runs are not mistaken for new ones (it is part of every run id
# and every adapter identity: fine-tuned models are trained on exactly these prompts).
PROMPT_FORMAT_VERSION = 1

COT_SUFFIX = (
    "Think step by step and explain your reasoning briefly. "
    'Then give your final answer on a last line that starts with "Answer:".'
)


DEFAULT_RETRIEVER = "bm25"
OPTIMIZE_MODES = ("fewshot", "instruction", "full")
DEFAULT_OPTIMIZE_MODE = "fewshot"
MAX_TRIALS = 256

# The rag prompt: the passages block, a blank line, then the zero-shot prompt ({instruction}, a blank line,
# {input}). Each passage is "[n] title" then its text on the next line (no title: "[n] text"); passages are
# separated by a blank line and numbered from 1 in retrieval order (best first), so an answer can cite "[1]".
# (Passages first, the instruction right before the input: with the instruction above the passages, the
# embedded 0.5B model lost the answer format and answered "no" to most questions.)
RAG_HEADER = "Passages:"
RAG_TEMPLATE = RAG_HEADER + "\n[1] {title}\n{text}\n\n[2] …\n\n{instruction}\n\n{input}"


@dataclass(frozen=True)
class Setting:
    name: str  # as written: "zero-shot", "few-shot:3", "cot", "rag:3", "optimized:fewshot"
    kind: str  # "zero-shot" | "few-shot" | "cot" | "rag" | "optimized"
    shots: int = 0
    passages: int = 0  # rag: K passages per example
    retriever: str = ""  # rag: the retriever's registry name
    mode: str = ""  # optimized: fewshot | instruction | full
    trials: int = 0  # optimized: the trial budget (0: the mode's default)
    instruction: str | None = None  # optimized, once compiled: the instruction (None: the task's own)
    demos: tuple[Demo, ...] = ()  # optimized, once compiled: the demonstrations
    compiled: str = ""  # optimized, once compiled: the compiled prompt's identity
    card: dict | None = field(default=None, compare=False, hash=False)  # compiled: provenance for the run record

    @property
    def deferred(self) -> bool:
        """An optimized setting not compiled yet: its runs are planned after the adapt phase compiles it."""
        return self.kind == "optimized" and not self.compiled


_NUMBERS = {w: i for i, w in enumerate("one two three four five six seven eight nine ten".split(), 1)}


SETTINGS_HINT = ("use zero-shot, few-shot:K (K >= 1), cot, rag:K[:bm25|dense] or "
                 "optimized[:fewshot|instruction|full[:T]]")


def parse_setting(name: str) -> Setting:
    if name in ("zero-shot", "cot"):
        return Setting(name, name)
    m = re.fullmatch(r"few-shot:(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return Setting(name, "few-shot", int(m.group(1)))
    if isinstance(name, str) and (name == "rag" or name.startswith("rag:")):
        return _parse_rag(name)
    if isinstance(name, str) and (name == "optimized" or name.startswith("optimized:")):
        return _parse_optimized(name)
    raise ConfigError(f"unknown setting '{name}'", f"{_suggest_setting(name)}{SETTINGS_HINT}")


def _parse_rag(name: str) -> Setting:
    """rag:K or rag:K:<retriever> (default bm25): K >= 1 passages, a registered retriever."""
    from labscale.retrieval.base import check_k
    from labscale.retrieval.index import check_retriever

    parts = name.split(":")
    if len(parts) not in (2, 3) or not re.fullmatch(r"-?\d+", parts[1]):
        raise ConfigError(f"unknown setting '{name}'", "write rag:K or rag:K:<retriever>, e.g. rag:3 or rag:3:dense")
    k = check_k(int(parts[1]))  # rag:0 → "retrieval needs k >= 1 passages per query, got 0 — use e.g. rag:3"
    retriever = check_retriever(parts[2]) if len(parts) == 3 else DEFAULT_RETRIEVER
    return Setting(name, "rag", passages=k, retriever=retriever)


def _parse_optimized(name: str) -> Setting:
    """optimized, optimized:<mode> or optimized:<mode>:<T> (T: the trial budget, 1..MAX_TRIALS)."""
    parts = name.split(":")
    mode = parts[1] if len(parts) > 1 else DEFAULT_OPTIMIZE_MODE
    if len(parts) > 3 or mode not in OPTIMIZE_MODES:
        raise ConfigError(f"unknown setting '{name}'", f"{did_you_mean(mode, OPTIMIZE_MODES)}write "
                          "optimized[:fewshot|instruction|full[:T]], e.g. optimized:fewshot:8")
    trials = 0
    if len(parts) == 3:
        if not re.fullmatch(r"\d+", parts[2]) or not 1 <= int(parts[2]) <= MAX_TRIALS:
            raise ConfigError(f"setting '{name}' has trial budget '{parts[2]}'",
                              f"use a whole number from 1 to {MAX_TRIALS}, e.g. optimized:{mode}:8")
        trials = int(parts[2])
    return Setting(name, "optimized", mode=mode, trials=trials)


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
    return did_you_mean(name, ["zero-shot", "cot", "few-shot:1", "rag:3", "optimized"])


def protocol_for(task: Task, setting: Setting, supports_loglikelihood: bool) -> str:
    """'loglikelihood' for multiple choice where the backend can score it (not cot, not optimized: a compiled
    instruction and demonstrated answers only exist in the generative protocol), else 'generate'."""
    if task.type == "multiple_choice" and setting.kind not in ("cot", "optimized") and supports_loglikelihood:
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


def passages_block(passages) -> str:
    """The numbered passages of a rag prompt (see RAG_TEMPLATE): `passages` are retrieval Hits, best first."""
    blocks = [f"[{i}] {p.title}\n{p.text}" if p.title else f"[{i}] {p.text}" for i, p in enumerate(passages, 1)]
    return RAG_HEADER + "\n" + "\n\n".join(blocks)


def _instruction(task: Task, setting: Setting | None) -> str:
    if setting is not None and setting.kind == "optimized" and setting.instruction is not None:
        return setting.instruction
    return task.instruction


def _user_text(task: Task, example: Example, mc_letters: bool, instruction: str | None = None,
               passages=None) -> str:
    if mc_letters:
        check_letters(task, example)
    body = lettered(example) if mc_letters and example.choices else example.input
    instruction = task.instruction if instruction is None else instruction
    parts = [] if passages is None else [passages_block(passages)]
    if instruction:
        parts.append(instruction)
    parts.append(body)
    if mc_letters and example.choices:
        letters = ", ".join(LETTERS[: len(example.choices)])
        parts.append(f"Answer with the letter of the correct option ({letters}).")
    return "\n\n".join(parts)


def _answer_text(task: Task, example: Example, mc_letters: bool) -> str:
    return LETTERS[example.gold] if mc_letters and example.gold is not None else example.target


def gold_answer(task: Task, example: Example) -> str:
    """The answer a labeled demonstration shows in the generative protocol: the option's letter for multiple choice
    (the letter protocol), else the target."""
    mc = task.type == "multiple_choice" and example.gold is not None
    return _answer_text(task, example, mc)


Fit = Callable[[Example], Example]  # e.g. the input cut to max_input_tokens (settings/truncate.py)


def _as_is(example: Example) -> Example:
    return example


def fixed_demos(task: Task, setting: Setting) -> tuple[Demo, ...]:
    """The demonstrations every prompt of this setting starts with: a compiled setting's own, else the task's."""
    if setting.kind == "optimized" and setting.compiled:
        return setting.demos
    return tuple(task.demos)


def chat_prompt(task: Task, setting: Setting, example: Example, seed: int, fit: Fit = _as_is,
                passages=None) -> list[Message]:
    """Messages for the generative protocol (generate, classify, and lettered multiple choice). `fit` maps each
    example (the test example and every shot) before its input goes into the prompt; `passages` (rag) are the
    retrieved Hits put between the instruction and the input."""
    mc = task.type == "multiple_choice"
    instruction = _instruction(task, setting)
    messages: list[Message] = []
    for demo in fixed_demos(task, setting):
        messages.append({"role": "user", "content": _user_text(task, fit(demo.example), mc, instruction)})
        messages.append({"role": "assistant", "content": demo.answer})
    for shot in select_shots(task, setting, example, seed):
        shot = fit(shot)
        messages.append({"role": "user", "content": _user_text(task, shot, mc, instruction)})
        messages.append({"role": "assistant", "content": _answer_text(task, shot, mc)})
    text = _user_text(task, fit(example), mc, instruction, passages)
    if setting.kind == "cot":
        text = f"{text}\n\n{COT_SUFFIX}"
    messages.append({"role": "user", "content": text})
    return messages


def loglikelihood_prompt(task: Task, setting: Setting, example: Example, seed: int,
                         fit: Fit = _as_is, passages=None) -> tuple[str, list[str]]:
    """(context, continuations) in lm-evaluation-harness's format; `fit` and `passages` as for chat_prompt (the
    passage block goes right before the test input)."""
    blocks = [f"{fit(d.example).input}{task.target_delimiter}{d.answer}" for d in fixed_demos(task, setting)]
    blocks += [
        f"{s.input}{task.target_delimiter}{s.choices[s.gold] if s.gold is not None else s.target}"
        for s in map(fit, select_shots(task, setting, example, seed))
    ]
    last = fit(example).input if passages is None else f"{passages_block(passages)}\n\n{fit(example).input}"
    context = task.fewshot_delimiter.join([*blocks, last])
    return context, [f"{task.target_delimiter}{c}" for c in example.choices]
