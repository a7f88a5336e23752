"""The Metric protocol.

A metric turns a run's outcomes into per-example statistics (an n × k array) and aggregates any subset of rows into
one number. Keeping per-example statistics (rather than one score) is what makes bootstrap CIs, paired bootstrap
between models, and re-reporting from the database possible for corpus-level metrics such as BLEU and weighted F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from labscale.example import UNPARSEABLE, Outcome

__all__ = ["UNPARSEABLE", "Metric", "Outcome", "mean_of_first_column", "nanmean_of_first_column"]

def mean_of_first_column(stats: np.ndarray) -> float:
    return float(np.mean(stats[:, 0]))


def nanmean_of_first_column(stats: np.ndarray) -> float:
    """Mean ignoring NaN rows; NaN when every row is NaN (a metric not defined for this run)."""
    col = stats[:, 0]
    return float("nan") if np.isnan(col).all() else float(np.nanmean(col))


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    per_example: Callable[[list[Outcome]], np.ndarray]  # -> (n, k) float array
    aggregate: Callable[[np.ndarray], float] = mean_of_first_column
    higher_is_better: bool = True
    # "performance", or a values family the report's Values section groups by: "bias", "abstention", "privacy".
    family: str = "performance"

    def stats(self, outcomes: list[Outcome]) -> np.ndarray:
        if not outcomes:
            raise ValueError(f"metric '{self.name}' needs at least one outcome")
        s = np.asarray(self.per_example(outcomes), dtype=float)
        return s.reshape(len(outcomes), -1)

    def score(self, outcomes: list[Outcome]) -> float:
        return self.aggregate(self.stats(outcomes))
