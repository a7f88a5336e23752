"""The real embedded model end to end: `labscale run` writes the HTML report and the results JSON beside the
markdown (verdicts first), `labscale export` the samples, and the same model judges its outputs (absolute and
pairwise, both orders) through the generation cache; the report shows the judge with its parse-failure rate."""

from __future__ import annotations

import json
import sqlite3

import pytest
from helpers import cli, write_experiment

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

MODEL = "embedded:smollm2-135m-instruct"


def test_run_html_export_and_judge_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    exp = write_experiment(tmp_path / "e.yaml", name="real", models=[MODEL], tasks=["mts-summarization"],
                           settings=["zero-shot", "few-shot:1"], limit=2, generation={"max_new_tokens": 12},
                           margin=0.05, bootstrap_samples=200)
    db = tmp_path / "real.db"
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0, err
    md, page, results = (db.with_suffix(s) for s in (".md", ".html", ".json"))
    text = md.read_text()
    assert text.index("## Verdicts") < text.index("## Models") and "**reference**" in text
    assert "<svg" in page.read_text() and "prompt:" not in page.read_text()[:100]
    data = json.loads(results.read_text())
    assert len(data["runs"]) == 2 and {r["verdict"]["verdict"] for r in data["runs"]} & {"reference"}
    assert all(r["cost"]["estimated"] for r in data["runs"])  # a local model: hardware price × compute time
    code, out, _ = cli(capsys, monkeypatch, "export", "--db", db, "--format", "csv")
    samples = db.with_name("real.samples.jsonl").read_text().splitlines()
    assert code == 0 and len(samples) == 4 and json.loads(samples[0])["doc"]["input"]

    code, out, err = cli(capsys, monkeypatch, "rate", "--db", db, "--judge", MODEL)
    assert code == 0, err
    assert "judge embedded:smollm2-135m-instruct: 4 prompts on 4 items (4 new, 0 cached)" in out
    code, out, err = cli(capsys, monkeypatch, "rate", "--db", db, "--judge", MODEL, "--mode", "pairwise")
    assert code == 0 and "4 prompts on 2 items" in out, err
    code, out, _ = cli(capsys, monkeypatch, "rate", "--db", db, "--judge", MODEL)
    assert "(0 new, 4 cached)" in out
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT rating, raw FROM ratings").fetchall()
    conn.close()
    assert len(rows) == 8 and all(raw for _, raw in rows)
    code, _, _ = cli(capsys, monkeypatch, "report", "--db", db)
    text = md.read_text()
    assert f"LLM judge `judge:{MODEL}` on the same items" in text and "parse failures" in text
