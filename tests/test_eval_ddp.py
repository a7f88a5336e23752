"""Data-parallel evaluation: `accelerate launch -m labscale run` with two CPU processes (gloo) gives exactly the
results of one process — the same generations, log-likelihoods, predictions and scores — with only the main
process writing the database and reporting (engine/parallel.py)."""

from __future__ import annotations

import csv
import json
import os
import socket
import sqlite3
import subprocess
import sys

import pytest
from helpers import write_experiment

SYMPTOMS = ["headache", "fever", "cough", "chest pain", "nausea", "back pain", "sore throat", "dizziness"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _experiment(folder, tiny_llm, **extra):
    with open(folder / "notes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "note"])
        for i in range(22):
            w.writerow([i, f"Patient: I have had {SYMPTOMS[i % 8]} since day {i}.", SYMPTOMS[i % 8]])
    with open(folder / "mc.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "q", "a", "b", "c", "gold"])
        for i in range(18):
            w.writerow([i, f"What does the patient with {SYMPTOMS[i % 8]} have?", SYMPTOMS[i % 8],
                        SYMPTOMS[(i + 3) % 8], "nothing at all", i % 3])
    tasks = [{"name": "notes", "data": "notes.csv", "type": "generate", "input": "{{ text }}", "target": "note",
              "instruction": "Write the complaint.", "split_fractions": [0.0, 0.0, 1.0]},
             {"name": "mc", "data": "mc.csv", "type": "multiple_choice", "input": "Question: {{ q }}\nAnswer:",
              "target": "gold", "choices": ["a", "b", "c"], "split_fractions": [0.0, 0.0, 1.0]}]
    # batch_size 3: several rounds per run, and a last round with an empty share for one process
    return write_experiment(folder / "dp.yaml", name="dp", models=[{"id": f"hf:{tiny_llm}", "batch_size": 3}],
                            tasks=tasks, generation={"max_new_tokens": 8}, bootstrap_samples=200, **extra)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(sys.path)}


def _launch(args: list[str], processes: int, cwd) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "labscale", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "labscale", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=cwd)


def _tables(db) -> dict:
    conn = sqlite3.connect(db)
    out = {
        "predictions": sorted(conn.execute(
            "SELECT r.task, p.example_id, p.output, p.prediction, p.stats_json FROM predictions p "
            "JOIN runs r ON r.id = p.run_id")),
        "scores": sorted(conn.execute(
            "SELECT r.task, s.metric, s.value, s.ci_low, s.ci_high FROM scores s JOIN runs r ON r.id = s.run_id")),
        "generations": sorted(conn.execute("SELECT key, text, new_tokens FROM generations")),
        "loglikelihoods": sorted(conn.execute("SELECT key, logprob, is_greedy, n_tokens FROM loglikelihoods")),
        "efficiency": [json.loads(e) for (e,) in conn.execute("SELECT efficiency_json FROM runs ORDER BY task")],
    }
    conn.close()
    return out


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_give_the_results_of_one(tiny_llm, tmp_path):
    exp = _experiment(tmp_path, tiny_llm)
    one = _launch(["run", str(exp), "--db", str(tmp_path / "one.db")], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(["run", str(exp), "--db", str(tmp_path / "two.db")], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("database: ") == 1  # only the main process reports
    assert "data-parallel over 2 processes" in two.stderr
    a, b = _tables(tmp_path / "one.db"), _tables(tmp_path / "two.db")
    assert len(a["predictions"]) == 22 + 18 and len(a["loglikelihoods"]) >= 18  # (repeated pairs: scored once)
    for table in ("predictions", "scores", "generations", "loglikelihoods"):
        assert a[table] == b[table], table
    assert all(e.get("processes") == 2 for e in b["efficiency"]) and all("processes" not in e for e in a["efficiency"])
    # resume: a second launch finds everything stored and asks the model nothing
    again = _launch(["run", str(exp), "--db", str(tmp_path / "two.db")], 2, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generations: 0 new, 76 cached" in again.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_data_parallel_run_refuses_what_it_cannot_shard(tiny_llm, tmp_path):
    exp = _experiment(tmp_path, tiny_llm)
    bad = write_experiment(tmp_path / "bad.yaml", name="bad",
                           models=[{"id": f"hf:{tiny_llm}", "device_map": "auto"}], tasks=["fact-check"], limit=2)
    res = _launch(["run", str(bad), "--db", str(tmp_path / "bad.db")], 2, tmp_path)
    assert res.returncode != 0
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "device_map: auto" in lines[0], res.stderr[-2000:]  # one line, from the main process
    assert not (tmp_path / "bad.db").exists()
    # a bad input seen by every process: one error line, exit 2, no database
    broken = write_experiment(tmp_path / "broken.yaml", name="broken", models=[f"hf:{tiny_llm}"], tasks=[
        {"name": "notes", "data": "notes.csv", "type": "generate", "input": "{{ nope }}", "target": "note"}])
    res = _launch(["run", str(broken), "--db", str(tmp_path / "x.db")], 2, tmp_path)
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "nope" in lines[0], res.stderr[-2000:]
    assert res.returncode != 0 and not (tmp_path / "x.db").exists()


@pytest.mark.real_model
@pytest.mark.subprocess
def test_two_processes_on_the_embedded_model_give_the_results_of_one(tmp_path):
    """The same on the real SmolLM2-135M-Instruct: a generate task and a log-likelihood task."""
    exp = write_experiment(tmp_path / "real.yaml", name="real",
                           models=[{"id": "embedded:smollm2-135m-instruct", "batch_size": 2}],
                           tasks=["fact-check", "openbookqa"], limit=5, generation={"max_new_tokens": 6},
                           bootstrap_samples=200)
    one = _launch(["run", str(exp), "--db", str(tmp_path / "one.db")], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(["run", str(exp), "--db", str(tmp_path / "two.db")], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data-parallel over 2 processes" in two.stderr
    a, b = _tables(tmp_path / "one.db"), _tables(tmp_path / "two.db")
    assert len(a["predictions"]) == 10 and a["generations"] and a["loglikelihoods"]
    for table in ("predictions", "scores", "generations", "loglikelihoods"):
        assert a[table] == b[table], table
