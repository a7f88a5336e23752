"""Training examples rendered exactly as evaluation renders them: prompt tokens (masked) + completion tokens (loss).

The fine-tuned setting evaluates with the zero-shot prompt, so training uses that prompt too:

* generate / classify tasks (and multiple choice answered by letter): the prompt is `backend.render(chat_prompt(…))`
  tokenized by the backend's own encoding — the very tokens `generate` is fed. The completion is the assistant turn
  as the chat template renders it after that prompt (the answer plus the end-of-turn token), cut after the first
  EOS; a model without a chat template gets `" " + answer + eos`, following the plain `Assistant:` format.
* multiple choice scored by log-likelihood: lm-evaluation-harness's context and the gold continuation
  (`" " + choice`), tokenized as `loglikelihood` scores them (continuation tokens = encode(context +
  continuation) after encode(context)).

Nothing is truncated: an example longer than `max_seq_len` is skipped and counted.

Distillation (distill.py) trains on the same rendering with the teacher's answers as targets, under the `distilled`
setting (zero-shot prompts). With rationales, each example also gets an *explain* prompt (`encode_explain`): the
predict prompt plus a request to explain, whose completion is the teacher's rationale; rows carry a loss `weight`
(1 for plain fine-tuning, where nothing about the data or its digest changes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from labscale.errors import DataError
from labscale.models.hf import HFBackend
from labscale.settings.setting import Setting, chat_prompt, loglikelihood_prompt, protocol_for
from labscale.tasks.base import Task
from labscale.example import LETTERS, Example

FINETUNED = Setting("finetuned", "zero-shot")  # the setting fine-tuned runs appear under; prompts as zero-shot
DISTILLED = Setting("distilled", "zero-shot")  # the setting distilled students appear under; prompts as zero-shot
IGNORE = -100  # label of a token that carries no loss
EXPLAIN_REQUEST = "Explain the answer step by step."  # what turns a predict prompt into its explain prompt


@dataclass
class TrainExample:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens
    weight: float = 1.0  # loss weight of the row (rationale distillation: predict vs explain rows)

    @property
    def completion_tokens(self) -> int:
        return sum(t != IGNORE for t in self.labels)


@dataclass
class SplitData:
    split: str
    examples: list[TrainExample]
    skipped: list[str] = field(default_factory=list)  # ids of examples longer than max_seq_len

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def completion_tokens(self) -> int:
        return sum(e.completion_tokens for e in self.examples)

    def rows(self) -> list[dict]:
        """Rows for a `datasets.Dataset`: pre-tokenized, so TRL uses them as they are."""
        weighted = any(e.weight != 1.0 for e in self.examples)
        return [{"input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids),
                 **({"weight": e.weight} if weighted else {})} for e in self.examples]

    def summary(self) -> dict:
        lengths = [len(e.input_ids) for e in self.examples]
        return {"examples": len(self.examples), "skipped_too_long": len(self.skipped), "tokens": self.tokens,
                "completion_tokens": self.completion_tokens, "max_tokens": max(lengths, default=0),
                "mean_tokens": round(self.tokens / len(lengths), 1) if lengths else 0}


def _completion_ids(backend: HFBackend, messages: list[dict], answer: str) -> list[int]:
    tok = backend.tokenizer
    eos = tok.eos_token or ""
    prompt = backend.render(messages)
    text = None
    if getattr(tok, "chat_template", None):
        full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(prompt):
            text = full[len(prompt):]
    if text is None:  # no template (plain format), or a template that renders history differently
        text = (answer if getattr(tok, "chat_template", None) else " " + answer) + eos
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stops = {tok.eos_token_id} - {None}
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids[: cut + 1] if cut is not None else ids


def has_target(task: Task, example: Example) -> bool:
    """Whether an example carries a gold answer (a user task's train rows may be unlabelled, for a teacher)."""
    return example.gold is not None if task.type == "multiple_choice" else bool(example.target.strip())


def encode_example(backend: HFBackend, task: Task, example: Example, seed: int) -> tuple[list[int], list[int]]:
    """(prompt token ids, completion token ids) for one example, as evaluation sees the prompt."""
    if not has_target(task, example):
        raise DataError(f"example '{example.id}' of task '{task.name}' has no target to train on",
                        "fine-tuning needs gold targets in the train split; distil with a teacher instead "
                        "(method: distill, see docs/distill.md)")
    protocol = protocol_for(task, FINETUNED, backend.supports_loglikelihood)
    if protocol == "loglikelihood":
        context, continuations = loglikelihood_prompt(task, FINETUNED, example, seed)
        return backend.encode_pair(context, continuations[example.gold])
    messages = chat_prompt(task, FINETUNED, example, seed)
    answer = LETTERS[example.gold] if task.type == "multiple_choice" else example.target
    return backend.encode(backend.render(messages)), _completion_ids(backend, messages, answer)


def encode_explain(backend: HFBackend, task: Task, example: Example, seed: int,
                   rationale: str) -> tuple[list[int], list[int]]:
    """(prompt, completion) token ids of an example's explain prompt: the predict prompt (as encode_example
    builds it) asking for an explanation, completed by `rationale` — a chat turn ending in `EXPLAIN_REQUEST`, or,
    under the log-likelihood protocol's plain format, the context followed by a line `Explanation:`."""
    protocol = protocol_for(task, DISTILLED, backend.supports_loglikelihood)
    if protocol == "loglikelihood":
        context, _ = loglikelihood_prompt(task, DISTILLED, example, seed)
        prompt, completion = backend.encode_pair(f"{context}\nExplanation:", " " + rationale)
        eos = backend.tokenizer.eos_token_id
        return prompt, completion + ([eos] if eos is not None else [])
    messages = chat_prompt(task, DISTILLED, example, seed)
    messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{EXPLAIN_REQUEST}"}
    return backend.encode(backend.render(messages)), _completion_ids(backend, messages, rationale)


def build_split(backend: HFBackend, task: Task, split: str, seed: int, max_seq_len: int,
                limit: int | None = None) -> SplitData:
    """Every example of `split` (the first `limit` of them) as a training example; those longer than
    `max_seq_len` are skipped."""
    data = SplitData(split, [])
    for ex in task.split(split, limit):
        prompt, completion = encode_example(backend, task, ex, seed)
        if not completion:
            raise DataError(f"example '{ex.id}' of task '{task.name}' has an empty target", "fix the data")
        if len(prompt) + len(completion) > max_seq_len:
            data.skipped.append(ex.id)
            continue
        data.examples.append(TrainExample(ex.id, prompt + completion, [IGNORE] * len(prompt) + completion))
    if not data.examples:
        raise DataError(
            f"every {split} example of task '{task.name}' is longer than max_seq_len={max_seq_len} tokens",
            "raise it with --set max_seq_len=N",
        )
    return data


def digest(*splits: SplitData) -> str:
    """Hash of the exact training and validation token sequences."""
    h = hashlib.sha256()
    for s in splits:
        h.update(json.dumps([s.split, [(e.id, e.input_ids, e.labels, *([e.weight] if e.weight != 1.0 else []))
                                       for e in s.examples]]).encode())
    return h.hexdigest()[:16]
