"""Kill a real `labscale run` subprocess (SIGKILL) at several points and re-run it: the experiment completes with no
lost, duplicated or corrupted rows, and nothing that was stored is generated again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import counts, write_experiment

LABSCALE = [sys.executable, "-m", "labscale"]


def _rows(db: Path, table: str) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(db, timeout=30)
        try:
            return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # schema not created yet
        return 0


@pytest.mark.subprocess
@pytest.mark.real_model
@pytest.mark.slow
def test_sigkill_and_resume_on_the_embedded_model(tmp_path):
    exp = write_experiment(
        tmp_path / "resume.yaml",
        name="resume",
        models=[{"id": "embedded:smollm2-135m-instruct", "batch_size": 2}],
        tasks=["fact-check", "openbookqa"],
        settings=["zero-shot", "few-shot:1"],
        limit=6,
        generation={"max_new_tokens": 12},
    )
    db = tmp_path / "resume.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    expected_generations = 2 * 6  # fact-check × 2 settings
    expected_logliks = 2 * 6 * 4  # openbookqa × 2 settings × 4 choices

    # Kill 1: once the first batch of generations is committed (mid-run). Kill 2: once the first run is complete.
    kills = []
    for table, at_least in (("generations", 1), ("predictions", 1)):
        proc = subprocess.Popen([*LABSCALE, "run", str(exp), "--db", str(db)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while _rows(db, table) < at_least + (kills[-1][table] if kills else 0) and proc.poll() is None:
            assert time.time() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        kills.append({t: _rows(db, t) for t in ("generations", "loglikelihoods", "predictions")})
    assert 0 < kills[0]["generations"] < expected_generations

    stored = _rows(db, "generations") + _rows(db, "loglikelihoods")
    done = subprocess.run([*LABSCALE, "run", str(exp), "--db", str(db)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    new, cached = counts(done.stdout)
    assert new == expected_generations + expected_logliks - stored  # nothing stored was generated again
    assert new + cached == expected_generations + expected_logliks

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert _rows(db, "generations") == expected_generations and _rows(db, "loglikelihoods") == expected_logliks
    statuses = conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
    assert statuses == [("complete", 4)]
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT run_id || example_id) FROM predictions").fetchone() == (24, 24)
    assert conn.execute("SELECT COUNT(*) FROM scores WHERE value IS NULL AND metric != 'acc_norm'").fetchone()[0] == 0
    # every prediction points at stored generations
    missing = conn.execute(
        "SELECT COUNT(*) FROM predictions p JOIN runs r ON r.id = p.run_id WHERE r.protocol = 'generate' AND "
        "NOT EXISTS (SELECT 1 FROM generations g WHERE g.key = json_extract(p.cache_keys_json, '$[0]'))"
    ).fetchone()[0]
    assert missing == 0

    again = subprocess.run([*LABSCALE, "run", str(exp), "--db", str(db)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and counts(again.stdout) == (0, expected_generations + expected_logliks)
    assert (tmp_path / "resume.md").exists()
