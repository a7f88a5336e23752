"""The data every layer shares: an `Example` a task yields and the `Outcome` a model produced for it.

Tasks build examples, settings turn them into prompts, metrics score outcomes: keeping both types here (and not in
`tasks/` or `metrics/`) means neither of those packages has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labscale.retrieval.base import Hit

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # multiple-choice option letters (the letter protocol)


@dataclass(frozen=True)
class Example:
    """One evaluation item.

    `input` is the filled-in task input (without the instruction); `target` the reference text, gold label or gold
    choice text. Multiple-choice items also carry `choices` and the `gold` index. Examples that share a `group`
    (e.g. claims built from the same article) always land in the same split, so nothing leaks from train to test.
    """

    id: str
    input: str
    target: str
    choices: tuple[str, ...] = ()
    gold: int | None = None
    group: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Demo:
    """A demonstration shown before a prompt's input: the example's user turn and the answer shown for it.

    kind: "labeled" (the example's gold answer), "bootstrapped" (a teacher's output that the task metric accepted,
    as in BootstrapFewShot) or "fixed" (a task's own `demos`, e.g. an exported compiled prompt)."""

    example: Example
    answer: str
    kind: str = "labeled"


UNPARSEABLE = "<unparseable>"


@dataclass
class Outcome:
    """What a model produced for one example.

    `output` is the raw generation ("" for log-likelihood scoring); `prediction` the parsed answer: the summary
    text, a label from the task's label set, a choice text, or UNPARSEABLE. `logprobs` holds one
    summed log-probability per choice when the multiple-choice task was scored by log-likelihood. `retrieved` holds
    the passages a retrieval setting (rag:K) put in the prompt, best first (None when nothing was retrieved); the
    retrieval metrics (recall@K, MRR, faithfulness) read it together with `example.meta["gold_passage"]`.
    """

    example: Example
    output: str
    prediction: str
    logprobs: list[float] | None = None
    failed: str | None = None  # reason, when the model call failed (scored as wrong)
    retrieved: list[Hit] | None = None
