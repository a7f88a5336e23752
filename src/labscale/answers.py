"""Turn raw model output into an answer: a label, a choice, or the generated text.

Rules (documented in the README):
* cot: the answer is what follows the last ``Answer:`` (case-insensitive); without one the output is unparseable
  for classify / multiple-choice tasks and used whole for generate tasks.
* classify: the label mentioned first wins, matched case-insensitively on word boundaries with spaces, hyphens
  and underscores treated alike (``not enough info`` → NOT_ENOUGH_INFO); a task may list aliases per label
  (abstention-qa: ``cannot be answered`` → unanswerable). No label → unparseable.
* multiple choice (generative): in order, a letter opening the answer (``B``, ``B.``, ``(B)``), "answer is B",
  ``(B)`` anywhere, the full text of exactly one option, or exactly one standalone option letter. Else unparseable.
"""

from __future__ import annotations

import re

from labscale.example import LETTERS, UNPARSEABLE, Example
from labscale.tasks.base import Task

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """Text after the last 'Answer:' marker, or None when there is none."""
    marks = list(_ANSWER.finditer(text))
    if not marks:
        return None
    return text[marks[-1].end() :].strip().splitlines()[0].strip() if text[marks[-1].end() :].strip() else ""


def _label_pattern(label: str) -> re.Pattern:
    words = [re.escape(w) for w in re.split(r"[\s_\-]+", label.strip()) if w]
    return re.compile(r"(?<![A-Za-z0-9])" + r"[\s_\-]+".join(words) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def parse_label(text: str, labels: tuple[str, ...], aliases: dict[str, tuple[str, ...]] | None = None) -> str:
    """The label (or an alias of one, e.g. "cannot be answered" for UNANSWERABLE) mentioned first."""
    hits = []
    phrases = [(label, label) for label in labels]
    phrases += [(alias, label) for label, alias_list in (aliases or {}).items() for alias in alias_list]
    # Longer phrases first so that e.g. "NOT SUPPORTED" is not read as "SUPPORTED" at the same position.
    for phrase, label in sorted(phrases, key=lambda p: len(p[0]), reverse=True):
        m = _label_pattern(phrase).search(text)
        if m:
            hits.append((m.start(), -len(phrase), label))
    return min(hits)[2] if hits else UNPARSEABLE


def parse_choice(text: str, example: Example) -> str:
    letters = LETTERS[: len(example.choices)]
    text = text.strip()
    patterns = (
        rf"^\(?([{letters}])(?:[.,:)]|$)",  # "B", "B.", "(B)", "B)" at the start
        rf"answer(?: is)?\s*:?\s*\(?([{letters}])(?![A-Za-z0-9])",  # "the answer is B"
        rf"\(([{letters}])\)",  # "(B)" anywhere
    )
    for pattern in patterns:
        m = re.search(pattern, text, re.IGNORECASE if pattern.startswith("answer") else 0)
        if m:
            return example.choices[letters.index(m.group(1).upper())]
    found = [c for c in example.choices if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text, re.IGNORECASE)]
    if len(found) == 1:
        return found[0]
    # A lone capital letter elsewhere; "A" followed by a lowercase word is the article, not an option.
    alone = set(re.findall(rf"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])(?! [a-z])", text))
    return example.choices[letters.index(alone.pop())] if len(alone) == 1 else UNPARSEABLE


def parse_answer(task: Task, example: Example, output: str, cot: bool) -> str:
    text = output.strip()
    if cot:
        answer = final_answer(text)
        if answer is None:
            return text if task.type == "generate" else UNPARSEABLE
        text = answer
    if task.type == "classify":
        return parse_label(text, task.labels, task.label_aliases)
    if task.type == "multiple_choice":
        return parse_choice(text, example)
    return text
