"""Statistics of human (and LLM-judge) ratings: grade distributions, win rates, Bradley–Terry strengths, inter-rater
agreement (Krippendorff's α) and intra-rater consistency.

- Absolute ratings are the grades A > B > C > D of Wang et al.'s self-instruct / LaMini human evaluation. Each
  grade's share per run gets a 95% percentile-bootstrap CI over the run's ratings (metrics/stats.py).
- Pairwise ratings (left better / right better / tie / both bad) are read per unordered pair of runs. A win counts
  1 for the winner; a tie and "both bad" count ½ for each (no preference) in win rates and Bradley–Terry.
- Bradley–Terry (P(i beats j) = π_i / (π_i + π_j)) is fitted by the MM algorithm of Hunter (2004), "MM algorithms
  for generalized Bradley–Terry models", Ann. Statist. 32(1), eq. (3): π_i ← W_i / Σ_j n_ij / (π_i + π_j), with
  W_i the wins of i and n_ij the comparisons of i and j, renormalised to Σπ = 1 each step. The maximum-likelihood
  estimate exists only when the comparison graph is strongly connected (Hunter's Assumption 1: no group of runs
  never loses to the others); otherwise `PRIOR` virtual half-wins are added in both directions of every compared
  pair (a standard regulariser) and the result says so. CIs: percentile bootstrap over comparisons (a resample
  that is not strongly connected is regularised the same way).
- Krippendorff's α comes from the `krippendorff` package: ordinal for A–D, nominal for pairwise outcomes. Units
  are items (a run's output for an example; a pair's outputs for an example), values the raters' first ratings
  (consistency repeats are left out).
- Intra-rater consistency: the share of repeated items a rater rated the same way both times (bootstrap CI).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GRADES = ("A", "B", "C", "D")
GRADE_VALUE = {"A": 4, "B": 3, "C": 2, "D": 1}  # ordinal: A best
PAIR_CHOICES = ("left", "right", "tie", "both_bad")
PRIOR = 0.5


def share_ci(indicator: list[float], n_boot: int, seed: int) -> tuple[float | None, float | None, float | None]:
    """Mean of a 0/1 list with its 95% percentile-bootstrap CI (None for an empty list)."""
    from labscale.metrics.base import mean_of_first_column
    from labscale.metrics.stats import bootstrap_ci

    if not indicator:
        return None, None, None
    stats = np.asarray(indicator, dtype=float).reshape(-1, 1)
    low, high = bootstrap_ci(stats, mean_of_first_column, n_boot=n_boot, seed=seed)
    return float(stats.mean()), low, high


def alpha(units: dict, level: Literal["nominal", "ordinal"]) -> float | None:
    """Krippendorff's α over {unit: {rater: value}} (values numeric codes); None when it is undefined (fewer than
    two raters on any unit, or a single value overall)."""
    import krippendorff

    raters = sorted({r for ratings in units.values() for r in ratings})
    pairable = [u for u, ratings in units.items() if len(ratings) >= 2]
    if len(raters) < 2 or not pairable:
        return None
    values = {v for u in pairable for v in units[u].values()}
    if len(values) < 2:
        return None
    keys = sorted(units, key=str)
    data = np.full((len(raters), len(keys)), np.nan)
    for j, u in enumerate(keys):
        for i, r in enumerate(raters):
            if r in units[u]:
                data[i, j] = units[u][r]
    try:
        a = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    except (ValueError, ZeroDivisionError):
        return None
    return None if math.isnan(a) else a


# -- Bradley–Terry -----------------------------------------------------------------------------------------------


def _strongly_connected(wins: np.ndarray) -> bool:
    """Every item reaches every other along "i beat j" edges (Hunter's Assumption 1)."""
    k = len(wins)
    adj = wins > 0
    for start in range(k):
        seen, todo = {start}, [start]
        while todo:
            i = todo.pop()
            for j in np.nonzero(adj[i])[0]:
                if j not in seen:
                    seen.add(int(j))
                    todo.append(int(j))
        if len(seen) < k:
            return False
    return True


def bt_fit(wins: np.ndarray, prior: float = 0.0, tol: float = 1e-10, max_iter: int = 100_000) -> np.ndarray:
    """Bradley–Terry strengths π (Σπ = 1) from a wins matrix (wins[i, j]: i over j; ties as ½ each way) by
    Hunter's MM iteration. `prior` virtual wins are added both ways to every compared pair."""
    w = np.asarray(wins, dtype=float).copy()
    k = len(w)
    if prior:
        compared = (w + w.T) > 0
        w = w + prior * compared
    n = w + w.T
    total = w.sum(axis=1)
    pi = np.full(k, 1.0 / k)
    for _ in range(max_iter):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(n > 0, n / (pi[:, None] + pi[None, :]), 0.0)
        denom = np.nan_to_num(ratio).sum(axis=1)
        new = np.where(denom > 0, total / np.where(denom > 0, denom, 1.0), pi)
        new = new / new.sum()
        if np.max(np.abs(new - pi)) < tol:
            return new
        pi = new
    return pi


@dataclass
class PairwiseResult:
    players: list[str]
    comparisons: int
    strength: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # π and its CI
    win_rate: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    games: dict[str, int] = field(default_factory=dict)
    both_bad: float | None = None  # share of comparisons rated "both bad"
    regularised: bool = False


def _wins(players: list[str], outcomes: list[tuple[str, str, str]]) -> np.ndarray:
    """outcomes: (run a, run b, 'a' | 'b' | 'tie' | 'both_bad')."""
    idx = {p: i for i, p in enumerate(players)}
    w = np.zeros((len(players), len(players)))
    for a, b, o in outcomes:
        i, j = idx[a], idx[b]
        if o == "a":
            w[i, j] += 1
        elif o == "b":
            w[j, i] += 1
        else:
            w[i, j] += 0.5
            w[j, i] += 0.5
    return w


def _win_rates(players: list[str], w: np.ndarray) -> np.ndarray:
    games = (w + w.T).sum(axis=1)
    return np.where(games > 0, w.sum(axis=1) / np.where(games > 0, games, 1), np.nan)


def pairwise(outcomes: list[tuple[str, str, str]], n_boot: int = 1000, seed: int = 0) -> PairwiseResult:
    """Win rates and Bradley–Terry strengths with bootstrap CIs from pairwise outcomes (see `_wins`)."""
    players = sorted({p for a, b, _ in outcomes for p in (a, b)})
    res = PairwiseResult(players, len(outcomes))
    if not outcomes:
        return res
    w = _wins(players, outcomes)
    prior = 0.0 if _strongly_connected(w) else PRIOR
    res.regularised = prior > 0
    pi = bt_fit(w, prior)
    rates = _win_rates(players, w)
    rng = np.random.default_rng(seed)
    boot_pi, boot_rate = [], []
    for _ in range(n_boot):
        sample = [outcomes[i] for i in rng.integers(0, len(outcomes), len(outcomes))]
        ws = _wins(players, sample)
        # a resample may lose connectivity (a run that never lost in it): regularised like the full data would be
        boot_pi.append(bt_fit(ws, prior or (0.0 if _strongly_connected(ws) else PRIOR), tol=1e-8))
        boot_rate.append(_win_rates(players, ws))
    bp, br = np.array(boot_pi), np.array(boot_rate)
    for i, p in enumerate(players):
        s_lo, s_hi = np.nanpercentile(bp[:, i], [2.5, 97.5])
        res.strength[p] = (float(pi[i]), float(s_lo), float(s_hi))
        col = br[:, i][~np.isnan(br[:, i])]
        lo, hi = (np.percentile(col, [2.5, 97.5]) if len(col) else (math.nan, math.nan))
        res.win_rate[p] = (float(rates[i]), float(lo), float(hi))
        res.games[p] = int(sum(1 for a, b, _ in outcomes if p in (a, b)))
    res.both_bad = sum(o == "both_bad" for _, _, o in outcomes) / len(outcomes)
    return res


# -- reading stored ratings --------------------------------------------------------------------------------------


def canonical(left: str, right: str, choice: str) -> tuple[str, str, str]:
    """A pairwise rating as (run a, run b, outcome) with a < b, whichever side each was shown on."""
    a, b = sorted((left, right))
    if choice == "left":
        return a, b, "a" if left == a else "b"
    if choice == "right":
        return a, b, "a" if right == a else "b"
    return a, b, choice


OUTCOME_CODE = {"a": 0, "b": 1, "tie": 2, "both_bad": 3}


def consistency(pairs: list[tuple[str, str]], n_boot: int, seed: int) -> tuple[float | None, float | None,
                                                                                 float | None, int]:
    """(share of repeats rated as the first time, CI low, CI high, repeats)."""
    same = [1.0 if a == b else 0.0 for a, b in pairs]
    return (*share_ci(same, n_boot, seed), len(pairs))


def majority(values: list) -> object | None:
    """The most frequent value; None on a tie for first place."""
    counts: dict = defaultdict(int)
    for v in values:
        counts[v] += 1
    if not counts:
        return None
    best = max(counts.values())
    top = [v for v, c in counts.items() if c == best]
    return top[0] if len(top) == 1 else None
