"""Yes/no matching metrics (entity resolution and any other yes/no classify task).

Positive class: the label "yes", compared case-insensitively after stripping whitespace, on both the target and the
prediction. A failed request or an unparseable answer is a prediction other than "yes", so it can only be a false
negative (when the target is "yes"), never a true or false positive: not answering is not matching.

* `precision` = TP / (TP + FP), `recall` = TP / (TP + FN), `f1` = 2 TP / (2 TP + FP + FN) — scikit-learn's
  `precision_score` / `recall_score` / `f1_score` with pos_label "yes". They are corpus metrics, so each example
  keeps the columns (tp, fp, fn) and the aggregate sums them over whatever rows the bootstrap or a group breakdown
  picks. A zero denominator (no predicted positives for precision, no positive targets for recall, neither for
  f1) gives NaN — undefined, not 0 (scikit-learn's zero_division=np.nan).

Answer format, as the Lab-Scale study reported it for entity resolution; the three rates sum to 1:

* `clean_answer_rate`: the raw output is exactly one label — equal to the parsed label ignoring case, surrounding
  whitespace and final punctuation (. ! ? , ; :), e.g. "yes", " No.", "YES!".
* `resolvable_rate`: not clean, but a label could be parsed (the first label mentioned, see `answers.py`), e.g.
  "Yes, they are the same person".
* `unresolvable_rate`: no label could be parsed, or the request failed, e.g. "maybe".

The format rates look at the raw output, so under chain-of-thought (where the output holds the reasoning too) an
answer is at best resolvable: that is the point — they measure whether a model follows "answer with one word".
"""

from __future__ import annotations

import numpy as np

from labscale.metrics.base import Metric, mean_of_first_column
from labscale.example import UNPARSEABLE, Outcome

POSITIVE = "yes"
_FINAL_PUNCTUATION = ".!?,;:"


def _is_yes(label: str) -> bool:
    return label.strip().lower() == POSITIVE


def _confusion(outcomes: list[Outcome]) -> np.ndarray:
    """Rows (tp, fp, fn), one per example."""
    rows = []
    for o in outcomes:
        true = _is_yes(o.example.target)
        pred = o.failed is None and _is_yes(o.prediction)
        rows.append((true and pred, pred and not true, true and not pred))
    return np.array(rows, dtype=float).reshape(len(outcomes), 3)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _precision(stats: np.ndarray) -> float:
    tp, fp, _ = stats.sum(axis=0)
    return _ratio(tp, tp + fp)


def _recall(stats: np.ndarray) -> float:
    tp, _, fn = stats.sum(axis=0)
    return _ratio(tp, tp + fn)


def _f1(stats: np.ndarray) -> float:
    tp, fp, fn = stats.sum(axis=0)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def answer_format(o: Outcome) -> str:
    """'clean', 'resolvable' or 'unresolvable' (definitions in the module docstring)."""
    if o.failed is not None or o.prediction == UNPARSEABLE:
        return "unresolvable"
    text = o.output.strip().rstrip(_FINAL_PUNCTUATION).strip()
    return "clean" if text.lower() == o.prediction.strip().lower() else "resolvable"


def _format_is(kind: str):
    def per_example(outcomes: list[Outcome]) -> np.ndarray:
        return np.array([answer_format(o) == kind for o in outcomes], dtype=float)

    return per_example


METRICS = [
    Metric("precision", 'share of "yes" answers whose target is "yes" (NaN without any "yes" answer)',
           _confusion, _precision),
    Metric("recall", 'share of "yes" targets answered "yes"; unparseable or failed answers are misses',
           _confusion, _recall),
    Metric("f1", 'F1 of the class "yes": 2TP / (2TP + FP + FN)', _confusion, _f1),
    Metric("clean_answer_rate", "share of outputs that are exactly one label (ignoring case, whitespace, final "
           "punctuation)", _format_is("clean"), mean_of_first_column),
    Metric("resolvable_rate", "share of outputs that are not clean but name a label", _format_is("resolvable"),
           mean_of_first_column),
    Metric("unresolvable_rate", "share of outputs that name no label, or failed requests", _format_is("unresolvable"),
           mean_of_first_column, higher_is_better=False),
]
