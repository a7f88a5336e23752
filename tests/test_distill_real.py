"""Distillation on the real embedded models (slow): Qwen2.5-Coder-0.5B-Instruct teaches SmolLM2-135M-Instruct.

Tiny limits keep each test well under two minutes on 2 cores: a yes/no task of a few short questions, a handful of
teacher tokens, one or two optimizer steps. The teacher is installed by `scripts/setup.sh --teacher` (and
`--dev`); without it the tests that need it skip with that hint.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fault_server import FaultServer
from helpers import cli, write_experiment

from labscale.models import embedded

pytestmark = [pytest.mark.slow, pytest.mark.real_model, pytest.mark.usefixtures("one_thread")]

TEACHER = "embedded:qwen2.5-coder-0.5b-instruct"
STUDENT = "embedded:smollm2-135m-instruct"
QUESTIONS = [("Is the sun hot?", "yes"), ("Is ice cold?", "yes"), ("Can fish fly to the moon?", "no"),
             ("Is water wet?", "yes"), ("Do cats bark?", "no"), ("Is fire cold?", "no"), ("Is snow white?", "yes"),
             ("Can a stone swim?", "no"), ("Is the sky blue?", "yes"), ("Do trees talk?", "no")]


@pytest.fixture(scope="module")
def teacher_installed():
    if embedded.source_files("qwen2.5-coder-0.5b-instruct") is None:
        pytest.skip(f"{TEACHER} is not installed: bash scripts/setup.sh --teacher")


def _yesno(folder: Path, n_train: int = 4) -> dict:
    splits = {"train": QUESTIONS[:n_train], "dev": QUESTIONS[8:9], "test": QUESTIONS[9:10]}
    data = {}
    for split, rows in splits.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "question", "answer"])
            w.writerows((f"{split}{i}", q, a) for i, (q, a) in enumerate(rows))
        data[split] = f"{split}.csv"
    return {"name": "yesno", "data": data, "type": "classify", "input": "{{ question }}", "target": "answer",
            "labels": ["yes", "no"], "id_column": "id", "instruction": "Answer with yes or no."}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_teachers_answers_become_the_students_targets(teacher_installed, tmp_path, monkeypatch):
    from labscale.adapt import distill
    from labscale.config import DistillSpec, load_experiment

    monkeypatch.chdir(tmp_path)
    exp = load_experiment(write_experiment(tmp_path / "y.yaml", name="y", models=[STUDENT, TEACHER],
                                           tasks=[_yesno(tmp_path)], generation={"max_new_tokens": 4}))
    seen = {}
    real = distill.prepare_job
    monkeypatch.setattr(distill, "prepare_job", lambda o, world_size=None, train=None: seen.setdefault(
        "job", real(o, world_size, train)))
    spec = DistillSpec(method="distill", teacher=TEACHER, student=STUDENT, task="yesno", max_steps=1,
                       overrides={"eval_every": 1})
    lines: list[str] = []
    result = distill.run_distillation(spec, exp, tmp_path / "d.db", say=lines.append)
    assert any(line.startswith("teacher calls: 4 new, 0 cached") for line in lines), lines
    folder = Path(result.card["distillation"]["folder"])
    rows = _jsonl(folder / "data.jsonl")
    conn = sqlite3.connect(tmp_path / "d.db")
    stored = [t for (t,) in conn.execute("SELECT text FROM generations")]
    conn.close()
    assert len(stored) == 4 and sorted(r["teacher_output"] for r in rows) == sorted(stored)
    kept = [r for r in rows if r["dropped"] is None]
    assert kept and all(r["target"] in ("yes", "no") for r in kept)
    assert all(r["target"] == r["teacher_output"].strip().lower().rstrip(".") for r in kept)  # "Yes." → yes
    # a stored training example: its completion is the teacher's label, in the student's chat template
    job = seen["job"]
    tok = job.backend.tokenizer
    example = next(e for e in job.train.examples if e.id == kept[0]["id"])
    completion = tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != -100])
    assert completion == f"{kept[0]['target']}<|im_end|>"
    prompt = tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == -100])
    assert prompt.endswith("<|im_start|>assistant\n") and QUESTIONS[int(kept[0]["id"][5:])][0] in prompt
    score = json.loads((folder / "dataset.json").read_text())["teacher_score"]
    assert score["metric"] == "accuracy" and score["n"] == 4 and 0 <= score["value"] <= 1
    assert result.card["distillation"]["accounting"]["teacher"]["compute_s"] > 0  # a local teacher's time is billed
    assert result.spec.id.startswith("adapter:") and (folder / "student" / "adapter_config.json").is_file()


def test_a_distillation_killed_while_labelling_repeats_no_teacher_call(teacher_installed, tmp_path):
    exp = write_experiment(tmp_path / "k.yaml", name="k", tasks=[_yesno(tmp_path, n_train=8)],
                           models=[STUDENT, {"id": TEACHER, "batch_size": 1}])
    db = tmp_path / "k.db"
    args = [sys.executable, "-m", "labscale", "distill", "task", "--teacher", TEACHER, "--student", STUDENT,
            "--task", "yesno", "--experiment", str(exp), "--db", str(db), "--max-new-tokens", "24",
            "--data-only"]
    import labscale

    here = str(Path(labscale.__file__).resolve().parents[1])  # the subprocess imports this very labscale
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}

    def rows() -> int:
        if not db.exists():
            return 0
        conn = sqlite3.connect(db, timeout=30)
        try:
            return conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            conn.close()

    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while rows() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 mid-labelling
    proc.wait()
    before = rows()
    assert 2 <= before < 8
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"teacher calls: {8 - before} new, {before} cached" in done.stderr
    assert rows() == 8


def test_real_instruction_generation_keeps_no_near_duplicates(teacher_installed, tmp_path, capsys, monkeypatch):
    from rouge_score.rouge_scorer import RougeScorer

    from labscale.adapt.instructions import filter_instructions, rouge_l

    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, monkeypatch, "distill", "instructions", "--teacher", TEACHER, "--student", STUDENT,
                         "--count", "2", "--per-prompt", "3", "--topic-share", "0",
                         "--generation-tokens", "80", "--response-tokens", "12", "--no-seeds", "--data-only")
    assert code == 0, err
    folder = Path(out.splitlines()[-1].removeprefix("dataset: ")).parent
    card = json.loads((folder / "dataset.json").read_text())
    rows = _jsonl(folder / "data.jsonl")
    g = card["generation"]
    assert g["generated"] == g["kept"] + sum(g["filtered"].values()) and g["kept"] <= 2
    assert {r["instruction_source"] for r in rows} <= {"example-guided"} and all(r["response"] for r in rows)
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    kept = [r["instruction"] for r in rows]
    from labscale.adapt.instructions import read_lines

    seeds = read_lines(None, tmp_path, "distill_seeds.txt", "seeds")[0]  # the packaged seeds
    for i, a in enumerate(kept):
        assert all(rouge_l(scorer, b, a) <= 0.7 for b in kept[:i] + seeds)
    assert kept, err  # Qwen writes instructions in the <example> format
    paraphrase = kept[0].rstrip(".?!") + " please."  # one word more: ROUGE-L far above 0.7
    assert rouge_l(scorer, kept[0], paraphrase) > 0.7
    reasons = Counter()
    assert filter_instructions([paraphrase], list(kept), seeds, None, reasons, scorer) == []
    assert reasons == Counter({"similar": 1})


def test_rationale_training_on_the_real_student(tmp_path, capsys, monkeypatch):
    from labscale.adapt import distill
    from labscale.adapt.data import EXPLAIN_REQUEST

    monkeypatch.chdir(tmp_path)
    task = _yesno(tmp_path)
    for split in ("train",):  # the scripted teacher: a rationale and an answer line per input
        lines = (tmp_path / f"{split}.csv").read_text().splitlines()
        out = [lines[0]] + [f"{ln.rsplit(',', 1)[0]} [[answer:Think of what it is like. Answer: "
                            f"{ln.rsplit(',', 1)[1]}]],{ln.rsplit(',', 1)[1]}" for ln in lines[1:]]
        (tmp_path / f"{split}.csv").write_text("\n".join(out) + "\n")
    seen = {}
    real = distill.prepare_job
    monkeypatch.setattr(distill, "prepare_job", lambda o, world_size=None, train=None: seen.setdefault(
        "job", real(o, world_size, train)))
    with FaultServer() as server:
        exp = write_experiment(tmp_path / "r.yaml", name="r", tasks=[task], models=[STUDENT, {
            "id": "openai:teacher", "base_url": server.url, "api_key_env": None, "price": {"input": 0, "output": 0}}])
        code, out, err = cli(capsys, monkeypatch, "distill", "task", "--teacher", "openai:teacher", "--student",
                             STUDENT, "--task", "yesno", "--experiment", exp, "--rationales", "--max-steps", "1",
                             "--set", "eval_every=1")
    assert code == 0, err
    job = seen["job"]
    tok = job.backend.tokenizer
    explain = [e for e in job.train.examples if e.id.endswith(":explain")]
    predict = [e for e in job.train.examples if not e.id.endswith(":explain")]
    assert len(explain) == len(predict) == 4
    e = explain[0]
    prompt = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab == -100])
    completion = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100])
    assert prompt.endswith(f"{EXPLAIN_REQUEST}<|im_end|>\n<|im_start|>assistant\n")
    assert completion == "Think of what it is like.<|im_end|>"
    assert predict[0].weight != 1.0 and explain[0].weight != 1.0
    card = json.loads((Path(out.splitlines()[-1].removeprefix("student: adapter:")) / "labscale.json").read_text())
    assert card["training"]["steps"] == 1 and card["distillation"]["rationales"]["alpha"] == 0.5


def test_the_budget_refuses_before_any_teacher_call(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FaultServer() as server:
        exp = write_experiment(tmp_path / "b.yaml", name="b", tasks=[_yesno(tmp_path)], models=[STUDENT, {
            "id": "openai:pricey", "base_url": server.url, "api_key_env": None,
            "price": {"input": 500.0, "output": 1500.0}}])
        code, _, err = cli(capsys, monkeypatch, "distill", "task", "--teacher", "openai:pricey", "--student",
                           STUDENT, "--task", "yesno", "--experiment", exp, "--budget", "0.05")
        assert server.total == 0
    assert code == 2 and "the teacher's estimated API cost $" in err and "exceeds the budget $0.05" in err
    assert not (tmp_path / "runs").exists()
