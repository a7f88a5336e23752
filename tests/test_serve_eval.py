"""The closed-model path end to end: the same tasks evaluated directly on the embedded model and as `openai:<name>`
through a real `labscale serve` process on loopback give identical greedy outputs and scores."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import cli, counts, write_experiment

EMBEDDED = "embedded:smollm2-135m-instruct"


def start_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`labscale serve ARGS --port 0` in a subprocess; returns it and its base URL once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "labscale", "serve", *args, "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"labscale serve exited with {proc.returncode}")
        m = re.search(r"at (http://\S+/v1)", line)
        url = m.group(1) if m else None
        assert time.monotonic() < deadline, "labscale serve did not start"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("labscale serve never became healthy")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _by_model(db, select: str, model: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    rows = conn.execute(f"SELECT {select} WHERE r.model = ?", (model,)).fetchall()
    conn.close()
    return rows


def _outputs(db, model: str) -> dict[tuple[str, str, str], str]:
    rows = _by_model(db, "r.task, r.setting, p.example_id, p.output FROM predictions p JOIN runs r ON r.id = p.run_id",
                     model)
    return {(t, s, e): o for t, s, e, o in rows}


def _scores(db, model: str) -> dict[tuple[str, str, str], tuple]:
    rows = _by_model(db, "r.task, r.setting, s.metric, s.value, s.ci_low, s.ci_high FROM scores s "
                         "JOIN runs r ON r.id = s.run_id", model)
    return {(t, st, m): (v, lo, hi) for t, st, m, v, lo, hi in rows}


@pytest.mark.subprocess
@pytest.mark.real_model
@pytest.mark.slow
def test_direct_and_served_evaluation_are_identical(tmp_path, capsys, monkeypatch):
    proc, url = start_server("--model", EMBEDDED, "--served-name", "smollm2")
    try:
        served = {"id": "openai:smollm2", "base_url": url, "api_key_env": None, "price": {"input": 0, "output": 0},
                  "concurrency": 8}
        exp = write_experiment(tmp_path / "same.yaml", name="same", models=[EMBEDDED, served],
                               tasks=["mts-summarization", "fact-check"], settings=["zero-shot", "few-shot:1"],
                               limit=3, generation={"max_new_tokens": 32}, bootstrap_samples=200)
        db = tmp_path / "same.db"
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 0, err
        assert counts(out) == (24, 0) and "failed requests" not in out
    finally:
        assert stop_server(proc) == 0
    direct, through = _outputs(db, EMBEDDED), _outputs(db, "openai:smollm2")
    assert len(direct) == 12 and direct.keys() == through.keys()
    assert direct == through
    assert _scores(db, EMBEDDED) == _scores(db, "openai:smollm2")
    conn = sqlite3.connect(db)
    eff = [json.loads(e) for (e,) in conn.execute(
        "SELECT efficiency_json FROM runs WHERE model='openai:smollm2'")]
    gen = conn.execute("SELECT SUM(prompt_tokens), SUM(new_tokens) FROM generations WHERE model_fingerprint LIKE 'api-%'"
                       ).fetchone()
    direct_tokens = conn.execute(
        "SELECT SUM(prompt_tokens), SUM(new_tokens) FROM generations WHERE model_fingerprint NOT LIKE 'api-%'"
    ).fetchone()
    conn.close()
    assert all(e["cost_usd"] == 0 and e["failed"] == 0 for e in eff)
    assert gen == direct_tokens  # the server's usage counts the same tokens the direct run did
    report = (tmp_path / "same.md").read_text()
    assert "## API cost" in report and "Total API cost of the results above: $0.0000." in report
