"""Rating statistics against published values and a reference library: Krippendorff's α on Krippendorff's own
worked example, Bradley–Terry (Hunter's MM) against choix and a closed form; win rates, canonical pairs,
consistency, the judge's answer parsing."""

from __future__ import annotations

import numpy as np
import pytest

from labscale.rate import stats
from labscale.rate.judge import parse_choice, parse_grade

NA = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 observers × 12 units example
# (values 1-5, missing where an observer gave none). Published: nominal 0.743, ordinal 0.815.
KRIPPENDORFF_2011 = [[1, 2, 3, 3, 2, 1, 4, 1, 2, NA, NA, NA], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NA, 3],
                     [NA, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NA], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NA]]


def _units(matrix):
    units = {}
    for r, row in enumerate(matrix):
        for u, v in enumerate(row):
            if v is not None:
                units.setdefault(u, {})[f"rater{r}"] = v
    return units


def test_alpha_matches_krippendorffs_worked_example():
    units = _units(KRIPPENDORFF_2011)
    assert stats.alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert stats.alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)


def test_alpha_undefined_cases():
    assert stats.alpha({1: {"r": 1}, 2: {"r": 2}}, "ordinal") is None  # one rater
    assert stats.alpha({1: {"r": 1, "s": 1}, 2: {"r": 1, "s": 1}}, "nominal") is None  # one value only
    assert stats.alpha({1: {"r": 1, "s": 1}, 2: {"r": 2, "s": 2}}, "nominal") == pytest.approx(1.0)


def test_bradley_terry_mm_matches_choix():
    choix = pytest.importorskip("choix", reason="choix (the reference implementation) is a dev dependency")
    rng = np.random.default_rng(3)
    true = np.array([2.0, 1.0, 0.5, 0.2])
    data = []
    for _ in range(400):
        i, j = rng.choice(4, 2, replace=False)
        data.append((i, j) if rng.random() < true[i] / (true[i] + true[j]) else (j, i))
    wins = np.zeros((4, 4))
    for w, l in data:
        wins[w, l] += 1
    pi = stats.bt_fit(wins)
    ref = np.exp(choix.mm_pairwise(4, data, tol=1e-12, max_iter=100_000))
    np.testing.assert_allclose(pi, ref / ref.sum(), rtol=1e-6)
    ref_ilsr = np.exp(choix.ilsr_pairwise(4, data, tol=1e-12))
    np.testing.assert_allclose(pi, ref_ilsr / ref_ilsr.sum(), rtol=1e-5)


def test_bradley_terry_closed_form_two_players():
    # A beats B 3 times of 4: the MLE is pi_A / (pi_A + pi_B) = 3/4
    pi = stats.bt_fit(np.array([[0, 3], [1, 0]]))
    assert pi == pytest.approx([0.75, 0.25], abs=1e-9)


def test_pairwise_ties_half_and_regularised_when_unbeaten():
    outcomes = [("a", "b", "a")] * 3 + [("a", "b", "tie")] + [("b", "c", "a")] * 2 + [("b", "c", "both_bad")]
    res = stats.pairwise(outcomes, n_boot=200, seed=0)
    assert res.win_rate["a"][0] == pytest.approx(3.5 / 4)
    assert res.win_rate["c"][0] == pytest.approx(0.5 / 3)
    assert res.both_bad == pytest.approx(1 / 7)
    assert not res.regularised  # ties connect both ways
    assert res.strength["a"][0] > res.strength["b"][0] > res.strength["c"][0]
    for lo_v_hi in res.strength.values():
        assert lo_v_hi[1] <= lo_v_hi[0] <= lo_v_hi[2] or np.isclose(lo_v_hi[1], lo_v_hi[0])
    unbeaten = stats.pairwise([("a", "b", "a")] * 4, n_boot=50)
    assert unbeaten.regularised and unbeaten.strength["a"][0] == pytest.approx(4.5 / 5)


def test_canonical_pairs_whatever_the_side():
    assert stats.canonical("r2", "r1", "left") == ("r1", "r2", "b")
    assert stats.canonical("r1", "r2", "left") == ("r1", "r2", "a")
    assert stats.canonical("r2", "r1", "right") == ("r1", "r2", "a")
    assert stats.canonical("r2", "r1", "tie") == ("r1", "r2", "tie")


def test_consistency_and_majority():
    value, low, high, n = stats.consistency([("A", "A"), ("B", "C"), ("D", "D"), ("A", "A")], 500, 0)
    assert value == 0.75 and n == 4 and 0 <= low <= 0.75 <= high <= 1
    assert stats.majority(["A", "B", "A"]) == "A" and stats.majority(["A", "B"]) is None


@pytest.mark.parametrize("text, grade", [("B", "B"), (" Grade: C.", "C"), ("(A) because it is right", "A"),
                                         ("I think D", "D"), ("Excellent", None), ("", None)])
def test_parse_grade(text, grade):
    assert parse_grade(text) == grade


@pytest.mark.parametrize("text, choice", [("1", "first"), ("Response 2", "second"), ("It's a tie", "tie"), ("Both bad.", "both_bad"), ("no idea", None),
                                          ("12", None)])
def test_parse_choice(text, choice):
    assert parse_choice(text) == choice
