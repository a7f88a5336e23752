"""Multiple-choice acc / acc_norm, following lm-evaluation-harness.

lm-eval (lm_eval/api/task.py, multiple_choice `process_results`) computes
    completion_len = np.array([float(len(i)) for i in choices])
    pred = np.argmax(lls); pred_norm = np.argmax(lls / completion_len)
i.e. acc_norm divides each choice's summed log-likelihood by the choice text's length in characters (without the
target delimiter). np.argmax keeps the first maximum on ties, as there.

Without log-probabilities (a generative protocol, where the prediction is the choice text parsed from the model's
answer) acc compares that text with the gold choice and acc_norm is undefined: NaN rows, whose aggregate is NaN.
"""

from __future__ import annotations

import numpy as np

from labscale.metrics.base import Metric
from labscale.example import Outcome
from labscale.metrics.base import mean_of_first_column, nanmean_of_first_column


def _acc_one(o: Outcome) -> float:
    if o.failed is not None:
        return 0.0
    if o.logprobs is not None:
        return float(int(np.argmax(o.logprobs)) == o.example.gold)
    return float(o.example.gold is not None and o.prediction == o.example.choices[o.example.gold])


def _acc(outcomes: list[Outcome]) -> np.ndarray:
    return np.array([_acc_one(o) for o in outcomes], dtype=float)


def _acc_norm(outcomes: list[Outcome]) -> np.ndarray:
    # A run is log-likelihood scored when any outcome carries logprobs; its failed outcomes then score 0, not NaN.
    scored = any(o.logprobs is not None for o in outcomes)
    rows = []
    for o in outcomes:
        if o.logprobs is None:
            rows.append(0.0 if scored else float("nan"))
            continue
        lengths = np.array([float(len(c)) for c in o.example.choices])
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice text, as in lm-eval
            pred_norm = int(np.argmax(np.asarray(o.logprobs, dtype=float) / lengths))
        rows.append(float(o.failed is None and pred_norm == o.example.gold))
    return np.array(rows, dtype=float)


METRICS = [
    Metric(
        "acc",
        "multiple-choice accuracy (argmax of summed log-probabilities, or the parsed choice)",
        _acc,
        mean_of_first_column,
    ),
    Metric(
        "acc_norm",
        "multiple-choice accuracy with log-probabilities divided by choice length in characters (lm-eval); "
        "undefined without log-probabilities",
        _acc_norm,
        nanmean_of_first_column,
    ),
]
