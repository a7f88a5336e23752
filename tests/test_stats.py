
import numpy as np
import pytest

from labscale.metrics.base import Metric
from labscale.example import Example, Outcome
from labscale.metrics.registry import get_metric
from labscale.metrics.stats import bootstrap_ci, mean_of_first_column, paired_bootstrap


def binary(n, p, seed=1):
    return (np.random.default_rng(seed).random(n) < p).astype(float).reshape(-1, 1)


def test_ci_contains_point_and_is_deterministic():
    stats = binary(200, 0.7)
    point = mean_of_first_column(stats)
    low, high = bootstrap_ci(stats, mean_of_first_column, seed=3)
    assert low <= point <= high and low < high
    assert bootstrap_ci(stats, mean_of_first_column, seed=3) == (low, high)
    assert bootstrap_ci(stats, mean_of_first_column, seed=4) != (low, high)


def test_ci_shrinks_with_more_data():
    small = bootstrap_ci(binary(50, 0.6), mean_of_first_column)
    large = bootstrap_ci(binary(5000, 0.6), mean_of_first_column)
    assert large[1] - large[0] < (small[1] - small[0]) / 4


def test_vectorised_path_equals_loop():
    stats = binary(120, 0.4)
    slow = lambda s: float(np.mean(s[:, 0]))  # noqa: E731 — not recognised as a mean, so it loops
    assert bootstrap_ci(stats, mean_of_first_column, seed=7) == pytest.approx(bootstrap_ci(stats, slow, seed=7))
    default = Metric("m", "", lambda outs: []).aggregate  # Metric's default aggregate takes the fast path too
    assert bootstrap_ci(stats, default, seed=7) == pytest.approx(bootstrap_ci(stats, slow, seed=7))


def test_edge_cases():
    assert bootstrap_ci(np.array([[0.25]]), mean_of_first_column) == (0.25, 0.25)
    low, high = bootstrap_ci(np.full((10, 1), np.nan), mean_of_first_column)
    assert np.isnan(low) and np.isnan(high)


def test_paired_identical_inputs():
    stats = binary(100, 0.5)
    r = paired_bootstrap(stats, stats.copy(), mean_of_first_column)
    assert r == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}


def test_paired_clearly_better_model():
    a = (np.random.default_rng(5).random(300) < 0.9).astype(float).reshape(-1, 1)
    b = (np.random.default_rng(6).random(300) < 0.6).astype(float).reshape(-1, 1)
    r = paired_bootstrap(a, b, mean_of_first_column, seed=0)
    assert r["diff"] == pytest.approx(a.mean() - b.mean())
    assert 0 < r["low"] <= r["diff"] <= r["high"]
    assert r["p_value"] < 0.01
    flipped = paired_bootstrap(b, a, mean_of_first_column, seed=0)
    assert flipped["high"] < 0 and flipped["p_value"] == r["p_value"]


def test_paired_requires_aligned_rows():
    with pytest.raises(ValueError):
        paired_bootstrap(binary(10, 0.5), binary(11, 0.5), mean_of_first_column)


def _classify(n, seed):
    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c"]
    outs = []
    for i in range(n):
        t = labels[rng.integers(3)]
        p = t if rng.random() < 0.7 else labels[rng.integers(3)]
        outs.append(Outcome(Example(str(i), "x", t), p, p))
    return outs


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    words = "the a cat dog sat ran on under mat rug quickly slowly big small red".split()
    outs = []
    for i in range(n):
        ref = " ".join(rng.choice(words, 12))
        hyp = " ".join(w if rng.random() < 0.6 else rng.choice(words) for w in ref.split())
        outs.append(Outcome(Example(str(i), "x", ref), hyp, hyp))
    return outs


def test_vectorised_mean_path_equals_the_generic_loop():
    """Mean aggregates take a vectorised resampling path (speed lives in benchmarks, not here); it must give the
    same interval as the generic per-resample loop with the same seed."""
    stats = binary(300, 0.5)
    fast = bootstrap_ci(stats, mean_of_first_column, n_boot=500, seed=3)
    slow = bootstrap_ci(stats, lambda s: mean_of_first_column(s), n_boot=500, seed=3)
    assert fast == pytest.approx(slow, abs=1e-12)


@pytest.mark.parametrize("name,make", [("f1_weighted", _classify), ("bleu", _texts)])
def test_corpus_metric_ci_and_paired(name, make):
    m = get_metric(name)
    stats = m.stats(make(150, 0))
    point = m.aggregate(stats)
    low, high = bootstrap_ci(stats, m.aggregate, n_boot=100)
    assert low <= point <= high
    r = paired_bootstrap(stats, stats, m.aggregate, n_boot=100)
    assert (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
