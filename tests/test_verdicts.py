"""Verdicts against a reference model: the rules and the ~N formula on hand-computed CIs, the paired-bootstrap CI
recomputed independently, the reference chosen, the table opening the report, and bad `reference:` / `margin:`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import cli, write_experiment
from synthetic import make_db, run_spec

from labscale.config import parse_experiment
from labscale.engine.store import Store
from labscale.report.markdown import build_report
from labscale.report.runs import StoredRun
from labscale.report.verdicts import classify, compute_verdicts, more_examples


@pytest.mark.parametrize("diff, low, high, margin, hib, verdict", [
    (0.10, 0.02, 0.18, 0.0, True, "better"),
    (0.01, 0.001, 0.02, 0.05, True, "better"),  # above 0 wins over inside the margin
    (0.00, -0.03, 0.04, 0.05, True, "within margin"),
    (-0.02, -0.04, -0.01, 0.05, True, "within margin"),  # below 0 but not by more than the margin
    (0.00, 0.00, 0.00, 0.0, True, "within margin"),  # identical outputs
    (-0.10, -0.18, -0.02, 0.05, True, "worse"),
    (-0.05, -0.20, 0.10, 0.05, True, "inconclusive"),
    (0.02, -0.01, 0.06, 0.05, True, "inconclusive"),  # reaches past +m while straddling 0
    (0.10, 0.02, 0.18, 0.0, False, "worse"),  # lower is better (e.g. an error rate): +0.1 is worse
    (-0.10, -0.18, -0.02, 0.0, False, "better"),
])
def test_classify(diff, low, high, margin, hib, verdict):
    assert classify(diff, low, high, margin, hib) == verdict


def test_more_examples_formula_by_hand():
    # h = 0.2, |d| = 0.075 > m − |d|: n' = 40 · (0.2 / 0.075)² = 284.4 → 285, i.e. 245 more
    assert more_examples(-0.075, -0.275, 0.125, 0.05, 40) == 245
    # h = 0.1, m − |d| = 0.04 > |d| = 0.01: n' = 40 · (0.1 / 0.04)² = 250 → 210 more
    assert more_examples(0.01, -0.09, 0.11, 0.05, 40) == 210
    assert more_examples(0.0, -0.1, 0.1, 0.0, 40) is None  # nothing to resolve without a margin


def _independent_paired_ci(a, b, n_boot, seed):
    """The paired percentile bootstrap written out: same resampled rows for both runs."""
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    diffs = np.asarray(a)[idx].mean(axis=1) - np.asarray(b)[idx].mean(axis=1)
    return float(np.mean(a) - np.mean(b)), *np.percentile(diffs, [2.5, 97.5])


@pytest.fixture
def db(tmp_path):
    rng = np.random.default_rng(0)
    ref = (rng.random(60) < 0.7).astype(float).tolist()
    noisy = (rng.random(60) < 0.6).astype(float).tolist()
    better = [1.0] * 60
    worse = [0.0 if i % 5 else 1.0 for i in range(60)]
    runs = [run_spec("cls", "closed", "zero-shot", ref, remote=True),
            run_spec("cls", "closed", "few-shot:1", [x * 0 for x in ref]),  # the reference's worse setting
            run_spec("cls", "small", "zero-shot", noisy),
            run_spec("cls", "small", "few-shot:1", list(ref)),  # identical per-example scores
            run_spec("cls", "tuned", "finetuned", better),
            run_spec("cls", "tiny", "zero-shot", worse)]
    return make_db(tmp_path / "v.db", runs, {"reference": "closed", "margin": 0.05}), ref, noisy


def test_verdicts_end_to_end(db):
    path, ref, noisy = db
    store = Store(path, readonly=True)
    runs = [StoredRun(store, r) for r in store.experiment_runs(1)]
    vs = {(v.model, v.setting): v for v in compute_verdicts(runs, {"reference": "closed", "margin": 0.05}, 1000, 0)}
    assert vs[("closed", "zero-shot")].verdict == "reference"  # the reference model's best setting
    assert vs[("closed", "few-shot:1")].verdict == "worse"
    assert vs[("small", "few-shot:1")].verdict == "within margin" and vs[("small", "few-shot:1")].diff == 0
    assert vs[("tuned", "finetuned")].verdict == "better"
    assert vs[("tiny", "zero-shot")].verdict == "worse"
    v = vs[("small", "zero-shot")]
    diff, low, high = _independent_paired_ci(noisy, ref, 1000, 0)
    assert (v.diff, v.low, v.high) == pytest.approx((diff, low, high), abs=1e-12)
    assert v.verdict == classify(diff, low, high, 0.05)
    if v.verdict == "inconclusive":
        h, g = (high - low) / 2, abs(diff)
        assert v.needed == math.ceil(60 * (h / max(g, 0.05 - g)) ** 2) - 60
    text = build_report(store)
    store.close()
    assert text.index("## Verdicts") < text.index("## Models")
    assert "| cls | tuned | finetuned | accuracy | 1.000 | **better** |" in text
    assert "`closed` in its best setting" in text


def test_without_reference_the_best_run_is_the_reference(tmp_path):
    path = make_db(tmp_path / "b.db", [run_spec("t", "a", "zero-shot", [0, 1, 0, 1]),
                                       run_spec("t", "b", "zero-shot", [1, 1, 1, 0])])
    store = Store(path, readonly=True)
    runs = [StoredRun(store, r) for r in store.experiment_runs(1)]
    vs = compute_verdicts(runs, {}, 200, 0)
    store.close()
    assert [v.verdict for v in vs][1] == "reference" and vs[0].reference.model == "b"


BASE = {"name": "x", "models": ["embedded:smollm2-135m-instruct", {"id": "openai:gpt-4o-mini", "name": "closed"}],
        "tasks": ["fact-check", "mts-summarization"]}


def test_reference_and_margin_in_the_experiment_file():
    exp = parse_experiment({**BASE, "reference": "closed", "margin": {"default": 0.02, "mts-summarization": 1.5}})
    assert exp.margin_for("mts-summarization") == 1.5 and exp.margin_for("fact-check") == 0.02
    assert parse_experiment({**BASE, "margin": 0.1}).margin_for("fact-check") == 0.1
    # report-only fields: the config hash (the identity of the results) does not change
    assert exp.config_hash() == parse_experiment(BASE).config_hash()


@pytest.mark.parametrize("patch, message", [
    ({"reference": "gpt4"}, "reference 'gpt4' is not a model of this experiment"),
    ({"reference": "openai:gpt-4o-mini"}, "did you mean 'closed' (its name)?"),
    ({"margin": -0.1}, "margin -0.1 is negative"),
    ({"margin": {"fact-check": -1}}, "margin of 'fact-check' -1 is negative"),
    ({"margin": {"fact-chek": 1}}, "did you mean 'fact-check'?"),
])
def test_bad_reference_or_margin_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, patch, message):
    path = write_experiment(tmp_path / "e.yaml", **BASE, **patch)
    code, out, err = cli(capsys, monkeypatch, "run", path, "--db", tmp_path / "x.db")
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.db").exists()
