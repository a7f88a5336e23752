"""The library API (`labscale.run_experiment`, `labscale.load_results`), the experiment runner's phases, and the
promise that a priced API backend is a subclass plus a registry line."""

from __future__ import annotations

import json
import sqlite3

import pytest
from helpers import cli, counts, write_experiment

import labscale


@pytest.fixture
def notes_exp(tmp_path, tiny_llm):
    rows = ["id,text,label"] + [f"n{i},patient {i} reports {w} pain,{'urgent' if i % 2 else 'routine'}"
                                for i, w in enumerate(["knee", "back", "head", "chest", "hand"] * 4)]
    (tmp_path / "notes.csv").write_text("\n".join(rows) + "\n")
    return write_experiment(
        tmp_path / "exp.yaml", name="lib", models=[f"hf:{tiny_llm}"],
        tasks=[{"name": "triage", "data": "notes.csv", "type": "classify", "input": "{{ text }}", "target": "label",
                "labels": ["urgent", "routine"], "id_column": "id", "instruction": "Urgent or routine?"}],
        limit=4, generation={"max_new_tokens": 4}, bootstrap_samples=200,
    )


@pytest.mark.slow
def test_run_experiment_returns_results_equal_to_the_stored_ones(tmp_path, notes_exp):
    db = tmp_path / "lib.db"
    res = labscale.run_experiment(notes_exp, db=db, say=lambda m: None)
    assert res.stopped is None and res.report == db.with_suffix(".md") and res.report.is_file()
    assert (res.generations.new, res.generations.cached) == (4, 0)
    run = res.run("triage", res.runs[0].model)
    assert run.complete and run.main_metric == "accuracy" and run.n_examples == 4
    s = res.score("triage", run.model)
    assert s is not None and s.n == 4 and s.ci_low <= s.value <= s.ci_high
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT metric, value FROM scores WHERE run_id=?", (run.id,)).fetchall())
    assert {m: sc.value for m, sc in run.scores.items()} == stored
    loaded = labscale.load_results(db)
    assert [r.scores for r in loaded.runs] == [r.scores for r in res.runs]
    df = loaded.to_pandas()
    assert set(df["metric"]) == set(run.scores) and df["main"].sum() == 1
    again = labscale.run_experiment(notes_exp, db=db, say=lambda m: None)
    assert (again.generations.new, again.generations.cached) == (0, 4)


def test_run_experiment_takes_an_experiment_object(tmp_path, notes_exp):
    from labscale.config import load_experiment

    exp = load_experiment(notes_exp).model_copy(update={"name": "lib2"})
    res = labscale.run_experiment(exp, db=tmp_path / "x.db", limit=2, say=lambda m: None)
    assert res.experiment == "lib2" and res.runs[0].n_examples == 2


def test_load_results_errors_are_one_line(tmp_path):
    from labscale.errors import LabscaleError

    with pytest.raises(LabscaleError, match="does not exist"):
        labscale.load_results(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LabscaleError, match="not a usable labscale database"):
        labscale.load_results(tmp_path / "junk.db")


def test_phases_are_visible_and_the_cli_only_calls_the_runner(tmp_path, notes_exp, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "run", notes_exp, "--db", tmp_path / "c.db")
    assert code == 0, err
    assert "validate: 1 runs (1 models × 1 tasks × 1 settings)" in err
    assert counts(out) == (4, 0)


# -- a second, priced API backend: a subclass and a registry line ---------------------------------------------------


def _echo_backend_class():
    from labscale.models.base import GenerationResult, ModelBackend, ModelInfo, TokenPrice

    class Echo(ModelBackend):
        """A remote API that answers every prompt with the first label it finds, priced per token."""

        calls = 0

        def __init__(self, spec, name):
            self.spec, self.name = spec, name

        @property
        def info(self):
            price = TokenPrice(self.spec.price.input, self.spec.price.output, "experiment file") if self.spec.price \
                else None
            return ModelInfo(name=self.spec.label, fingerprint=f"echo-{self.name}", backend="echo-api",
                             context_length=1000, supports_loglikelihood=False, is_remote=True, price=price)

        def render(self, prompt):
            return json.dumps(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])

        def count_tokens(self, text):
            return len(text) // 4 + 1

        def generate(self, requests, progress=None):
            type(self).calls += len(requests)
            return [GenerationResult("The answer is (A)" if "A." in r.prompt else "urgent",
                                     self.count_tokens(r.prompt), r.params.max_new_tokens, 0.01, 0.01)
                    for r in requests]

    return Echo


def test_a_priced_api_backend_is_a_subclass_and_a_registry_line(tmp_path, notes_exp, monkeypatch):
    from labscale.config import API_FIELDS
    from labscale.models import registry

    Echo = _echo_backend_class()
    monkeypatch.setitem(registry.FACTORIES, "echo", registry.Backend(lambda spec, name: Echo(spec, name),
                                                                      remote=True, takes=API_FIELDS))
    monkeypatch.setenv("ECHO_KEY", "k")
    exp = write_experiment(
        tmp_path / "api.yaml", name="api",
        models=[{"id": "echo:big", "api_key_env": "ECHO_KEY", "price": {"input": 1.0, "output": 2.0}}],
        tasks=json.loads(json.dumps(__import__("yaml").safe_load(notes_exp.read_text())["tasks"])) + ["openbookqa"],
        limit=3, generation={"max_new_tokens": 4}, bootstrap_samples=200,
    )
    (tmp_path / "notes.csv").write_text((notes_exp.parent / "notes.csv").read_text())
    res = labscale.run_experiment(exp, db=tmp_path / "api.db", say=lambda m: None)
    by_task = {r.task: r for r in res.runs}
    assert by_task["openbookqa"].protocol == "generate"  # no log-likelihoods: the letter protocol
    eff = by_task["triage"].efficiency
    assert eff["cost_usd"] == pytest.approx((eff["prompt_tokens"] * 1.0 + eff["new_tokens"] * 2.0) / 1e6)
    assert eff["new_tokens"] == 3 * 4 and eff["cost_usd"] > 0
    report = res.report.read_text()
    assert "## API cost" in report and "1 / 2 (experiment file)" in report
    # the cost limit holds for it as for openai: a limit below the whole grid's cost stops it, within the limit
    total = sum(r.efficiency["cost_usd"] for r in res.runs)
    limited = write_experiment(tmp_path / "lim.yaml", **{**__import__("yaml").safe_load(exp.read_text()),
                                                          "name": "lim", "cost_limit": round(total * 0.6, 8)})
    Echo.calls = 0
    res = labscale.run_experiment(limited, db=tmp_path / "lim.db", say=lambda m: None)
    assert res.stopped is not None and "cost_limit" in str(res.stopped) and 0 < Echo.calls < 6
    conn = sqlite3.connect(tmp_path / "lim.db")
    spent = sum((p * 1.0 + n * 2.0) / 1e6 for p, n in conn.execute("SELECT prompt_tokens, new_tokens FROM generations"))
    assert 0 < spent <= total * 0.6
    # without a key the remote backend fails before any work, like openai
    monkeypatch.delenv("ECHO_KEY")
    from labscale.errors import LabscaleError

    with pytest.raises(LabscaleError, match=r"needs an API key in \$ECHO_KEY"):
        labscale.run_experiment(exp, db=tmp_path / "nokey.db", say=lambda m: None)
    assert not (tmp_path / "nokey.db").exists()
