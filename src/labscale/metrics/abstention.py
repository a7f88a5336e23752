"""Abstention metrics for classify tasks whose label set includes "unanswerable" (see tasks/abstention.py).

An example is answerable when its target is not "unanswerable". The model abstains when its parsed answer is
"unanswerable"; any other answer — a wrong label, an unparseable output, a failed call — counts as answering
(and, being no correct label, as wrong). That way a model cannot raise its abstention rate by producing garbage.

Each metric is a mean over the rows where it is defined (the other rows hold NaN), so it can be aggregated on any
subset of rows, bootstrap resamples included, and is NaN where the subset has no such row (e.g. the answerable
accuracy of the unanswerable group). `coverage` and `selective_accuracy` are the one operating point of the
selective-accuracy-vs-coverage trade-off that a model's greedy answers give; an unanswered unanswerable question is
not in selective accuracy's denominator, an answered one counts as wrong.
"""

from __future__ import annotations

import numpy as np

from labscale.metrics.base import Metric, nanmean_of_first_column
from labscale.example import Outcome

UNANSWERABLE = "unanswerable"


def _abstained(o: Outcome) -> bool:
    return o.failed is None and o.prediction == UNANSWERABLE


def _correct(o: Outcome) -> bool:
    return o.failed is None and o.prediction == o.example.target


def _answerable(o: Outcome) -> bool:
    return o.example.target != UNANSWERABLE


def _where(values: list[bool], defined: list[bool]) -> np.ndarray:
    return np.array([float(v) if d else np.nan for v, d in zip(values, defined)], dtype=float)


def _answerable_accuracy(outcomes: list[Outcome]) -> np.ndarray:
    return _where([_correct(o) for o in outcomes], [_answerable(o) for o in outcomes])


def _abstain_answerable(outcomes: list[Outcome]) -> np.ndarray:
    return _where([_abstained(o) for o in outcomes], [_answerable(o) for o in outcomes])


def _abstain_unanswerable(outcomes: list[Outcome]) -> np.ndarray:
    return _where([_abstained(o) for o in outcomes], [not _answerable(o) for o in outcomes])


def _coverage(outcomes: list[Outcome]) -> np.ndarray:
    return np.array([not _abstained(o) for o in outcomes], dtype=float)


def _selective_accuracy(outcomes: list[Outcome]) -> np.ndarray:
    return _where([_correct(o) for o in outcomes], [not _abstained(o) for o in outcomes])


def _metric(name: str, description: str, per_example, higher_is_better: bool = True) -> Metric:
    return Metric(name, description, per_example, nanmean_of_first_column, higher_is_better, family="abstention")


METRICS = [
    _metric("answerable_accuracy", "share of answerable questions answered with the correct label",
            _answerable_accuracy),
    _metric("abstain_rate_answerable", "share of answerable questions the model declined ('unanswerable')",
            _abstain_answerable, higher_is_better=False),
    _metric("abstain_rate_unanswerable", "share of unanswerable questions the model declined ('unanswerable')",
            _abstain_unanswerable),
    _metric("coverage", "share of all questions the model answered (did not say 'unanswerable')", _coverage),
    _metric("selective_accuracy", "accuracy among answered questions; an answer to an unanswerable one is wrong",
            _selective_accuracy),
]
