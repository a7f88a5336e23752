"""The HTML report (self-contained: no URL outside the file, inline SVG, data that parses) and the machine-readable
export (results JSON / CSV, samples JSONL), through the CLI, on a database with chosen scores."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from helpers import cli
from synthetic import make_db, run_spec

from labscale.report.export import CSV_COLUMNS, SAMPLES_SCHEMA, SCHEMA
from labscale.report.plots import pareto


@pytest.fixture
def db(tmp_path):
    runs = [run_spec("cls", "closed", "zero-shot", [1, 1, 0, 1, 1, 1, 0, 1] * 3, remote=True, cost_usd=0.05,
                     groups=["f", "m"] * 12),
            run_spec("cls", "small", "zero-shot", [1, 0, 0, 1, 1, 0, 0, 1] * 3, groups=["f", "m"] * 12),
            run_spec("sum", "closed", "zero-shot", [0.5, 0.4, 0.6] * 4, metric="rougeL", remote=True,
                     usage_estimated=3),
            run_spec("sum", "small", "zero-shot", [0.45, 0.41, 0.5] * 4, metric="rougeL",
                     outputs=["<script>alert(1)</script>"] + ["fine"] * 11),
            run_spec("sum", "small", "finetuned", [0.5, 0.45, 0.55] * 4, metric="rougeL",
                     adaptation={"recipe": "tiny-lora", "steps": 20, "cost_usd": 0.002, "energy_kwh": 0.0004,
                                 "co2eq_kg": 0.0002, "hardware": "cpu", "task": "sum"})]
    return make_db(tmp_path / "x.db", runs, {"reference": "closed", "margin": {"default": 0.05}})


def test_pareto_frontier():
    pts = [{"x": 1, "y": 0.5}, {"x": 2, "y": 0.7}, {"x": 3, "y": 0.6}, {"x": 0.5, "y": 0.4}, {"x": None, "y": 1}]
    assert pareto(pts) == [3, 0, 1]
    assert pareto(pts, higher_is_better=False) == [3]


def test_html_report_is_self_contained(db, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "report", "--db", db, "--html")
    assert code == 0, err
    page = db.with_suffix(".html").read_text()
    assert f"html: {db.with_suffix('.html')}" in out
    # nothing outside the file: no src/href to another place, no @import, no fetch
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!#|data:)""", page)
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert page.count("<svg") >= 6  # matrix + 2 per task + fairness
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert {r["verdict"] for r in data["runs"]} >= {"reference"} and len(data["examples"]) == 5
    assert next(r for r in data["runs"] if r["setting"] == "finetuned")["card"]["recipe"] == "tiny-lora"
    assert 'id="adaptation"' in page and "(est.)" in page  # CodeCarbon on a CPU machine: estimated energy
    assert "<script>alert(1)</script>" not in page  # escaped in the data block and the tables
    assert "## Verdicts" not in page and "<h3>Verdicts</h3>" in page  # the markdown report, rendered


def test_export_json_csv_and_samples(db, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "export", "--db", db, "--format", "json")
    assert code == 0, err
    results = json.loads(db.with_suffix(".json").read_text())
    assert results["schema"] == SCHEMA and results["experiment"]["reference"] == "closed"
    assert results["experiment"]["margins"] == {"cls": 0.05, "sum": 0.05}
    by = {(r["task"], r["model"]): r for r in results["runs"]}
    small = by[("cls", "small")]
    assert small["scores"]["accuracy"]["value"] == pytest.approx(0.5)
    assert small["verdict"]["reference"]["model"] == "closed" and small["verdict"]["verdict"] in (
        "worse", "inconclusive")
    assert small["cost"]["estimated"] and "estimate" in small["cost"]["source"]
    closed = by[("cls", "closed")]
    assert closed["cost"]["usd_per_1000_examples"] == pytest.approx(0.05 / 24 * 1000) and not closed["cost"]["estimated"]
    assert by[("sum", "closed")]["cost"]["estimated"]  # some API usage was estimated
    tuned = next(r for r in results["runs"] if r["setting"] == "finetuned")
    assert tuned["adaptation"]["steps"] == 20
    assert closed["provenance"]["model_fingerprint"] == "fp-closed" and closed["group_scores"]
    samples = [json.loads(line) for line in db.with_name("x.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 * 2 + 12 * 3
    s = samples[0]
    assert s["schema"] == SAMPLES_SCHEMA and s["doc_id"] == 0 and s["doc"]["input"] == "input 0"
    assert s["resps"] == [[s["filtered_resps"][0]]] and s["accuracy"] == 1.0 and s["arguments"][0][0].startswith("<|user|>")

    code, out, _ = cli(capsys, monkeypatch, "export", "--db", db, "--format", "csv", "--no-samples",
                       "--out", db.with_name("r.csv"))
    assert code == 0 and "samples:" not in out
    rows = list(csv.DictReader(io.StringIO(db.with_name("r.csv").read_text())))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 5
    assert rows[1]["verdict"] == small["verdict"]["verdict"] and rows[1]["reference_model"] == "closed"


def test_export_bad_input(tmp_path, db, capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, "export", "--db", db, "--format", "xml")
    assert code == 2 and "unknown --format 'xml'" in err
    code, _, err = cli(capsys, monkeypatch, "export", "--db", tmp_path / "none.db")
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, monkeypatch, "export", "--db", db, "--out", tmp_path / "no" / "r.json")
    assert code == 2 and "does not exist" in err
