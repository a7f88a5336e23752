"""End to end through the CLI on a tiny random model: grid expansion, cache, resume counts, report, reproducibility."""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pytest
from helpers import cli, counts, write_experiment


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """The tiny random Llama with a 4096-token context (RoPE: only the config changes), so few-shot prompts fit."""
    from conftest import make_tiny_llm

    folder = make_tiny_llm(tmp_path_factory.mktemp("tiny-long"))
    config = json.loads((tmp_path_factory.getbasetemp() / folder / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (tmp_path_factory.getbasetemp() / folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def notes_csv(tmp_path):
    rows = ["id,text,summary"] + [f"n{i},patient {i} reports pain in the {w},{w} pain" for i, w in
                                   enumerate(["knee", "back", "head", "chest", "hand", "foot", "neck", "hip"] * 3)]
    path = tmp_path / "notes.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def experiment(tmp_path, tiny_long, notes_csv):
    return write_experiment(
        tmp_path / "exp.yaml",
        name="tiny",
        models=[f"hf:{tiny_long}", {"id": f"hf:{tiny_long}", "name": "tiny-b", "batch_size": 3}],
        tasks=[
            "fact-check",
            "openbookqa",
            {"name": "notes", "data": "notes.csv", "type": "generate", "input": "{{ text }}", "target": "summary",
             "id_column": "id", "instruction": "Summarize."},
        ],
        settings=["zero-shot", "few-shot:2"],
        limit=4,
        generation={"max_new_tokens": 8},
    )


@pytest.mark.slow
def test_run_rerun_and_report(tmp_path, experiment, capsys, monkeypatch):
    db = tmp_path / "out" / "tiny.db"
    code, out, err = cli(capsys, monkeypatch, "run", experiment, "--db", db)
    assert code == 0, err
    # per model: fact-check 4×2 generations, notes 4×2, openbookqa 4 examples × 4 choices × 2 settings.
    # tiny-b has the same weights (same fingerprint), so every one of its requests is a cache hit.
    assert counts(out) == (8 + 8 + 32, 8 + 8 + 32)
    report = (tmp_path / "out" / "tiny.md").read_text()
    for heading in ("## Results by task — zero-shot", "## Results by task — few-shot:2", "### fact-check",
                    "## Paired differences between models", "## Efficiency", "## Provenance"):
        assert heading in report
    row = next(line for line in report.splitlines() if line.startswith("| fact-check (accuracy"))
    assert len(re.findall(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", row)) == 2
    # identical models: paired differences are exactly 0
    assert "| 0.000 | [0.000, 0.000] |" in report

    code, out, _ = cli(capsys, monkeypatch, "run", experiment, "--db", db)
    assert code == 0 and counts(out) == (0, 96)
    code, out, _ = cli(capsys, monkeypatch, "report", "--db", db, "--out", tmp_path / "again.md")
    assert code == 0 and (tmp_path / "again.md").read_text() == (tmp_path / "out" / "tiny.md").read_text()


@pytest.mark.slow
def test_limit_override_and_provenance(tmp_path, experiment, capsys, monkeypatch):
    db = tmp_path / "p.db"
    code, _, err = cli(capsys, monkeypatch, "run", experiment, "--db", db, "--limit", "2")
    assert code == 0, err
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    runs = conn.execute("SELECT * FROM runs").fetchall()
    assert len(runs) == 12 and {r["n_examples"] for r in runs} == {2}
    assert {r["status"] for r in runs} == {"complete"}
    env = json.loads(runs[0]["environment_json"])
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    assert len(runs[0]["model_fingerprint"]) >= 16 and runs[0]["config_hash"]
    # exact prompts are stored, chat template applied
    prompt = conn.execute("SELECT prompt FROM predictions p JOIN runs r ON r.id = p.run_id "
                          "WHERE r.task='notes' LIMIT 1").fetchone()[0]
    assert prompt.startswith("<|im_start|>user\nSummarize.\n\npatient") and prompt.endswith("<|im_start|>assistant\n")
    gen = conn.execute("SELECT * FROM generations LIMIT 1").fetchone()
    assert json.loads(gen["params_json"]) == {"max_new_tokens": 8, "stop": [], "temperature": 0.0}
    assert gen["prompt_tokens"] > 0 and 0 < gen["new_tokens"] <= 8 and gen["latency_s"] > 0


@pytest.mark.slow
def test_greedy_reruns_reproduce_scores_exactly(tmp_path, experiment, capsys, monkeypatch):
    scores = []
    for name in ("a.db", "b.db"):
        assert cli(capsys, monkeypatch, "run", experiment, "--db", tmp_path / name, "--limit", "3")[0] == 0
        conn = sqlite3.connect(tmp_path / name)
        scores.append(conn.execute(
            "SELECT r.task, r.model, r.setting, s.metric, s.value, s.ci_low, s.ci_high FROM scores s "
            "JOIN runs r ON r.id = s.run_id ORDER BY 1, 2, 3, 4").fetchall())
    assert scores[0] == scores[1] and len(scores[0]) > 20


@pytest.mark.slow
def test_stored_scores_equal_reference_libraries(tmp_path, experiment, capsys, monkeypatch):
    from rouge_score import rouge_scorer
    from sklearn.metrics import accuracy_score, f1_score

    db = tmp_path / "r.db"
    assert cli(capsys, monkeypatch, "run", experiment, "--db", db)[0] == 0
    conn = sqlite3.connect(db)

    def run(task):
        rid = conn.execute("SELECT id FROM runs WHERE task=? AND setting='zero-shot' AND model LIKE 'hf:%'",
                           (task,)).fetchone()[0]
        preds = conn.execute("SELECT prediction, target, output FROM predictions WHERE run_id=? ORDER BY position",
                             (rid,)).fetchall()
        return dict(conn.execute("SELECT metric, value FROM scores WHERE run_id=?", (rid,)).fetchall()), preds

    scores, preds = run("notes")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(t, p)["rougeL"].fmeasure for p, t, _ in preds])
    assert scores["rougeL"] == pytest.approx(expected, abs=1e-12)

    scores, preds = run("fact-check")
    y_pred, y_true = [p for p, _, _ in preds], [t for _, t, _ in preds]
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores["f1_weighted"] == pytest.approx(
        f1_score(y_true, y_pred, average="weighted", labels=sorted(set(y_true)), zero_division=0))

    scores, preds = run("openbookqa")
    from labscale.tasks.registry import get_task

    test = {e.target: e for e in get_task("openbookqa", tmp_path).split("test", 4)}
    norm_hits, hits = [], []
    for i, (pred, target, output) in enumerate(preds):
        lls = np.array(json.loads(output)["logprobs"])
        choices = test[target].choices
        hits.append(int(np.argmax(lls)) == test[target].gold)
        norm_hits.append(int(np.argmax(lls / np.array([float(len(c)) for c in choices]))) == test[target].gold)
    assert scores["acc"] == pytest.approx(np.mean(hits)) and scores["acc_norm"] == pytest.approx(np.mean(norm_hits))


def test_relative_model_path_resolves_against_the_experiment_file(tmp_path, tiny_long, capsys, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "model").symlink_to(tiny_long)
    exp = write_experiment(tmp_path / "exp" / "rel.yaml", name="rel", models=["hf:./model"], tasks=["openbookqa"],
                           limit=2)
    monkeypatch.chdir(tmp_path)  # not the experiment's folder
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "rel.db")
    assert code == 0, err
    assert "| hf:./model |" in (tmp_path / "rel.md").read_text()


@pytest.mark.slow
def test_report_of_an_interrupted_experiment_marks_pending_runs(tmp_path, experiment, capsys, monkeypatch):
    db = tmp_path / "i.db"
    assert cli(capsys, monkeypatch, "run", experiment, "--db", db, "--limit", "2")[0] == 0
    conn = sqlite3.connect(db)
    with conn:  # what a killed process leaves: a registered run that never completed
        rid = conn.execute("SELECT id FROM runs WHERE task='notes' AND model='tiny-b' AND setting='zero-shot'").fetchone()[0]
        conn.execute("DELETE FROM predictions WHERE run_id=?", (rid,))
        conn.execute("DELETE FROM scores WHERE run_id=?", (rid,))
        conn.execute("UPDATE runs SET status='pending', efficiency_json=NULL WHERE id=?", (rid,))
    conn.close()
    code, out, _ = cli(capsys, monkeypatch, "report", "--db", db)
    report = (tmp_path / "i.md").read_text()
    assert code == 0 and "**1 run(s) did not finish**" in report
    assert re.search(r"^\| notes \(rouge1, n=2\) \| \d\.\d{3} \[[^|]*\] \| pending \|$", report, re.MULTILINE)
    # re-running completes it from the cache: 0 new generations
    code, out, _ = cli(capsys, monkeypatch, "run", experiment, "--db", db, "--limit", "2")
    assert code == 0 and counts(out)[0] == 0 and "did not finish" not in (tmp_path / "i.md").read_text()
