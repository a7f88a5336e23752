"""Label metrics. An UNPARSEABLE prediction stays a prediction (a label no target has), so it counts as a miss."""

from __future__ import annotations

import numpy as np

from labscale.metrics.base import Metric
from labscale.example import UNPARSEABLE, Outcome
from labscale.metrics.base import mean_of_first_column


def _label(o: Outcome) -> str:
    return UNPARSEABLE if o.failed is not None else o.prediction


def _accuracy(outcomes: list[Outcome]) -> np.ndarray:
    return np.array([o.failed is None and o.prediction == o.example.target for o in outcomes], dtype=float)


def _unparseable(outcomes: list[Outcome]) -> np.ndarray:
    return np.array([o.prediction == UNPARSEABLE for o in outcomes], dtype=float)


def _f1_codes(outcomes: list[Outcome]) -> np.ndarray:
    """Rows (true code, predicted code); codes index the sorted set of every label seen, so their order follows
    the labels' order and weighted F1 over codes equals weighted F1 over the strings."""
    trues = [o.example.target for o in outcomes]
    preds = [_label(o) for o in outcomes]
    code = {label: i for i, label in enumerate(sorted(set(trues) | set(preds)))}
    return np.array([[code[t], code[p]] for t, p in zip(trues, preds)], dtype=float).reshape(len(outcomes), 2)


def _f1_weighted(stats: np.ndarray) -> float:
    """scikit-learn's f1_score(average="weighted", labels=<labels in y_true>, zero_division=0), from the confusion
    counts directly: the bootstrap calls this 1000 times per run, and sklearn's per-call overhead dominated
    scoring. tests/test_metrics.py checks equality with sklearn."""
    y_true, y_pred = stats[:, 0].astype(np.int64), stats[:, 1].astype(np.int64)
    k = int(max(y_true.max(), y_pred.max())) + 1
    support = np.bincount(y_true, minlength=k).astype(float)
    predicted = np.bincount(y_pred, minlength=k).astype(float)
    tp = np.bincount(y_true[y_true == y_pred], minlength=k).astype(float)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(np.sum(f1 * support) / support.sum())


METRICS = [
    Metric("accuracy", "share of predictions equal to the target", _accuracy, mean_of_first_column),
    Metric(
        "f1_weighted",
        "support-weighted F1 over the labels present in the targets (scikit-learn); unparseable answers are misses",
        _f1_codes,
        _f1_weighted,
    ),
    Metric(
        "unparseable_rate",
        "share of outputs from which no answer could be parsed",
        _unparseable,
        mean_of_first_column,
        higher_is_better=False,
    ),
]
