"""Prompt compilation (the optimized settings): the three searches on a scripted model whose best prompt is known,
clean splits, dev-score recomputation, identity and reuse, the budget stop, bad input — and, on the real embedded
model, the same checks plus resume after kill -9 and the exported prompt."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import cli, counts, dump, write_experiment

from labscale.errors import LabscaleError

LABSCALE = [sys.executable, "-m", "labscale"]


# -- a scripted local model: what each prompt earns is known --------------------------------------------------


def _scripted_class():
    from labscale.models.base import GenerationResult, ModelBackend, ModelInfo

    class Scripted(ModelBackend):
        """Answers `n is even?` questions. Correct when the instruction says EXPERT, or with 2+ demonstrations;
        with one demonstration it is right on even numbers only; zero-shot it rambles (unparseable). As a proposer
        (a prompt asking for <INS>) it writes an EXPERT instruction on even seeds and junk on odd ones."""

        prompts: list[str] = []

        def __init__(self, spec, name):
            self.spec, self.name = spec, name

        @property
        def info(self):
            return ModelInfo(name=self.spec.label, fingerprint=f"scripted-{self.name}", backend="scripted",
                             context_length=4096, supports_loglikelihood=False)

        def render(self, prompt):
            return json.dumps(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])

        def count_tokens(self, text):
            return len(text) // 4 + 1

        def answer(self, prompt: str, seed: int) -> str:
            messages = json.loads(prompt)
            last = messages[-1]["content"]
            if "<INS>" in last:
                return "<INS>Say yes or no. EXPERT: even numbers are yes.</INS>" if seed % 2 == 0 else "hmm"
            demos = sum(m["role"] == "assistant" for m in messages)
            n = int(last.rsplit(" ", 1)[-1])
            truth = "yes" if n % 2 == 0 else "no"
            if "EXPERT" in last or demos >= 2:
                return truth
            if demos == 1:
                return "yes"
            return "I am not sure about this one"

        def generate(self, requests, progress=None):
            type(self).prompts += [r.prompt for r in requests]
            return [GenerationResult(self.answer(r.prompt, r.params.seed), self.count_tokens(r.prompt), 3, 0.01, 0.5)
                    for r in requests]

    return Scripted


@pytest.fixture
def scripted(monkeypatch):
    from labscale.models import registry

    cls = _scripted_class()
    cls.prompts = []
    monkeypatch.setitem(registry.FACTORIES, "scripted", registry.Backend(lambda spec, name: cls(spec, name),
                                                                          remote=False))
    return cls


@pytest.fixture
def parity(tmp_path, monkeypatch):
    """A classify task over 60 numbers split by a column: 30 train, 10 dev, 20 test."""
    monkeypatch.chdir(tmp_path)
    rows = ["n,label,split"] + [f"{i},{'yes' if i % 2 == 0 else 'no'},{'train' if i < 30 else 'dev' if i < 40 else 'test'}"
                                for i in range(60)]
    (tmp_path / "parity.csv").write_text("\n".join(rows) + "\n")
    return {"name": "parity", "data": "parity.csv", "type": "classify", "input": "Is this even: {{ n }}",
            "target": "label", "labels": ["yes", "no"], "instruction": "Say yes or no.", "split_column": "split",
            "id_column": "n"}


def _experiment(tmp_path, parity, settings, **optimize):
    return write_experiment(tmp_path / "opt.yaml", name="opt", models=["scripted:m"], tasks=[parity],
                            settings=["zero-shot", *settings], limit=20, generation={"max_new_tokens": 4},
                            optimize={"dev_limit": 10, "train_limit": 30, **optimize})


def _cards(db: Path) -> dict[str, dict]:
    conn = sqlite3.connect(db)
    try:
        return {setting: json.loads(info)["compiled"] for setting, info in
                conn.execute("SELECT setting, task_json FROM runs") if "compiled" in json.loads(info)}
    finally:
        conn.close()


def _scores(db: Path) -> dict[str, float]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT r.setting, s.value FROM scores s JOIN runs r ON r.id = s.run_id "
                                 "WHERE s.metric = 'accuracy'"))
    finally:
        conn.close()


def _rescore(exp, db, card):
    """The experiment's one compile adaptation, its compiler over `db`'s cache, and the card's program rescored on
    dev."""
    from labscale.adapt.adaptation import AdaptContext
    from labscale.adapt.optimize import program_of
    from labscale.config import load_experiment
    from labscale.engine.store import Store
    from labscale.experiment import validate

    (adaptation,) = validate(load_experiment(exp)).adaptations
    store = Store(db)
    try:
        compiler = adaptation.compiler(AdaptContext(store, lambda m: None))
        return adaptation, compiler, compiler.score(program_of(card, adaptation.task))
    finally:
        store.close()


def test_fewshot_random_search_picks_demos_from_train_and_wins_on_dev(tmp_path, parity, scripted, capsys,
                                                                       monkeypatch):
    exp = _experiment(tmp_path, parity, ["optimized:fewshot:2"], max_bootstrapped_demos=2, max_labeled_demos=2)
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "o.db")
    assert code == 0, err
    card = _cards(tmp_path / "o.db")["optimized:fewshot:2"]
    train = {str(i) for i in range(30)}
    assert card["demos"] and all(d["id"] in train for d in card["demos"])  # never dev (30-39) nor test (40-59)
    assert card["dev"] == {"score": 1.0, "n": 10, "examples_sha": card["dev"]["examples_sha"]}
    origins = [t["origin"] for t in card["trajectory"]]
    assert origins[:3] == ["zero-shot (the task's prompt)", "labeled demos only", "bootstrap (train order)"]
    assert len(origins) == 5 and card["trajectory"][0]["score"] == 0.0  # DSPy's 3 baselines + T=2 seeded candidates
    assert card["origin"] == "labeled demos only"  # the first candidate reaching the best dev score wins ties
    # bootstrapped demos are teacher answers the metric accepted (the teacher sees 2 labeled demos: always right)
    boot = [d for t in card["trajectory"] for d in t["demos"]]
    assert boot and set(boot) <= train
    assert _scores(tmp_path / "o.db") == {"zero-shot": 0.0, "optimized:fewshot:2": 1.0}
    # nothing from test or dev went into a teacher prompt as a demonstration or was answered by the teacher
    teacher_inputs = [json.loads(p)[-1]["content"] for p in scripted.prompts]
    assert not [p for p in scripted.prompts if any(f"Is this even: {i}" in m["content"] for m in json.loads(p)[:-1]
                                                    for i in range(30, 60))]
    assert teacher_inputs
    # the report shows the compiled prompt with its dev and test scores and costs
    report = (tmp_path / "o.md").read_text()
    assert "## Compiled prompts" in report and "| 1.000 (n=10) | 1.000 [1.000, 1.000] (n=20) | 0.000 |" in report
    assert "zero-shot: 1.000 * [1.000, 1.000]" in report and "### Compilation cost beside evaluation cost" in report


def test_dev_score_equals_a_recomputation_and_an_identical_rerun_compiles_nothing(tmp_path, parity, scripted, capsys,
                                                                                monkeypatch):
    from labscale.config import load_experiment
    from labscale.experiment import validate

    exp = _experiment(tmp_path, parity, ["optimized:fewshot:1"], max_bootstrapped_demos=1, max_labeled_demos=1)
    db = tmp_path / "o.db"
    assert cli(capsys, monkeypatch, "run", exp, "--db", db)[0] == 0
    card = _cards(db)["optimized:fewshot:1"]
    stored = json.loads(Path(card["file"]).read_text())
    assert {k: v for k, v in stored.items()} == {k: v for k, v in card.items() if k != "reused"}

    adaptation, compiler, again = _rescore(exp, db, card)
    assert adaptation.identity == card["identity"] and adaptation.reused
    assert again.score == card["dev"]["score"] and again.n == card["dev"]["n"]
    assert compiler.cache.counts.new == 0  # every dev answer came from the cache

    n = len(scripted.prompts)
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0 and "reusing it" in err and "no call made" in err
    assert len(scripted.prompts) == n  # an identical re-run compiles nothing and evaluates nothing
    assert _cards(db)["optimized:fewshot:1"]["identity"] == card["identity"]

    # anything that determines the result changes the identity: the seed, the trial budget, the dev examples
    for change in ({"seed": 1}, {"settings": ["optimized:fewshot:2"]}, {"optimize": {"dev_limit": 5}}):
        data = {**yaml.safe_load(exp.read_text()), **change}
        other = write_experiment(tmp_path / "other.yaml", **data)
        (a,) = validate(load_experiment(other)).adaptations
        assert a.identity != card["identity"], change
    # the country only prices carbon: same identity
    data = yaml.safe_load(exp.read_text())
    data["optimize"]["country"] = "FRA"
    (a,) = validate(load_experiment(write_experiment(tmp_path / "fra.yaml", **data))).adaptations
    assert a.identity == card["identity"]


def test_instruction_search_finds_the_better_instruction(tmp_path, parity, scripted, capsys, monkeypatch):
    exp = _experiment(tmp_path, parity, ["optimized:instruction:3"], instructions_per_round=2)
    assert cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "o.db")[0] == 0
    card = _cards(tmp_path / "o.db")["optimized:instruction:3"]
    assert card["instruction_changed"] and "EXPERT" in card["instruction"] and card["demos"] == []
    assert card["dev"]["score"] == 1.0 and _scores(tmp_path / "o.db")["optimized:instruction:3"] == 1.0
    assert len(card["proposals"]) == 3  # T = 3 proposer calls, in rounds of 2
    assert [p["rejected"] for p in card["proposals"]] == [None, "unreadable", "duplicate"]
    from labscale.adapt.compile import parse_instruction

    assert parse_instruction("INS Answer yes or no, carefully.") == "Answer yes or no, carefully."
    assert parse_instruction("hmm") is None and parse_instruction("Instruction: \"Say yes or no.\"") == "Say yes or no."
    meta = [json.loads(p)[-1]["content"] for p in scripted.prompts if "<INS>" in p]
    assert "Score: 0.00" in meta[0] and "Instruction: Say yes or no." in meta[0]
    assert "Score: 1.00" in meta[2]  # the second round's history holds the first round's scored proposal
    assert not any(f"Is this even: {i}\n" in m or m.endswith(f"Is this even: {i}") for m in meta for i in range(30, 60))


def test_full_successive_halving_over_instructions_and_demo_sets(tmp_path, parity, scripted, capsys, monkeypatch):
    exp = _experiment(tmp_path, parity, ["optimized:full:6"], instructions_per_round=2, minibatch=2,
                      max_bootstrapped_demos=2, max_labeled_demos=1)
    assert cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "o.db")[0] == 0
    card = _cards(tmp_path / "o.db")["optimized:full:6"]
    assert card["dev"]["score"] == 1.0 and card["dev"]["n"] == 10
    rungs = [t["n"] for t in card["trajectory"]]
    assert rungs[:6] == [2] * 6 and rungs[6:9] == [4] * 3  # 6 configurations, then the better half on 2× dev
    assert rungs[-1] == 10
    assert all(d in {str(i) for i in range(30)} for t in card["trajectory"] for d in t["demos"])


def test_the_budget_stops_the_search_and_keeps_the_best_so_far(tmp_path, parity, scripted, capsys, monkeypatch):
    # $1,000 per hour of the scripted model's 0.5 s per call: the first dev pass (10 calls, $1.39) is over $1
    exp = _experiment(tmp_path, parity, ["optimized:fewshot:2"], budget_usd=1.0, price_per_hour=1000.0)
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "o.db")
    assert code == 0, err
    card = _cards(tmp_path / "o.db")["optimized:fewshot:2"]
    assert card["stopped"] == "budget" and "stopped at the budget" in err
    assert card["demos"] == [] and not card["instruction_changed"]  # nothing better was scored in time
    assert card["dev"]["score"] == 0.0 and card["dev"]["n"] == 10  # the zero-shot prompt, scored before the stop
    assert card["cost"]["usd"] > 1.0 and card["cost"]["calls"] == 10


BAD = {
    "an empty dev split": (
        lambda p: {"tasks": [{**p, "split_column": None, "split_fractions": [0.5, 0.0, 0.5]}]},
        "optimized:fewshot selects prompts on the dev split, but task 'parity' has an empty dev split"),
    "no train split for demonstrations": (
        lambda p: {"tasks": [{**p, "split_column": None, "split_fractions": [0.0, 0.5, 0.5]}]},
        "draws demonstrations from the train split"),
    "an unknown mode": (lambda p: {"settings": ["optimized:fewshots"]}, "did you mean 'fewshot'?"),
    "a zero trial budget": (lambda p: {"settings": ["optimized:fewshot:0"]}, "has trial budget '0'"),
    "an unknown proposer": (lambda p: {"optimize": {"proposer": "gpt-17"}},
                            "optimize.proposer 'gpt-17' is neither a model of this experiment nor a model id"),
    "a proposer without its key": (
        lambda p: {"models": ["scripted:m", {"id": "openai:gpt-4o", "optional": True, "api_key_env": "NO_SUCH_KEY"}],
                   "optimize": {"proposer": "openai:gpt-4o"}},
        "optimize.proposer 'openai:gpt-4o' cannot generate: its API key $NO_SUCH_KEY is not set"),
    "a proposer whose context holds no meta-prompt": (
        lambda p: {"optimize": {"proposer_max_new_tokens": 4090}}, "cannot generate an instruction"),
    "a negative budget": (lambda p: {"optimize": {"budget_usd": -1}}, "at 'optimize.budget_usd'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_optimize_input_is_one_line_and_writes_nothing(case, tmp_path, parity, scripted, capsys, monkeypatch):
    change, message = BAD[case]
    setting = "optimized:instruction" if "proposer" in case else "optimized:fewshot"
    data = {"name": "opt", "models": ["scripted:m"], "tasks": [parity], "settings": ["zero-shot", setting],
            "limit": 5, **change(parity)}
    exp = write_experiment(tmp_path / "bad.yaml", **data)
    db = tmp_path / "bad.db"
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not db.exists() and not (tmp_path / "runs" / "compiled").exists()
    assert scripted.prompts == []


def test_exported_prompt_is_a_task_entry_whose_zero_shot_prompt_is_the_compiled_one(tmp_path, parity, scripted,
                                                                                    capsys, monkeypatch):
    exp = _experiment(tmp_path, parity, ["optimized:fewshot:1"], max_bootstrapped_demos=1, max_labeled_demos=1)
    db = tmp_path / "o.db"
    assert cli(capsys, monkeypatch, "run", exp, "--db", db)[0] == 0
    code, out, err = cli(capsys, monkeypatch, "export-prompt", "--db", db, "--out", tmp_path / "p.yaml")
    assert code == 0, err
    text = (tmp_path / "p.yaml").read_text()
    assert text.startswith("# labscale compiled prompt") and "dev 1.000 (n=10, selected on) → test 1.000" in text
    entry = yaml.safe_load(text)
    assert entry["name"] == "parity" and entry["data"] == "parity.csv" and len(entry["demos"]) == 2
    reuse = write_experiment(tmp_path / "reuse.yaml", name="opt", models=["scripted:m"], tasks=[entry],
                             settings=["zero-shot"], limit=20, generation={"max_new_tokens": 4})
    n = len(scripted.prompts)
    code, out, _ = cli(capsys, monkeypatch, "run", reuse, "--db", db)
    assert code == 0 and counts(out) == (0, 20) and len(scripted.prompts) == n  # the very same prompts
    before = dump(db)
    code, _, err = cli(capsys, monkeypatch, "export-prompt", "--db", db, "--setting", "few-shot:9")
    assert code == 2 and "no compiled prompt" in err and dump(db) == before


# -- the real embedded model -----------------------------------------------------------------------------------


def _real_experiment(tmp_path: Path, name: str = "compile") -> Path:
    return write_experiment(
        tmp_path / f"{name}.yaml", name=name, models=[{"id": "embedded:smollm2-135m-instruct", "batch_size": 2}],
        tasks=["fact-check"], settings=["zero-shot", "optimized:fewshot:1"], limit=3,
        generation={"max_new_tokens": 6},
        optimize={"dev_limit": 4, "train_limit": 6, "max_bootstrapped_demos": 1, "max_labeled_demos": 1})


@pytest.mark.real_model
@pytest.mark.slow
def test_compile_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    from labscale.tasks.registry import get_task

    monkeypatch.chdir(tmp_path)
    exp = _real_experiment(tmp_path)
    db = tmp_path / "c.db"
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0, err
    card = _cards(db)["optimized:fewshot:1"]
    task = get_task("fact-check", tmp_path)
    train, dev, test = ({e.id for e in task.splits[s]} for s in ("train", "dev", "test"))
    ids = [d["id"] for d in card["demos"]] + [d for t in card["trajectory"] for d in t["demos"]]
    assert ids and set(ids) <= train and not set(ids) & (dev | test)
    assert card["cost"]["calls"] > 0 and card["cost"]["compute_s"] > 0 and card["cost"]["usd"] > 0

    adaptation, compiler, again = _rescore(exp, db, card)
    assert again.score == card["dev"]["score"] and compiler.cache.counts.new == 0

    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0 and "no call made" in err and counts(out) == (0, 6)


@pytest.mark.real_model
@pytest.mark.subprocess
@pytest.mark.slow
def test_compile_resumes_after_sigkill_without_repeating_a_call(tmp_path):
    exp = _real_experiment(tmp_path, "resume")
    db = tmp_path / "r.db"
    import labscale

    src = str(Path(labscale.__file__).resolve().parents[1])  # the labscale under test, whatever the cwd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}

    def rows() -> int:
        try:
            conn = sqlite3.connect(db, timeout=30)
            try:
                return conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.OperationalError:
            return 0

    proc = subprocess.Popen([*LABSCALE, "run", str(exp), "--db", str(db)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while (not db.exists() or rows() < 3) and proc.poll() is None:
        assert time.time() < deadline, "the compilation never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not list(tmp_path.glob("runs/compiled/*.json"))  # killed before the compilation finished
    stored = rows()

    done = subprocess.run([*LABSCALE, "run", str(exp), "--db", str(db)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stderr.splitlines() if l.strip().startswith("compiled:"))
    calls, new = (int(x) for x in __import__("re").search(r"(\d+) calls \((\d+) new", line).groups())
    assert calls == stored + new and new < calls  # the calls stored before the kill were not made again
    card = _cards(db)["optimized:fewshot:1"]

    # the same compilation from the cache alone: no call, the same prompt
    for f in (tmp_path / "runs" / "compiled").glob("*.json"):
        f.unlink()
    again = subprocess.run([*LABSCALE, "run", str(exp), "--db", str(db)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{calls} calls (0 new, {calls} cached)" in again.stderr
    recompiled = json.loads(next((tmp_path / "runs" / "compiled").glob("*.json")).read_text())
    assert (recompiled["instruction"], recompiled["demos"], recompiled["dev"]) == \
        (card["instruction"], card["demos"], card["dev"])
